"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): every layer gets
P trainable key/value pairs that every query attends to, before the real tokens; the model stays frozen.

    attention_l(Q, [K_prefix_l ; K], [V_prefix_l ; V])      for each layer l; prefix keys are not rotated

Training is steadier through a reparameterisation: the prefix is an MLP of a small embedding,
prefix = W2 tanh(W1 E + b1) + b2, of shape (P, n_layers * 2 * kv_dim); after training the MLP is evaluated once and
folded into plain prefix tensors (`merge_prefix_tuning`), which is also what peft saves. Columns are laid out as
peft's: (layer, key|value, kv head, head_dim). `apply_prefix_tuning` turns a Decoder into a `PrefixTuned` one in
place (why a subclass: see llmkit/peft/prompt_tuning.py): at a sequence's first forward it writes the prefix into the
first P slots of the KV cache (making a cache when none is given, as in training), so the real tokens sit at positions
P.. as in peft, and generation with a cache works unchanged (`new_cache` makes room for the prefix).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.attention import KVCache
from llmkit.peft.core import freeze
from llmkit.peft.prompt_tuning import PromptLearning, require_plain_decoder
from llmkit.peft.settings import PrefixTuningSettings  # noqa: F401 (re-exported)


class KVPrefix(nn.Module):
    """The prefix keys/values of every layer, stored flat like peft's prompt encoder: embedding.weight (P, width)
    directly, or embedding.weight (P, kv_dim) through transform = Linear -> Tanh -> Linear to width."""

    def __init__(self, config: Config, settings: PrefixTuningSettings, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.settings = settings  # what to save the adapter with (reparameterize turns False once folded)
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        width = config.n_layers * 2 * config.kv_dim
        P = settings.n_virtual_tokens
        if settings.reparameterize:
            # peft's sizes: the embedding is kv_dim wide (its token_dim for grouped-query models)
            self.embedding = nn.Embedding(P, config.kv_dim, dtype=dtype, device=device)
            self.transform = nn.Sequential(nn.Linear(config.kv_dim, settings.hidden, dtype=dtype, device=device),
                                           nn.Tanh(), nn.Linear(settings.hidden, width, dtype=dtype, device=device))
        else:
            self.embedding = nn.Embedding(P, width, dtype=dtype, device=device)
            self.transform = None

    @property
    def n_tokens(self) -> int:
        return self.embedding.num_embeddings

    def flat(self) -> torch.Tensor:
        """The prefix as peft stores it: (P, n_layers * 2 * kv_dim)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def keys_values(self) -> torch.Tensor:
        """The prefix per layer: (n_layers, 2, n_kv_heads, P, head_dim), [:, 0] keys and [:, 1] values."""
        P = self.n_tokens
        prefix = self.flat().view(P, self.n_layers, 2, self.n_kv_heads, self.head_dim)  # (P, L, 2, Hkv, D)
        return prefix.permute(1, 2, 3, 0, 4)  # (L, 2, Hkv, P, D)

    def fill(self, cache: KVCache) -> KVCache:
        """Write the prefix into the next P slots of an empty cache (every row the same); returns the cache."""
        start, _ = cache.reserve(self.n_tokens, None)
        prefix = self.keys_values().to(cache.keys[0].dtype)  # (L, 2, Hkv, P, D)
        for layer in range(self.n_layers):
            cache.store(layer, start, prefix[layer, 0][None], prefix[layer, 1][None])  # broadcast over the batch
        return cache


class PrefixTuned(PromptLearning):
    """A Decoder whose every layer attends to trainable prefix keys/values (`kv_prefix`) before the tokens."""

    part = "kv_prefix"
    kv_prefix: KVPrefix

    def hidden_states(
        self, input_ids: torch.Tensor | None, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`Decoder.hidden_states` (B, T, C), the prefix filled into the cache's first P slots at a sequence's first
        forward (a cache is made for the forward when none is given)."""
        if self.starts_sequence(cache, document_ids):
            B, T = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
            cache = self.kv_prefix.fill(cache if cache is not None else self.new_cache(B, T))
        return super().hidden_states(input_ids, cache, attention_mask, document_ids, inputs_embeds)


def apply_prefix_tuning(model: nn.Module, settings: PrefixTuningSettings | None = None) -> nn.Module:
    """Freeze the decoder and give it trainable per-layer key/value prefixes; in place (the model becomes a
    `PrefixTuned`), returns it."""
    settings = settings or PrefixTuningSettings()
    require_plain_decoder(model, "prefix tuning")
    weight = model.embed.weight
    freeze(model)
    return PrefixTuned.adopt(model, KVPrefix(model.config, settings, weight.dtype, weight.device))


def merge_prefix_tuning(model: nn.Module) -> nn.Module:
    """Fold the reparameterisation MLP into plain prefix tensors (what peft saves; no MLP at inference). Save the
    adapter afterwards with `model.kv_prefix.settings` (reparameterize=False). Not undoable: the MLP is dropped."""
    if not isinstance(model, PrefixTuned):
        raise LlmkitError(f"{type(model).__name__} has no prefix to fold; call apply_prefix_tuning first")
    prefix = model.kv_prefix
    if prefix.transform is None:
        return model  # already plain
    with torch.no_grad():
        flat = prefix.flat()  # (P, L * 2 * kv_dim)
    folded = KVPrefix(model.config, replace(prefix.settings, reparameterize=False), flat.dtype, flat.device)
    with torch.no_grad():
        folded.embedding.weight.copy_(flat)
    model.kv_prefix = folded
    return model
