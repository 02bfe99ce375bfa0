"""Decoder-only language model (GPT-2, Llama, Mistral, Qwen2, SmolLM2...), read top to bottom:

    tokens -> embedding (x sqrt(d), norm; + learned positions) -> n_layers x Block -> final norm -> LM head -> logits

Gemma 3's local (sliding-window) and global layers share one context: each Attention takes the part for its kind.

Variants (norm, MLP, position scheme, biases, GQA, tied head) are `Config` fields; the mask, positions and cache slots
of a forward come from `causal_context` (nn/attention.py). Fine-tuning methods change the model from outside
(llmkit/peft): LoRA and IA3 swap linears; prompt and prefix tuning subclass it, through `inputs_embeds` and the cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.attention import AttentionKernel, KVCache, causal_context
from llmkit.nn.block import build_block
from llmkit.nn.linear import Linear, PackedWeight, linear
from llmkit.nn.mixers import MixerCache
from llmkit.nn.norm import build_norm
from llmkit.nn.position import position_inputs


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
        self.head_packed: PackedWeight | None = None  # oneDNN copy of a tied bf16 head (llmkit.nn.fused, inference)
        self.onednn_prompts = False  # a tied head's many-row products on oneDNN (llmkit.nn.fused.use_onednn_for_prompts)
        # Position tables follow from the config, so checkpoints leave them out; None where the scheme has none.
        tables = position_inputs(config)
        self.register_buffer("inv_freq", tables.get("inv_freq"), persistent=False)  # RoPE speeds (rope_dim / 2,)
        self.register_buffer("local_inv_freq", tables.get("local_inv_freq"), persistent=False)  # sliding-window layers'
        self.register_buffer("alibi_slopes", tables.get("alibi_slopes"), persistent=False)  # ALiBi (n_heads,)
        self.kernel: AttentionKernel = "sdpa"
        # The KV cache's dtype when it differs from the activations' (None: the same): a bfloat16 cache halves the
        # bytes each decode step reads and holds; attention then runs in bfloat16 on GPUs and on CPUs with
        # AVX512-BF16/AMX (2-3x faster than float32 there), over the values widened to float32 on other CPUs
        # (nn.attention.FAST_HALF_ATTENTION_ON_CPU; float16 likewise, in float16 only with AMX-FP16). llama.cpp keeps
        # its cache in float16 by default.
        self.kv_dtype: torch.dtype | None = None
        if not self.embed.weight.is_meta:  # meta = shapes only: checkpoint loading assigns the real weights
            self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights and zero biases, then the residual projections (o_proj, down_proj) drawn
        again with std 0.02 / sqrt(2 * n_layers), so the residual stream's variance does not grow with depth."""
        self.apply(self._normal_init)
        for name, parameter in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))
        for module in self.modules():  # Hyena's filter network and Mamba's dt/A/D keep their papers' init
            if hasattr(module, "reset_mixer_parameters"):
                module.reset_mixer_parameters()

    @staticmethod
    def _normal_init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        module = super()._apply(fn, recurse)
        self.reset_position_buffers()  # `model.to(torch.bfloat16)` must never round RoPE frequencies
        return module

    def reset_position_buffers(self) -> None:
        """Rebuild the position tables (derived from the config) in float32 on the weights' device."""
        for name, tensor in position_inputs(self.config).items():
            setattr(self, name, tensor.to(self.activation_dtype_device()[1]))

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
        self, input_ids: torch.Tensor | None, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's output (B, T, C), before the final norm: `head` of any slice of it gives those logits
        (scoring computes the LM head only where a token is scored). `inputs_embeds` (B, T, C) stands in for
        `embed(input_ids)`: prompt tuning passes its soft prompt's embeddings before the tokens' this way."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if document_ids is not None and self.config.recurrent_layers:
            raise LlmkitError(f"{self.config.name}: packed rows (document_ids) need attention's block-diagonal mask; "
                              f"mixer {self.config.layer_mixers[self.config.recurrent_layers[0]]!r} carries state "
                              "across documents: train on unpacked rows")
        context = causal_context(self.config, B, T, cache, attention_mask, document_ids, inv_freq=self.inv_freq,
                                 local_inv_freq=self.local_inv_freq, alibi_slopes=self.alibi_slopes,
                                 dtype=self.activation_dtype_device()[0], device=x.device, kernel=self.kernel)
        if self.config.scale_embeddings:
            # Gemma: times sqrt(d_model), a factor first rounded to the embedding dtype as its checkpoints expect
            x = x * torch.tensor(self.config.d_model**0.5, dtype=x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(context.positions)
        for block in self.blocks:
            x = block(x, context)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of hidden states (..., C): final norm, then the LM head (tied or not)."""
        x = self.final_norm(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return linear(x, self.embed.weight, packed=self.head_packed, onednn_prompts=self.onednn_prompts)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for `max_len` tokens per row, on this model's device and in `kv_dtype` (default: the
        activations' dtype); a `MixerCache` (recurrent states for Hyena / RetNet / Mamba layers, kept in the
        activations' dtype) when the model has such layers."""
        if self.config.recurrent_layers:
            return MixerCache(self.config, batch_size, max_len, *self.activation_dtype_device())
        return KVCache(self.config, batch_size, max_len, *self.kv_cache_dtype_device())

    def kv_cache_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype (`kv_dtype`, else the activations') and device of this model's KV caches."""
        dtype, device = self.activation_dtype_device()
        return self.kv_dtype or dtype, device

    def activation_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device activations (and the KV cache) take: those of the token embedding's float table, or,
        where a transformation swapped in an embedding without one (llmkit.quant's QuantEmbedding keeps its table
        packed), the `dtype` and `device` that module declares."""
        weight = getattr(self.embed, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.dtype, weight.device
        return self.embed.dtype, self.embed.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

