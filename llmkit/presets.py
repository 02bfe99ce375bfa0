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
_BERT = dict(
    arch="encoder", vocab_size=30522, max_seq_len=512, norm="layernorm", norm_eps=1e-12, mlp="gelu", qkv_bias=True,
    out_bias=True, mlp_bias=True, tie_embeddings=True, position="learned", type_vocab_size=2, post_norm=True, pad_id=0,
)
_T5 = dict(
    arch="seq2seq", vocab_size=32128, max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, position="relative",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, attention_scale=1.0, decoder_start_id=0,
    pad_id=0, eos_id=1,
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
    # mistralai/Mixtral-8x7B-v0.1: 8 SwiGLU experts per block, top-2 (46,702,792,704 parameters, 12.9B active)
    "mixtral-8x7b": dict(
        vocab_size=32000, n_layers=32, n_heads=32, n_kv_heads=8, d_model=4096, d_ff=14336, max_seq_len=32768,
        norm_eps=1e-5, rope_theta=1000000.0, bos_id=1, eos_id=2, n_experts=8, experts_per_token=2,
        router_aux_loss_coef=0.02, router_z_loss_coef=0.0,
    ),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": dict(
        vocab_size=151936, n_layers=24, n_heads=14, n_kv_heads=2, d_model=896, d_ff=4864, max_seq_len=32768,
        norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True, bos_id=151643, eos_id=151643,
    ),
    # bigscience/bloom-560m: ALiBi, a LayerNorm after the embedding, fused per-head q/k/v (559,214,592 parameters)
    "bloom-560m": dict(
        vocab_size=250880, n_layers=24, n_heads=16, d_model=1024, d_ff=4096, max_seq_len=2048, norm="layernorm",
        norm_eps=1e-5, mlp="gelu", gelu_approximate="tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=True, position="alibi", embed_norm=True, bos_id=1, eos_id=2,
    ),
    # microsoft/Phi-3-mini-4k-instruct (3,821,079,552 parameters). Its config.json pairs max_position_embeddings 4096
    # with sliding_window 2047; llmkit attends to the whole context, which equals the window up to 2,047 tokens.
    "phi-3-mini-4k": dict(
        vocab_size=32064, n_layers=32, n_heads=32, n_kv_heads=32, d_model=3072, d_ff=8192, max_seq_len=2047,
        norm_eps=1e-5, rope_theta=10000.0, bos_id=1, eos_id=32000,
    ),
    # google/gemma-2b: MQA with head_dim 256, GeGLU, embeddings times sqrt(d), RMSNorm (1 + w) (2,506,172,416 parameters)
    "gemma-2b": dict(
        vocab_size=256000, n_layers=18, n_heads=8, n_kv_heads=1, d_model=2048, head_dim=256, d_ff=16384,
        max_seq_len=8192, norm_eps=1e-6, mlp="geglu", gelu_approximate="tanh", rope_theta=10000.0,
        tie_embeddings=True, scale_embeddings=True, norm_offset=1.0, bos_id=2, eos_id=1,
    ),
    # stabilityai/stablelm-2-1_6b: LayerNorm with bias, q/k/v bias, RoPE on a quarter of each head (1,644,515,328 parameters)
    "stablelm-2-1.6b": dict(
        vocab_size=100352, n_layers=24, n_heads=32, n_kv_heads=32, d_model=2048, d_ff=5632, max_seq_len=4096,
        norm="layernorm", norm_eps=1e-5, qkv_bias=True, rope_theta=10000.0, rope_fraction=0.25, bos_id=100257,
        eos_id=100257,
    ),
    # llmkit's own small Llama-style model: `llmkit pretrain`'s default (3.4M parameters with a 2,048-token vocabulary)
    "mini": dict(vocab_size=2048, n_layers=4, n_heads=8, n_kv_heads=4, d_model=256, d_ff=688, max_seq_len=256,
                 tie_embeddings=True, bos_id=None, eos_id=0),
    # google-bert/bert-base-uncased (Encoder: 108,891,648 parameters; 109,482,240 with BertModel's pooler)
    "bert-base-uncased": dict(_BERT, n_layers=12, n_heads=12, d_model=768, d_ff=3072),
    # sentence-transformers/all-MiniLM-L6-v2 (Encoder: 22,565,376 parameters; 22,713,216 with the pooler)
    "all-minilm-l6-v2": dict(_BERT, n_layers=6, n_heads=12, d_model=384, d_ff=1536),
    # llmkit's own small BERT-style encoder: `llmkit pretrain --arch encoder`'s default (masked LM)
    "mini-bert": dict(_BERT, vocab_size=2048, n_layers=4, n_heads=4, d_model=256, d_ff=1024, max_seq_len=256,
                      pad_id=None, eos_id=0),
    # google-t5/t5-small: T5 v1.0, ReLU, head tied and rescaled (Seq2Seq: 60,506,624 parameters)
    "t5-small": dict(_T5, n_layers=6, n_heads=8, d_model=512, head_dim=64, d_ff=2048, mlp="relu", tie_embeddings=True,
                     scale_decoder_outputs=True),
    # google/flan-t5-small: T5 v1.1, gated GELU, untied head (Seq2Seq: 76,961,152 parameters)
    "flan-t5-small": dict(_T5, n_layers=8, n_heads=6, d_model=512, head_dim=64, d_ff=1024, mlp="geglu",
                          gelu_approximate="tanh", tie_embeddings=False),
    # llmkit's own small T5 v1.1-style model: `llmkit pretrain --arch seq2seq`'s default (span corruption)
    "mini-t5": dict(_T5, vocab_size=2048, n_layers=4, n_heads=4, d_model=256, head_dim=64, d_ff=672, mlp="geglu",
                    gelu_approximate="tanh", tie_embeddings=False, max_seq_len=256, pad_id=None, eos_id=0,
                    decoder_start_id=0),
    # tiny shapes for tests and quick experiments
    "tiny-llama": dict(vocab_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=128, max_seq_len=256),
    "tiny-moe": dict(vocab_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=128, max_seq_len=256,
                     n_experts=4),  # top-2 (experts_per_token's default for the topk router)
    "tiny-gpt2": dict(_GPT2, vocab_size=256, n_layers=2, n_heads=4, d_model=64, max_seq_len=256, bos_id=None, eos_id=None),
    "tiny-bert": dict(_BERT, vocab_size=256, n_layers=2, n_heads=4, d_model=64, d_ff=256, max_seq_len=256, pad_id=None),
}
