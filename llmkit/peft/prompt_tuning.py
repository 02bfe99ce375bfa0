"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): P trainable
embeddings ("soft prompt") go before every sequence; the whole model stays frozen.

    x = [e_1 .. e_P ; embed(t_1) .. embed(t_T)]   ->   blocks   ->   logits of the T real positions only

`apply_prompt_tuning` turns a Decoder into a `PromptTuned` one in place: at a sequence's first forward it prepends the
soft prompt through the decoder's `inputs_embeds` and drops the P prompt positions from the output; with a KV cache the
soft prompt's keys/values are computed once and stay in the cache's first P slots (`new_cache` makes room). The caller
still passes (B, T) ids and gets (B, T) logits, so the training objective, scoring and generation need no change. Text
initialisation embeds a text's tokens, repeated or cut to P (as peft does); random initialisation draws from the token
embeddings' own scale.

Why a subclass, swapped in place (as `torch.nn.utils.parametrize` swaps a module's class), rather than a wrapper
module or slots in the base Decoder: the model stays a Decoder with the same parameter names (`embed.weight`,
`blocks.0...` for checkpoints and key maps; `soft_prompt.embedding.weight` for adapter files and training checkpoints),
the same `blocks` for FSDP and the same `kernel`/`config` attributes, and it changes in place like every other llmkit
method (LoRA swaps linears); the plain Decoder carries no prompt-learning code. `PromptLearning` holds what prompt and
prefix tuning share: room for P virtual tokens in the cache, the sequence's first forward, the packed-rows refusal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.nn.attention import KVCache
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


class PromptLearning(Decoder):
    """A Decoder with P virtual tokens before every sequence (prompt or prefix tuning); subclasses add them in
    `hidden_states` at a sequence's first forward. Never built directly: `adopt` turns a plain Decoder into one."""

    part: str  # attribute holding the trained part (a module with `n_tokens`): soft_prompt or kv_prefix

    @property
    def n_virtual_tokens(self) -> int:
        return getattr(self, self.part).n_tokens

    @classmethod
    def adopt(cls, model: Decoder, module: nn.Module) -> Decoder:
        """Make `model` an instance of this class in place, holding `module` (the trained part) as `model.<part>`;
        every parameter keeps its name and tensor."""
        setattr(model, cls.part, module)
        model.__class__ = cls
        return model

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache with room for `max_len` tokens per row after the P virtual ones."""
        return super().new_cache(batch_size, max_len + self.n_virtual_tokens)

    def starts_sequence(self, cache: KVCache | None, document_ids: torch.Tensor | None) -> bool:
        """True at a sequence's first forward (no cache, or an empty one): where the virtual tokens go in."""
        if cache is not None and cache.length > 0:
            return False
        if document_ids is not None:
            raise LlmkitError("document_ids (packed rows) do not combine with prompt or prefix tuning; "
                              "train on unpacked rows")
        return True


class PromptTuned(PromptLearning):
    """A Decoder whose sequences start with a trainable soft prompt (`soft_prompt`, P embeddings)."""

    part = "soft_prompt"
    soft_prompt: SoftPrompt

    def hidden_states(
        self, input_ids: torch.Tensor | None, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`Decoder.hidden_states` (B, T, C) of the tokens, computed after the soft prompt at a sequence's first
        forward (the prompt's own P positions are dropped); later forwards with a cache attend to it there."""
        if not self.starts_sequence(cache, document_ids):
            return super().hidden_states(input_ids, cache, attention_mask, document_ids, inputs_embeds)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x, attention_mask = self.soft_prompt.prepend(x, attention_mask)  # (B, P + T, C), (B, P + T)
        hidden = super().hidden_states(None, cache, attention_mask, document_ids, inputs_embeds=x)  # (B, P + T, C)
        return hidden[:, self.n_virtual_tokens:]  # (B, T, C): the caller's tokens


def apply_prompt_tuning(model: nn.Module, settings: PromptTuningSettings | None = None, tokenizer: Any = None) -> nn.Module:
    """Freeze the decoder and give it a trainable soft prompt of `settings.n_virtual_tokens` embeddings; in place
    (the model becomes a `PromptTuned`), returns it. `tokenizer` (with encode(text)) is needed for init='text'."""
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
    return PromptTuned.adopt(model, SoftPrompt(weight, settings))


def require_plain_decoder(model: nn.Module, method: str) -> None:
    """Prompt learning needs a llmkit Decoder without a soft prompt or prefix already.

    Raises:
        LlmkitError: `model` is not a Decoder, or already prompt- or prefix-tuned.
    """
    if isinstance(model, PromptLearning):
        raise LlmkitError(f"the model already has a soft prompt or a prefix; apply {method} to a fresh base model")
    if not isinstance(model, Decoder):
        raise LlmkitError(f"{method} needs an llmkit Decoder (a decoder-only model); {type(model).__name__} is not one")
