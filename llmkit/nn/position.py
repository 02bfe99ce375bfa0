"""Position information: rotary embeddings (RoPE, Su et al. 2021) with linear / Llama-3 scaling,
ALiBi linear attention biases (Press et al. 2022) and T5's bucketed relative position bias (Raffel et al.
2020). Learned absolute positions are a plain `nn.Embedding` in the decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config, RopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Per-pair rotation speeds 1 / theta^(2i/d), rescaled for long contexts when asked. Shape (head_dim/2,)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for integer `positions` (B, T), each (B, 1, T, head_dim), in float32 math."""
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + R/2) of x (B, H, T, D) by the position angle (the "rotate half" layout), where
    R = cos.shape[-1]; with partial rotary (R < D, StableLM) channels R.. pass through unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head-specific slopes m_h = 2^(-8h/n), with the paper's interleaving when n is not a power of two."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Additive attention bias -m_h * (q - k) for queries (B, T) and keys (B, S). Shape (B, H, T, S)."""
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]  # (B, 1, T, S)
    return -slopes.to(distance.device)[None, :, None, None] * distance.float()


def relative_position_buckets(
    relative_positions: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key - query distance: exact buckets for small distances, logarithmic ones up to
    `max_distance`, the last bucket beyond. Bidirectional (encoder) keeps half the buckets for keys after the
    query; causal (decoder) only sees keys at or before it. Same integer shape, values in [0, num_buckets)."""
    buckets = torch.zeros_like(relative_positions)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_positions > 0).long() * num_buckets
        distance = relative_positions.abs()
    else:
        distance = -relative_positions.clamp(max=0)  # >= 0: how far back the key is
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # the same float32 arithmetic as Mesh TensorFlow / transformers, so every distance lands in the same bucket
    logarithmic = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    logarithmic = logarithmic.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, logarithmic)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention scores (T5). Computed once per forward
    and shared by every layer (Hugging Face stores the table in the first layer's attention)."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_buckets, n_heads))  # (buckets, H)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias (1, H, T, S) for integer query positions (T,) and key positions (S,)."""
        relative = key_positions[None, :] - query_positions[:, None]  # (T, S)
        buckets = relative_position_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)


def position_inputs(config: Config) -> dict[str, torch.Tensor]:
    """Buffers a decoder needs for its position scheme (inverse frequencies or ALiBi slopes). Sliding-window layers
    with their own RoPE base (Gemma 3: 10k locally, 1M globally) get a second, unscaled table, `local_inv_freq`."""
    if config.position == "rope":
        tables = {"inv_freq": rope_inverse_frequencies(config.rope_dim, config.rope_theta, config.rope_scaling)}
        if config.local_layers and config.rope_local_theta is not None:
            tables["local_inv_freq"] = rope_inverse_frequencies(config.rope_dim, config.rope_local_theta)
        return tables
    if config.position == "alibi":
        return {"alibi_slopes": alibi_slopes(config.n_heads)}
    return {}
