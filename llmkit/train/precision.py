"""Numeric precision of training: fp32, or bf16/fp16 autocast over fp32 master weights (fp16 with a
GradScaler, whose loss scaling keeps small fp16 gradients from flushing to zero)."""

from __future__ import annotations

import contextlib

import torch

from llmkit.errors import LlmkitError
from llmkit.train.settings import Precision

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def compute_dtype(precision: Precision) -> torch.dtype:
    if precision not in COMPUTE_DTYPES:
        raise LlmkitError(f"unknown precision {precision!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[precision]


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for one forward pass (a no-op in fp32)."""
    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training; None otherwise (bf16 has fp32's exponent range and needs none)."""
    if precision != "fp16-mixed":
        return None
    return torch.amp.GradScaler(device.type)
