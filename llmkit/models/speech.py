"""Speech recognition encoder-decoder (Whisper, Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
Supervision"), read top to bottom:

    log-mel frames (B, n_mels, 2 A) -> conv1d k3 + GELU -> conv1d k3 stride 2 + GELU -> (B, A, C)
        + sinusoidal positions -> n_layers x Block (pre-norm, bidirectional self-attention) -> LayerNorm = audio states
    text ids (B, T) -> token embedding + learned positions -> n_decoder_layers x CrossAttentionBlock (causal
        self-attention, then attention over the audio states) -> LayerNorm -> LM head tied to the embedding -> logits

A = `config.n_audio_ctx` audio positions (Whisper: 1500 = 30 s at 100 frames/s, halved by the stride-2 conv).
The encoder's positions are fixed sinusoids, sin(t / 10000^(i / (C/2 - 1))) in the first C/2 channels and cos in
the rest (Whisper's `sinusoids`), kept as a buffer so a checkpoint carries them. Whisper's other choices are `Config`
fields: LayerNorm, GELU (exact) MLP, biases on q, v, o and the MLP. Whisper's key projections have no bias; llmkit's
`Attention` gives q, k and v one `qkv_bias` switch, so imported models hold a zero key bias -- harmless, since a
bias on keys adds q.b to every score of a query alike, which the softmax removes.

Generation (`llmkit.generate.seq2seq.generate_seq2seq`) runs `encode` and `encoder_keys_values` once, then `decode`
one token per step with a self-attention KV cache, as for T5.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.attention import AttentionContext, AttentionKernel, KVCache, causal_context
from llmkit.nn.block import build_block, build_cross_attention_block
from llmkit.nn.linear import Linear, linear
from llmkit.nn.norm import build_norm

KeysValues = tuple[torch.Tensor, torch.Tensor]  # (B, Hkv, A, D) each


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's encoder positions (length, channels): sin(t * w_i) then cos(t * w_i), w_i = max_timescale^(-i /
    (channels/2 - 1)), i = 0..channels/2-1."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))  # (C/2,)
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, C/2)
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class AudioEncoder(nn.Module):
    """Convolutional stem (2x down-sampling in time), fixed positions, a bidirectional transformer stack."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(config.n_mels, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(config.n_audio_ctx, config.d_model))  # (A, C), in checkpoints
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config)

    def forward(self, features: torch.Tensor, kernel: AttentionKernel) -> torch.Tensor:
        """Audio states (B, A, C) of log-mel features (B, n_mels, 2 A)."""
        x = F.gelu(self.conv1(features))  # (B, C, 2A)
        x = F.gelu(self.conv2(x))  # (B, C, A)
        x = x.transpose(1, 2) + self.positions.to(x.dtype)  # (B, A, C)
        context = AttentionContext(kernel=kernel)  # every frame attends to every frame
        for block in self.blocks:
            x = block(x, context)
        return self.final_norm(x)


class TextDecoder(nn.Module):
    """Causal stack over text tokens with learned positions, each layer also attending to the audio states."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = dataclasses.replace(config, n_layers=config.n_decoder_layers)  # the shape its cache takes
        self.positions = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(build_cross_attention_block(config, i) for i in range(config.n_decoder_layers))
        self.final_norm = build_norm(config)

    def forward(self, x: torch.Tensor, encoder_keys_values: list[KeysValues], cache: KVCache | None,
                kernel: AttentionKernel) -> torch.Tensor:
        """Decoder states (B, T, C) of embedded tokens x (B, T, C); with a `cache` they follow the tokens in it."""
        B, T, _ = x.shape
        context = causal_context(self.config, B, T, cache, dtype=x.dtype, device=x.device, kernel=kernel)
        x = x + self.positions(context.positions)  # (B, T, C); positions (1, T) count on from the cache
        cross_context = AttentionContext(kernel=kernel)  # every token sees every audio position
        for block, keys_values in zip(self.blocks, encoder_keys_values, strict=True):
            x = block(x, context, cross_context, keys_values)
        return self.final_norm(x)


class SpeechModel(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "speech":
            raise LlmkitError(f"config {config.name!r} has arch={config.arch!r}; SpeechModel needs arch='speech' (a "
                              "Whisper-style config)")
        self.config = config
        self.encoder = AudioEncoder(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)  # the decoder's tokens (and the tied head)
        self.decoder = TextDecoder(config)
        self.lm_head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.kernel: AttentionKernel = "sdpa"
        if not self.embed.weight.is_meta:  # meta: shapes only, checkpoint loading assigns the weights
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Whisper's initialisation as transformers does it: linear and embedding weights normal(0, 0.02), biases 0,
        norms 1 and 0; the convolutions keep PyTorch's default (Kaiming uniform)."""
        for name, parameter in self.named_parameters():
            if name.startswith(("encoder.conv1", "encoder.conv2")):
                continue
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif "norm" in name.rsplit(".", 2)[-2]:
                nn.init.ones_(parameter)
            else:
                nn.init.normal_(parameter, std=0.02)
        self.encoder.positions.copy_(sinusoids(self.config.n_audio_ctx, self.config.d_model))

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for log-mel features (B, n_mels, frames) and decoder input ids (B, T) (teacher
        forcing: the targets shifted right after `decoder_start_id`). `attention_mask` must be None: Whisper pads
        audio with silence and attends to all of it."""
        if attention_mask is not None:
            raise LlmkitError("SpeechModel takes no attention_mask: pad the audio (silence) to the model's frames")
        return self.decode(decoder_input_ids, self.encoder_keys_values(self.encode(input_features)))

    def encode(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Audio states (B, A, C) of log-mel features (B, n_mels, 2 A) (`attention_mask` must be None)."""
        c = self.config
        expected = (c.n_mels, 2 * c.n_audio_ctx)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise LlmkitError(f"input_features has shape {tuple(input_features.shape)}; {c.name} expects (batch, "
                              f"n_mels, frames) = (batch, {expected[0]}, {expected[1]}): compute them with "
                              f"llmkit.data.audio.log_mel_spectrogram(n_mels={expected[0]}, n_frames={expected[1]})")
        if attention_mask is not None:
            raise LlmkitError("SpeechModel takes no attention_mask: pad the audio (silence) to the model's frames")
        return self.encoder(input_features.to(self.embed.weight.dtype), self.kernel)

    def encoder_keys_values(self, encoder_states: torch.Tensor) -> list[KeysValues]:
        """Every decoder layer's cross-attention keys and values of the audio states, projected once."""
        return [block.cross_attn.project_keys_values(encoder_states) for block in self.decoder.blocks]

    def decode(self, decoder_input_ids: torch.Tensor, encoder_keys_values: list[KeysValues],
               attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of decoder input ids (B, T) given the audio keys/values; with a `cache` the new tokens
        follow the ones already decoded into it (`attention_mask` is unused: audio has no padding mask)."""
        ids = decoder_input_ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise LlmkitError(f"decoder_input_ids has shape {tuple(ids.shape)}; expected (batch, tokens) with at least "
                              "one token")
        x = self.decoder(self.embed(ids), encoder_keys_values, cache, self.kernel)  # (B, T, C)
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention KV cache for the decoder, on this model's device and dtype."""
        weight = self.embed.weight
        return KVCache(self.decoder.config, batch_size, max_len, weight.dtype, weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
