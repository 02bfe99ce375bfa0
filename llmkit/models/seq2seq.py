"""Encoder-decoder transformer (T5, Raffel et al. 2020), read top to bottom:

    source ids -> embedding -> n_layers x Block (bidirectional self-attention) -> final norm = encoder states
    target ids -> embedding -> n_decoder_layers x CrossAttentionBlock (causal self-attention, then attention over
                  the encoder states) -> final norm (x d_model**-0.5 in T5 v1.0) -> LM head -> logits

T5's choices are `Config` fields: RMSNorm without bias (T5LayerNorm); no 1/sqrt(d) score scaling
(attention_scale=1.0, folded into the query init); a bucketed relative position bias instead of position
embeddings, computed once per stack and shared by its layers (bidirectional in the encoder, causal in the
decoder); a ReLU (v1.0) or gated-GELU (v1.1, FLAN-T5) feed-forward layer; a tied (v1.0, rescaled) or untied
(v1.1) LM head. The token embedding is shared by the encoder, the decoder and (when tied) the head.

Generation (`llmkit.generate.seq2seq.generate_seq2seq`) runs `encode` and `encoder_keys_values` once, then
`decode` one token per step with a self-attention KV cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.attention import AttentionContext, AttentionKernel, KVCache
from llmkit.nn.block import build_block, build_cross_attention_block
from llmkit.nn.linear import Linear, linear
from llmkit.nn.norm import build_norm
from llmkit.nn.position import RelativePositionBias

KeysValues = tuple[torch.Tensor, torch.Tensor]  # (B, Hkv, S, D) each


def _relative_bias(config: Config, bidirectional: bool) -> RelativePositionBias:
    return RelativePositionBias(config.n_heads, config.relative_attention_num_buckets,
                                config.relative_attention_max_distance, bidirectional)


class Seq2SeqEncoder(nn.Module):
    """Bidirectional stack: every source token attends to every real (non-padding) source token."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.relative_bias = _relative_bias(config, bidirectional=True)
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, kernel: AttentionKernel) -> torch.Tensor:
        """Encoder states (B, S, C) of embedded source tokens x (B, S, C); `attention_mask` (B, S) 1 = real."""
        positions = torch.arange(x.shape[1], device=x.device)  # slot indices: padding moves no real token's distance
        bias = self.relative_bias(positions, positions)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))  # (B, H, S, S)
        context = AttentionContext(mask=bias.to(x.dtype), kernel=kernel)
        for block in self.blocks:
            x = block(x, context)
        return self.final_norm(x)


class Seq2SeqDecoder(nn.Module):
    """Causal stack over target tokens, each layer also attending to the encoder states."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.relative_bias = _relative_bias(config, bidirectional=False)
        self.blocks = nn.ModuleList(build_cross_attention_block(config, i) for i in range(config.n_decoder_layers))
        self.final_norm = build_norm(config)

    def forward(
        self,
        x: torch.Tensor,
        encoder_keys_values: list[KeysValues],
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        kernel: AttentionKernel,
    ) -> torch.Tensor:
        """Decoder states (B, T, C) of embedded target tokens x (B, T, C). With a `cache` the T tokens follow the
        ones stored in it; `attention_mask` (B, S) marks the encoder's real tokens."""
        T = x.shape[1]
        start = cache.reserve(T, None)[0] if cache is not None else 0
        queries = torch.arange(start, start + T, device=x.device)  # (T,) positions of the new tokens
        keys = torch.arange(start + T, device=x.device)  # (S,) every position stored so far
        bias = self.relative_bias(queries, keys)  # (1, H, T, S)
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        context = AttentionContext(mask=bias.masked_fill(~causal, float("-inf")).to(x.dtype), cache=cache, start=start,
                                   kernel=kernel)
        # Cross-attention: no position bias (T5), only the encoder's padding hidden.
        cross_mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, S)
        cross_context = AttentionContext(mask=cross_mask, kernel=kernel)
        for block, keys_values in zip(self.blocks, encoder_keys_values, strict=True):
            x = block(x, context, cross_context, keys_values)
        return self.final_norm(x)


class Seq2Seq(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "seq2seq":
            raise LlmkitError(f"config {config.name!r} has arch={config.arch!r}; Seq2Seq needs arch='seq2seq' "
                              "(a T5-style config, e.g. Config.from_name('mini-t5'))")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)  # shared by encoder, decoder (and tied head)
        self.encoder = Seq2SeqEncoder(config)
        self.decoder = Seq2SeqDecoder(config)
        self.lm_head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.kernel: AttentionKernel = "sdpa"
        if not self.embed.weight.is_meta:  # meta: shapes only, checkpoint loading assigns the weights
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's initialisation (Mesh TensorFlow, as transformers does it): normal with std 1/sqrt(fan-in), the query
        also by 1/sqrt(head_dim) -- this is where the missing score scaling went. Norm scales start at 1."""
        c = self.config
        nn.init.normal_(self.embed.weight, std=1.0)
        fan_in = {"q_proj": c.d_model * c.head_dim, "k_proj": c.d_model, "v_proj": c.d_model, "o_proj": c.q_dim,
                  "gate_proj": c.d_model, "up_proj": c.d_model, "down_proj": c.d_ff, "relative_bias": c.d_model,
                  "lm_head": c.d_model}
        for name, parameter in self.named_parameters():
            module = name.rsplit(".", 2)[-2]
            if name.endswith(".weight") and module in fan_in:
                nn.init.normal_(parameter, std=fan_in[module] ** -0.5)

    def forward(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for source ids (B, S) and decoder input ids (B, T) (teacher forcing: the targets
        shifted right after `decoder_start_id`). `attention_mask` (B, S) marks real source tokens with 1."""
        encoder_states = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.encoder_keys_values(encoder_states), attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states (B, S, C) of source ids (B, S)."""
        self._check_ids(input_ids, "input_ids")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise LlmkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected the shape of "
                                  f"input_ids, {tuple(input_ids.shape)}")
            if not bool(attention_mask.bool().any(dim=1).all()):
                raise LlmkitError("a row of attention_mask is all zeros: a source sequence with no real token has "
                                  "nothing to attend to; remove empty rows from the batch")
        return self.encoder(self.embed(input_ids), attention_mask, self.kernel)  # (B, S, C)

    def encoder_keys_values(self, encoder_states: torch.Tensor) -> list[KeysValues]:
        """Every decoder layer's cross-attention keys and values of the encoder states, projected once (generation
        reuses them at every step)."""
        return [block.cross_attn.project_keys_values(encoder_states) for block in self.decoder.blocks]

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_keys_values: list[KeysValues],
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of decoder input ids (B, T) given the encoder's keys/values (`encoder_keys_values`);
        with a `cache` the new tokens follow the ones already decoded into it."""
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        if cache is not None and cache.batch_size != decoder_input_ids.shape[0]:
            raise LlmkitError(f"KV cache was made for batch size {cache.batch_size}, got a batch of "
                              f"{decoder_input_ids.shape[0]}")
        x = self.embed(decoder_input_ids)  # (B, T, C)
        x = self.decoder(x, encoder_keys_values, attention_mask, cache, self.kernel)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of final decoder states (..., C). A tied T5 v1.0 head first rescales by d_model**-0.5,
        so the embedding (std 1) serves as input table and output layer alike."""
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention KV cache for the decoder, on this model's device and dtype."""
        weight = self.embed.weight
        decoder_shape = dataclasses.replace(self.config, n_layers=self.config.n_decoder_layers)
        return KVCache(decoder_shape, batch_size, max_len, weight.dtype, weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise LlmkitError(f"{name} has shape {tuple(ids.shape)}; expected (batch, tokens) with at least one token")
