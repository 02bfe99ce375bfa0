"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): a small residual MLP
after the attention sublayer and after the feed-forward sublayer of every block; the model stays frozen.

    h <- h + up(act(down(h)))      down: d_model -> bottleneck, up: bottleneck -> d_model, up initialised to zero

so the adapted model starts as the base model exactly. They sit on the sublayer's output, before the residual sum
(and, in a post-norm block, before its norm), as registered submodules `attn_adapter` / `mlp_adapter` of each block:
the base parameter names do not change. The nonlinearity rules out merging into the base weights; peft has no such
method, so adapters are saved in llmkit's adapter format only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.nn.block import Block
from llmkit.nn.linear import Linear
from llmkit.peft.core import freeze
from llmkit.peft.settings import AdapterSettings  # noqa: F401 (re-exported)

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))) for h (..., d_model); `up` starts at zero, so the adapter starts as the identity."""

    def __init__(self, d_model: int, settings: AdapterSettings, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.down = Linear(d_model, settings.bottleneck, dtype=dtype, device=device)
        self.up = Linear(settings.bottleneck, d_model, dtype=dtype, device=device)
        self.activation = settings.activation
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(ACTIVATIONS[self.activation](self.down(h)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def apply_adapters(model: nn.Module, settings: AdapterSettings | None = None) -> nn.Module:
    """Freeze the model and add a trainable adapter after the attention and the feed-forward sublayer of every
    block (decoder or encoder); in place, returns the model."""
    settings = settings or AdapterSettings()
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    if not blocks:
        raise LlmkitError(f"{type(model).__name__} has no transformer blocks (llmkit.nn.block.Block) to put adapters "
                          "in; pass an llmkit decoder or encoder")
    if any(not isinstance(block.attn_adapter, nn.Identity) for block in blocks):
        raise LlmkitError("the model already has bottleneck adapters; apply them to a fresh base model")
    weight = next(model.parameters())
    d_model = model.config.d_model
    freeze(model)
    for block in blocks:
        block.attn_adapter = BottleneckAdapter(d_model, settings, weight.dtype, weight.device)
        block.mlp_adapter = BottleneckAdapter(d_model, settings, weight.dtype, weight.device)
    return model
