"""Decoder-only language model (GPT-2, Llama, Mistral, Qwen2, SmolLM2...), read top to bottom:

    tokens -> embedding (x sqrt(d), norm; + learned positions) -> n_layers x Block -> final norm -> LM head -> logits

Variants (norm, MLP, position scheme, biases, GQA, tied head) are `Config` fields.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.attention import AttentionContext, AttentionKernel, KVCache
from llmkit.nn.block import build_block
from llmkit.nn.linear import Linear, linear
from llmkit.nn.norm import build_norm
from llmkit.nn.position import alibi_bias, position_inputs, rope_cos_sin


class Decoder(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_norm = build_norm(config) if config.embed_norm else None  # BLOOM's word_embeddings_layernorm
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config)
        # A tied head reuses embed.weight (GPT-2, SmolLM2): one matrix, no copy to keep in sync.
        self.lm_head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        # Prompt learning (llmkit/peft) sets these: P trainable virtual tokens before every sequence; None otherwise.
        self.soft_prompt: nn.Module | None = None  # prompt tuning: P embeddings prepended to the input
        self.kv_prefix: nn.Module | None = None  # prefix tuning: P keys/values per layer that every query attends to
        for name, tensor in position_inputs(config).items():
            self.register_buffer(name, tensor, persistent=False)
        self.kernel: AttentionKernel = "sdpa"
        if self.embed.weight.is_meta:
            return  # shapes only (checkpoint loading assigns the real weights): nothing to initialise
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream's
                # variance does not grow with depth.
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        module = super()._apply(fn, recurse)
        self.reset_position_buffers()  # `model.to(torch.bfloat16)` must never round RoPE frequencies
        return module

    def reset_position_buffers(self) -> None:
        """Rebuild the position tables (derived from the config) in float32 on the weights' device."""
        for name, tensor in position_inputs(self.config).items():
            setattr(self, name, tensor.to(self.embed.weight.device))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_token_only: bool = False,
        document_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); (B, 1, vocab) with `last_token_only`; (N, vocab) with
        `logits_at`, a boolean (B, T) mask of the N positions whose logits are wanted (row by row).

        `attention_mask` (B, T) marks real tokens with 1 and left padding with 0. With a `cache`
        the new tokens are appended to it and attend to everything stored before them.
        `document_ids` (B, T) packs several documents in a row: each run of equal ids attends only to itself
        and counts positions from its first token (training without a cache).
        `logits_at` saves the LM head's work (a vocab-wide matmul per position) where a loss ignores positions,
        as supervised fine-tuning ignores the prompt.
        """
        x = self.hidden_states(input_ids, cache, attention_mask, document_ids)
        if last_token_only:
            x = x[:, -1:]
        if logits_at is not None:
            if logits_at.shape != x.shape[:2] or logits_at.dtype != torch.bool:
                raise LlmkitError(f"logits_at must be a boolean (batch, tokens) = {tuple(x.shape[:2])} mask; got "
                                  f"{logits_at.dtype} {tuple(logits_at.shape)}")
            x = x[logits_at]  # (N, C)
        return self.head(x)

    def hidden_states(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's output (B, T, C), before the final norm: `head` of any slice of it gives those logits
        (scoring computes the LM head only where a token is scored)."""
        B, T = input_ids.shape
        x = self.embed(input_ids)  # (B, T, C)
        n_virtual = 0
        if (self.soft_prompt is not None or self.kv_prefix is not None) and (cache is None or cache.length == 0):
            # Prompt learning acts at a sequence's first forward only: prefix tuning fills the cache's first P slots
            # with its keys/values; prompt tuning puts its P embeddings before the tokens (B, P + T, C).
            if document_ids is not None:
                raise LlmkitError("document_ids (packed rows) do not combine with prompt or prefix tuning; "
                                  "train on unpacked rows")
            if self.kv_prefix is not None:
                cache = self.kv_prefix.fill(cache if cache is not None else self.new_cache(B, T))
            if self.soft_prompt is not None:
                x, attention_mask = self.soft_prompt.prepend(x, attention_mask)
                n_virtual = x.shape[1] - T
        context = self._attention_context(B, x.shape[1], cache, attention_mask, input_ids.device, document_ids)
        if self.config.scale_embeddings:
            # Gemma: times sqrt(d_model), a factor first rounded to the embedding dtype as its checkpoints expect
            x = x * torch.tensor(self.config.d_model**0.5, dtype=x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(context.positions)
        for block in self.blocks:
            x = block(x, context)
        return x[:, n_virtual:]  # the caller's T tokens (prompt tuning's positions are not theirs)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of hidden states (..., C): final norm, then the LM head (tied or not)."""
        x = self.final_norm(x)
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)

    def _attention_context(
        self, B: int, T: int, cache: KVCache | None, attention_mask: torch.Tensor | None, device: torch.device,
        document_ids: torch.Tensor | None = None,
    ) -> AttentionContext:
        """Positions, rotary tables and the attention mask for T new tokens, built once per forward."""
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise LlmkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, tokens) = {(B, T)}")
        if document_ids is not None and (document_ids.shape != (B, T) or cache is not None):
            raise LlmkitError(f"document_ids must be (batch, tokens) = {(B, T)} without a KV cache (packed training "
                              f"rows); got shape {tuple(document_ids.shape)}" + (" with a cache" if cache else ""))
        if cache is not None:
            if cache.batch_size != B:
                raise LlmkitError(f"KV cache was made for batch size {cache.batch_size}, got a batch of {B}")
            start, end = cache.reserve(T, attention_mask)
            valid, padded = cache.valid[:, :end], cache.has_padding
        else:
            start, end = 0, T
            valid = attention_mask.bool() if attention_mask is not None else None
            padded = valid is not None and not bool(valid.all())
        if end > self.config.max_seq_len:
            raise LlmkitError(
                f"sequence of {end} tokens exceeds {self.config.name}'s context window of {self.config.max_seq_len}; "
                "shorten the input"
            )
        if padded:
            # Left padding: each row counts positions from its first real token.
            all_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        else:
            all_positions = torch.arange(end, device=device)[None]  # (1, S)
        documents = None
        if document_ids is not None:
            # Packed rows: each run of equal ids is one document whose positions restart at its first token.
            slots = torch.arange(T, device=device)
            first = torch.cat([torch.ones_like(document_ids[:, :1], dtype=torch.bool),
                               document_ids[:, 1:] != document_ids[:, :-1]], dim=1)  # (B, T) a document starts here
            documents = first.long().cumsum(-1)  # (B, T) run number, so a repeated id later is another document
            all_positions = slots - torch.where(first, slots, 0).cummax(-1).values  # (B, T) slot minus its start
        positions = all_positions[:, start:end]  # (B or 1, T)

        context = AttentionContext(positions=positions, cache=cache, start=start, kernel=self.kernel)
        dtype = self.embed.weight.dtype
        if self.config.position == "rope":
            context.cos, context.sin = rope_cos_sin(positions, self.inv_freq, dtype)

        needs_mask = padded or self.config.position == "alibi" or (start > 0 and T > 1) or documents is not None
        if not needs_mask:
            context.is_causal = T > 1  # start == 0 here, so queries and keys share slots
            return context
        query_slots = torch.arange(start, end, device=device)[:, None]  # (T, 1)
        key_slots = torch.arange(end, device=device)[None]  # (1, S)
        allowed = (key_slots <= query_slots)[None, None]  # (1, 1, T, S)
        if valid is not None:
            # Padding keys are hidden; a padding query still sees itself so no softmax row is empty.
            allowed = allowed & (valid[:, None, None, :] | (key_slots == query_slots)[None, None])
        if documents is not None:
            allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])  # (B, 1, T, S) block-diagonal
        if self.config.position == "alibi":
            bias = alibi_bias(self.alibi_slopes, positions.expand(B, T), all_positions.expand(B, end))
            context.mask = bias.masked_fill(~allowed, float("-inf")).to(dtype)  # (B, H, T, S)
        else:
            context.mask = allowed
        return context

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache on this model's device and dtype, with room for prompt learning's virtual tokens."""
        weight = self.embed.weight
        max_len += sum(module.n_tokens for module in (self.soft_prompt, self.kv_prefix) if module is not None)
        return KVCache(self.config, batch_size, max_len, weight.dtype, weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
