"""Sizes computed from a Config alone (no weights): parameter count and KV-cache memory."""

from __future__ import annotations

from llmkit.config import Config


def count_parameters(config: Config) -> int:
    """Exact parameter count of `Decoder(config)`, from the shapes alone."""
    d = config.d_model
    norm = d * (2 if config.norm == "layernorm" else 1)
    attention = d * config.q_dim + 2 * d * config.kv_dim + config.q_dim * d
    if config.qkv_bias:
        attention += config.q_dim + 2 * config.kv_dim
    if config.out_bias:
        attention += d
    n_mlp_in = 2 if config.mlp == "swiglu" else 1
    mlp = (n_mlp_in + 1) * d * config.d_ff
    if config.mlp_bias:
        mlp += n_mlp_in * config.d_ff + d
    block = attention + mlp + 2 * norm
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    positions = config.max_seq_len * d if config.position == "learned" else 0
    return embeddings + positions + config.n_layers * block + norm


def kv_cache_bytes(config: Config, batch_size: int, n_tokens: int, bytes_per_value: float = 2) -> int:
    """Memory of the keys and values of every layer for `n_tokens` tokens of `batch_size` sequences."""
    return int(2 * config.n_layers * batch_size * n_tokens * config.kv_dim * bytes_per_value)
