"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): P trainable
embeddings ("soft prompt") go before every sequence; the whole model stays frozen.

    x = [e_1 .. e_P ; embed(t_1) .. embed(t_T)]   ->   blocks   ->   logits of the T real positions only

The decoder prepends them at a sequence's first forward (`Decoder.soft_prompt`): with a KV cache the soft prompt's
keys/values are computed once and stay in the cache's first P slots; the caller still passes (B, T) ids and gets
(B, T) logits, so the training objective and generation need no change. Text initialisation embeds a text's tokens,
repeated or cut to P (as peft does); random initialisation draws from the token embeddings' own scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.peft.core import freeze
from llmkit.peft.settings import PromptTuningSettings  # noqa: F401 (re-exported)


class SoftPrompt(nn.Module):
    """The P trainable embeddings (named like peft's prompt encoder: embedding.weight, shape (P, C))."""

    def __init__(self, weight: torch.Tensor, settings: PromptTuningSettings) -> None:
        super().__init__()
        self.settings = settings  # how it was made (written into a peft adapter_config.json on export)
        self.embedding = nn.Embedding(*weight.shape, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)

    @property
    def n_tokens(self) -> int:
        return self.embedding.num_embeddings

    def prepend(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The soft prompt before token embeddings x (B, T, C) -> (B, P + T, C); a mask (B, T) grows by P ones."""
        B, T, _ = x.shape
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise LlmkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, tokens) = "
                              f"{(B, T)}")
        prompt = self.embedding.weight.to(x.dtype)[None].expand(B, -1, -1)  # (B, P, C)
        x = torch.cat([prompt, x], dim=1)  # (B, P + T, C)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, self.n_tokens), attention_mask], dim=1)  # (B, P+T)
        return x, attention_mask


def apply_prompt_tuning(model: nn.Module, settings: PromptTuningSettings | None = None, tokenizer: Any = None) -> nn.Module:
    """Freeze the decoder and give it a trainable soft prompt of `settings.n_virtual_tokens` embeddings; in place.
    `tokenizer` (with encode(text)) is needed for init='text'."""
    settings = settings or PromptTuningSettings()
    require_plain_decoder(model, "prompt tuning")
    embed = model.embed.weight  # (V, C)
    if settings.init == "text":
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise LlmkitError("prompt tuning with init='text' needs the model's tokenizer: pass "
                              "apply_prompt_tuning(model, settings, tokenizer=...)")
        ids = list(tokenizer.encode(settings.init_text))
        if not ids:
            raise LlmkitError(f"init_text {settings.init_text!r} encodes to no tokens; give a non-empty text")
        # repeat, then cut, to exactly P tokens (peft: ceil(P / len) repetitions)
        ids = (ids * math.ceil(settings.n_virtual_tokens / len(ids)))[: settings.n_virtual_tokens]
        weight = embed.detach()[torch.tensor(ids, device=embed.device)].clone()  # (P, C)
    else:
        weight = torch.randn(settings.n_virtual_tokens, embed.shape[1], device=embed.device).to(embed.dtype)
        weight = weight * embed.detach().float().std().to(embed.dtype)  # at the scale of real token embeddings
    freeze(model)
    model.soft_prompt = SoftPrompt(weight, settings)
    return model


def require_plain_decoder(model: nn.Module, method: str) -> None:
    """Prompt learning needs a llmkit Decoder (its soft_prompt / kv_prefix hooks), without one already set."""
    if not hasattr(model, "soft_prompt") or not hasattr(model, "kv_prefix"):
        raise LlmkitError(f"{method} needs an llmkit Decoder (a decoder-only model); {type(model).__name__} has no "
                          "soft_prompt / kv_prefix hooks")
    if model.soft_prompt is not None or model.kv_prefix is not None:
        raise LlmkitError(f"the model already has a soft prompt or a prefix; apply {method} to a fresh base model")
