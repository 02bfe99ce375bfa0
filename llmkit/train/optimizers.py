"""Memory-light optimizers: AdamW with 8-bit or 4-bit states, and LOMO / AdaLomo, which update each parameter
inside the backward pass and never hold the whole gradient.

Memory per trainable parameter, besides the fp32 weight (4 bytes):

    adamw        gradient 4 + two fp32 moments 8                 = 12 bytes
    adamw-8bit   gradient 4 + two 1-byte moments + scales        ~ 6 bytes
    adamw-4bit   gradient 4 + two 4-bit moments + scales         ~ 5 bytes
    lomo         the gradient of one parameter tensor at a time  ~ 0 bytes (plain SGD: no state)
    adalomo      one parameter's gradient + factored 2nd moments ~ 0 bytes (rows + columns per matrix)

QuantizedAdamW (Dettmers et al. 2022; Li et al. 2023): AdamW (Loshchilov & Hutter 2019) whose moments m, v are
stored block-wise quantized (llmkit/train/lowbit.py) and dequantized for the update of their parameter only:

    m = b1 m + (1 - b1) g        v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Tensors smaller than `min_quantized_numel` keep fp32 moments (norms and biases: a rounding error there is a large
relative error in a few values, and they weigh nothing), as bitsandbytes does.

LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited Resources"): SGD fused into
backward. A hook runs as soon as a parameter's gradient is complete (`register_post_accumulate_grad_hook`), applies
p = p - lr * g and frees g, so at most one parameter's gradient (plus autograd's buffers) is alive. Gradient-norm
clipping needs the norm before any update: LOMO's answer, used here, is two backward passes, the first only summing
|g|^2 (`measure_grad_norm`), the second updating with g * min(1, max_norm / |g|).

AdaLomo (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"): the same fused scheme with
Adafactor's factored second moment (Shazeer & Stern 2018) and grouped update normalisation. For a matrix gradient G
(n x m), with b2_t = 1 - t^-0.8 and G2 = G^2 + eps1:

    R = b2_t R + (1 - b2_t) mean_cols(G2)     (n,)        C = b2_t C + (1 - b2_t) mean_rows(G2)     (m,)
    V = R C^T / mean(R)                        U = G / sqrt(V)          (vectors keep a full V instead)
    U = U / max(1, RMS(U))                     p = p - lr * max(eps2, RMS(p)) * U

so the state of an n x m matrix is n + m numbers. The normalised update needs no gradient clipping.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.estimate import LOW_BIT_CHUNK
from llmkit.train.lowbit import FIRST_MOMENT, SECOND_MOMENT, QuantSpec, dequantize, quantize, zero_state

MIN_QUANTIZED_NUMEL = 4096  # smaller tensors keep fp32 moments
CHUNK = LOW_BIT_CHUNK  # values updated at once (a multiple of both block sizes): the fp32 temporaries stay ~24 MB
QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")


class QuantizedAdamW(torch.optim.Optimizer):
    """AdamW whose two moments are kept in `bits` (8 or 4) per value, block-wise quantized."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, bits: int = 8,
                 min_quantized_numel: int = MIN_QUANTIZED_NUMEL) -> None:
        if bits not in FIRST_MOMENT:
            raise LlmkitError(f"bits={bits}: quantized AdamW keeps its states in 8 or 4 bits")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bits = bits
        self.min_quantized_numel = min_quantized_numel

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(state, p)
                state["step"] += 1
                # (n,) views; a non-contiguous parameter (e.g. a transposed import) is updated in a copy, written back
                weight = p.data.view(-1) if p.is_contiguous() else p.data.contiguous().view(-1)
                grad = p.grad.reshape(-1)
                for start in range(0, weight.numel(), CHUNK):  # bounded fp32 temporaries, however large the tensor
                    self._update_chunk(state, group, weight, grad, start, min(start + CHUNK, weight.numel()))
                if not p.is_contiguous():
                    p.data.copy_(weight.view(p.shape))
        return loss

    def _init_state(self, state: dict[str, Any], p: torch.Tensor) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        if p.numel() < self.min_quantized_numel:
            state["exp_avg"] = torch.zeros(p.numel(), device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.numel(), device=p.device)
            return
        state["exp_avg_codes"], state["exp_avg_scales"] = zero_state(p.numel(), FIRST_MOMENT[self.bits], p.device)
        state["exp_avg_sq_codes"], state["exp_avg_sq_scales"] = zero_state(p.numel(), SECOND_MOMENT[self.bits], p.device)

    def _update_chunk(self, state: dict[str, Any], group: dict[str, Any], weight: torch.Tensor, grad: torch.Tensor,
                      start: int, end: int) -> None:
        """AdamW on values [start, end) of one parameter; `start` is a multiple of both block sizes."""
        beta1, beta2 = group["betas"]
        t = state["step"].item()
        quantized = "exp_avg_codes" in state
        if quantized:
            exp_avg = self._dequantize_slice(state, "exp_avg", FIRST_MOMENT[self.bits], start, end)
            exp_avg_sq = self._dequantize_slice(state, "exp_avg_sq", SECOND_MOMENT[self.bits], start, end)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"][start:end], state["exp_avg_sq"][start:end]
        g = grad[start:end].float()
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"])
        update = exp_avg.div(denom).mul_(group["lr"] / (1 - beta1**t))
        w = weight[start:end]
        w.mul_(1 - group["lr"] * group["weight_decay"])
        w.sub_(update.to(w.dtype))
        if quantized:
            self._quantize_slice(state, "exp_avg", FIRST_MOMENT[self.bits], start, exp_avg)
            self._quantize_slice(state, "exp_avg_sq", SECOND_MOMENT[self.bits], start, exp_avg_sq)

    @staticmethod
    def _dequantize_slice(state: dict[str, Any], name: str, spec: QuantSpec, start: int, end: int) -> torch.Tensor:
        codes = state[f"{name}_codes"][start * spec.bits // 8: -(-end * spec.bits // 8)]
        scales = state[f"{name}_scales"][start // spec.block: -(-end // spec.block)]
        return dequantize(codes, scales, spec, torch.Size([end - start]))

    @staticmethod
    def _quantize_slice(state: dict[str, Any], name: str, spec: QuantSpec, start: int, values: torch.Tensor) -> None:
        codes, scales = quantize(values, spec)
        first_code, first_block = start * spec.bits // 8, start // spec.block
        state[f"{name}_codes"][first_code: first_code + codes.numel()] = codes
        state[f"{name}_scales"][first_block: first_block + scales.numel()] = scales

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every loaded state tensor to its parameter's dtype; the codes (uint8) and scales (fp32) are
        put back exactly as saved, so a resumed run continues bit for bit."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # the saved groups list their parameters' keys (ids, or names through torch.distributed.checkpoint) in order
        keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(keys, params):
            for name in QUANTIZED_KEYS:
                if name in saved.get(key, {}):
                    self.state[p][name] = saved[key][name].to(p.device)


class FusedBackwardOptimizer(torch.optim.Optimizer, abc.ABC):
    """An optimizer that updates each parameter inside backward, as soon as its gradient is complete, and frees the
    gradient. The training loop runs backward only: `step()` updates nothing (the updates already happened), it
    closes the step. Gradient accumulation is impossible (each backward updates), and so is gradient clipping by the
    global norm without a first pass (`measure_grad_norm`)."""

    updates_in_backward = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.clip_coefficient = 1.0
        self._measuring = False
        self._squared_norm: torch.Tensor | None = None
        # a parameter's group is looked up by index at each call: load_state_dict replaces the group dicts
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_gradient, index))
                         for index, group in enumerate(self.param_groups) for p in group["params"]]

    def _on_gradient(self, group_index: int, p: torch.Tensor) -> None:
        group = self.param_groups[group_index]
        with torch.no_grad():
            grad = p.grad.float()
            if self._measuring:
                squared = grad.pow(2).sum()
                self._squared_norm = squared if self._squared_norm is None else self._squared_norm + squared
            else:
                self.update(p, grad, group, self.clip_coefficient)
        p.grad = None

    @abc.abstractmethod
    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], scale: float) -> None:
        """Update `p` from its gradient times `scale` (the clipping coefficient); `grad` may be reused as scratch."""

    @contextlib.contextmanager
    def measure_grad_norm(self) -> Iterator[None]:
        """Inside, backward only adds up |g|^2 (no update, gradients freed); `grad_norm()` reads it afterwards."""
        self._measuring, self._squared_norm = True, None
        try:
            yield
        finally:
            self._measuring = False

    def grad_norm(self) -> float:
        """The global gradient norm summed during the last `measure_grad_norm` pass."""
        if self._squared_norm is None:
            raise LlmkitError("no gradient was measured: run a backward pass inside measure_grad_norm() first")
        return math.sqrt(float(self._squared_norm))

    def clip_to(self, max_norm: float | None, grad_norm: float) -> None:
        """Scale the next updates' gradients by min(1, max_norm / grad_norm) (None: no clipping)."""
        self.clip_coefficient = 1.0 if max_norm is None else min(1.0, max_norm / (grad_norm + 1e-6))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Nothing left to update: backward did it. Returns the closure's loss, if given, after its backward ran."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def remove_hooks(self) -> None:
        """Detach from the parameters (after training, so a later backward does not update them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Lomo(FusedBackwardOptimizer):
    """LOMO: SGD inside backward, p = p (1 - lr wd) - lr g; no optimizer state at all."""

    needs_grad_norm_pass = True  # clipping by the global norm costs a second backward

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], scale: float) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(grad, alpha=-group["lr"] * scale)  # no temporary: the gradient is the only tensor in flight


class AdaLomo(FusedBackwardOptimizer):
    """AdaLomo: Adafactor's factored second moment and update normalisation, inside backward (module docstring)."""

    needs_grad_norm_pass = False  # the update is normalised per parameter; no clipping

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0,
                 eps: tuple[float, float] = (1e-30, 1e-3), decay_rate: float = -0.8, clip_threshold: float = 1.0) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eps=eps, decay_rate=decay_rate,
                                      clip_threshold=clip_threshold))
        for group in self.param_groups:  # the state exists from the start, so a checkpoint can be loaded into it
            for p in group["params"]:
                state = self.state[p]
                state["step"] = torch.zeros((), dtype=torch.float32)
                if p.ndim >= 2:
                    state["exp_avg_sq_row"] = p.new_zeros(p.shape[:-1], dtype=torch.float32)  # (..., n)
                    state["exp_avg_sq_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32)  # (..., m)
                else:
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], scale: float) -> None:
        state = self.state[p]
        factored = grad.ndim >= 2
        if scale != 1.0:
            grad = grad * scale
        state["step"] += 1
        beta2 = 1.0 - state["step"].item() ** group["decay_rate"]
        eps1, eps2 = group["eps"]
        squared = grad.pow(2).add_(eps1)  # the one temporary the size of the parameter; it becomes the update
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1 - beta2)
            col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1 - beta2)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)  # (..., n, 1)
            update = torch.mul(grad, row_factor, out=squared).mul_(col.rsqrt().unsqueeze(-2))  # (..., n, m)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2).add_(squared, alpha=1 - beta2)
            update = torch.mul(grad, exp_avg_sq.rsqrt(), out=squared)
        update.div_(max(1.0, _rms(update) / group["clip_threshold"]))
        weight = p.float()
        lr = group["lr"] * max(eps2, _rms(weight))
        if group["weight_decay"]:
            weight.add_(weight, alpha=-group["weight_decay"] * lr)
        weight.add_(update, alpha=-lr)
        p.copy_(weight)


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.norm(2)) / math.sqrt(tensor.numel())
