"""A block's sequence mixer, chosen per layer by `Config.layer_mixers`: attention (nn/attention.py) or one of the
mixers that replace it, Hyena (nn/hyena.py), RetNet's retention (nn/retnet.py) and Mamba (nn/mamba.py). Each takes
the block's normed x (B, T, C) and the forward's `AttentionContext` and returns (B, T, C), so a Block holds any of them.

`MixerCache` is what generation passes to a model with non-attention layers: keys/values for its attention layers
(hybrids), and for every other layer the state its mixer keeps between forwards (RetNet and Mamba: a fixed size,
Hyena: its input history, see nn/hyena.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmkit.config import Config
from llmkit.nn.attention import Attention, KVCache
from llmkit.nn.hyena import Hyena
from llmkit.nn.mamba import Mamba
from llmkit.nn.retnet import MultiScaleRetention

MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "attention": Attention, "hyena": Hyena, "retnet": MultiScaleRetention, "mamba": Mamba,
}


def build_mixer(config: Config, layer_index: int) -> nn.Module:
    """Layer `layer_index`'s sequence mixer for `config`."""
    return MIXER_CLASSES[config.layer_mixers[layer_index]](config, layer_index)


class MixerCache(KVCache):
    """A `KVCache` whose non-attention layers keep their mixer's state (`states[layer]`, None until the first forward)
    instead of key/value buffers. The slot bookkeeping (`reserve`, `valid`, `length`) is KVCache's: positions and
    padding work the same; the per-slot padding mask is one bool per slot and row. KVCache.__init__ is not called: it
    would allocate every layer's buffers."""

    def __init__(
        self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        recurrent = set(config.recurrent_layers)
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [None if i in recurrent else torch.zeros(shape, dtype=dtype, device=device)
                     for i in range(config.n_layers)]
        self.values = [None if i in recurrent else torch.zeros(shape, dtype=dtype, device=device)
                       for i in range(config.n_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding, self.length, self.max_len, self.batch_size = False, 0, max_len, batch_size
        self.states: list[Any] = [None] * config.n_layers

    def state_numel(self, layer: int) -> int:
        """Elements held for `layer`: its key/value buffers or its mixer state (nested tuples/lists of tensors)."""
        if self.keys[layer] is not None:
            return self.keys[layer].numel() + self.values[layer].numel()
        return _numel(self.states[layer])


def _numel(state: Any) -> int:
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel()
    return sum(_numel(part) for part in state)
