"""Named model shapes. Each preset cites the Hugging Face `config.json` it was read from."""

from __future__ import annotations

from typing import Any

_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, norm="layernorm", norm_eps=1e-5, mlp="gelu", gelu_approximate="tanh",
    qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, position="learned", bos_id=50256, eos_id=50256,
)
_SMOLLM2 = dict(
    vocab_size=49152, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", tie_embeddings=True,
    position="rope", rope_theta=100000.0, bos_id=1, eos_id=2,
)

PRESETS: dict[str, dict[str, Any]] = {
    # openai-community/gpt2, gpt2-medium, gpt2-large, gpt2-xl
    "gpt2": dict(_GPT2, n_layers=12, n_heads=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layers=24, n_heads=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layers=36, n_heads=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layers=48, n_heads=25, d_model=1600),
    # HuggingFaceTB/SmolLM2-135M(-Instruct), -360M, -1.7B
    "smollm2-135m": dict(_SMOLLM2, n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_ff=1536),
    "smollm2-360m": dict(_SMOLLM2, n_layers=32, n_heads=15, n_kv_heads=5, d_model=960, d_ff=2560),
    "smollm2-1.7b": dict(_SMOLLM2, n_layers=24, n_heads=32, n_kv_heads=32, d_model=2048, d_ff=8192, rope_theta=130000.0),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama-1.1b": dict(
        vocab_size=32000, n_layers=22, n_heads=32, n_kv_heads=4, d_model=2048, d_ff=5632, max_seq_len=2048,
        norm_eps=1e-5, rope_theta=10000.0, bos_id=1, eos_id=2,
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(
        vocab_size=128256, n_layers=16, n_heads=32, n_kv_heads=8, d_model=2048, d_ff=8192, max_seq_len=131072,
        norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True, bos_id=128000, eos_id=128001,
        rope_scaling=dict(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_seq_len=8192),
    ),
    # mistralai/Mistral-7B-v0.3
    "mistral-7b": dict(
        vocab_size=32768, n_layers=32, n_heads=32, n_kv_heads=8, d_model=4096, d_ff=14336, max_seq_len=32768,
        norm_eps=1e-5, rope_theta=1000000.0, bos_id=1, eos_id=2,
    ),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": dict(
        vocab_size=151936, n_layers=24, n_heads=14, n_kv_heads=2, d_model=896, d_ff=4864, max_seq_len=32768,
        norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True, bos_id=151643, eos_id=151643,
    ),
    # llmkit's own small Llama-style model: `llmkit pretrain`'s default (3.4M parameters with a 2,048-token vocabulary)
    "mini": dict(vocab_size=2048, n_layers=4, n_heads=8, n_kv_heads=4, d_model=256, d_ff=688, max_seq_len=256,
                 tie_embeddings=True, bos_id=None, eos_id=0),
    # tiny shapes for tests and quick experiments
    "tiny-llama": dict(vocab_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=128, max_seq_len=256),
    "tiny-gpt2": dict(_GPT2, vocab_size=256, n_layers=2, n_heads=4, d_model=64, max_seq_len=256, bos_id=None, eos_id=None),
}
