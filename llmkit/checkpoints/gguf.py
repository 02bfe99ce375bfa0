"""Read GGUF files (llama.cpp's format) into an llmkit `Config` and llmkit-named state dict.

A GGUF file holds metadata key/values ("llama.block_count" = 30, ...) and tensors. Tensor dims are
listed innermost first (ggml's `ne`), so numpy order is the reverse: (out, in) for a linear weight.
Quantized tensors are rows of fixed-size blocks (Q8_0: 32 int8 values + one fp16 scale, y = d * q;
Q4_1: 32 4-bit values + scale and minimum, y = d * q + m; K-quants: 256-value super-blocks); the
`gguf` package dequantizes them, whole tensors at once, in numpy. llmkit reads the header itself
(llmkit.gguf_file: gguf's reader took ~25 s over Gemma 3's 262k-token vocabulary).

llama.cpp's converter reorders the rows of each Q and K head of llama-architecture models from the
Hugging Face "rotate half" layout (channel i pairs with i + D/2) to interleaved pairs (2i, 2i + 1),
the layout its RoPE kernel rotates; `unpermute_rows` undoes it so llmkit's RoPE sees HF order.

Gemma 3 (`gemma3`): llama.cpp's converter stores each RMSNorm weight as (1 + w), the scale Gemma applies; llmkit
keeps Gemma's w (norm_offset 1.0, as in its Hugging Face checkpoints), so 1 is taken off again at load. Facts the
file leaves out are llama.cpp's constants for the architecture (GEMMA3_* below).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.quants import dequantize
from tqdm import tqdm

from llmkit.checkpoints.hf_config import build_config
from llmkit.config import Config, RopeScaling
from llmkit.errors import LlmkitError
from llmkit.gguf_file import GgufFile, GgufTensor
from llmkit.models.decoder import Decoder
from llmkit.nn.position import rope_inverse_frequencies

# --- metadata keys (architecture-specific ones are prefixed with "{architecture}.")
ARCHITECTURE_KEY = "general.architecture"
MODEL_NAME_KEY = "general.name"
TOKENS_KEY = "tokenizer.ggml.tokens"
BOS_KEY = "tokenizer.ggml.bos_token_id"
EOS_KEY = "tokenizer.ggml.eos_token_id"
BLOCK_COUNT_KEY = "block_count"
CONTEXT_LENGTH_KEY = "context_length"
EMBEDDING_LENGTH_KEY = "embedding_length"
FEED_FORWARD_LENGTH_KEY = "feed_forward_length"
HEAD_COUNT_KEY = "attention.head_count"
HEAD_COUNT_KV_KEY = "attention.head_count_kv"
KEY_LENGTH_KEY = "attention.key_length"
RMS_EPSILON_KEY = "attention.layer_norm_rms_epsilon"
VOCAB_SIZE_KEY = "vocab_size"
ROPE_BASE_KEY = "rope.freq_base"
ROPE_DIMENSIONS_KEY = "rope.dimension_count"
ROPE_SCALING_TYPE_KEY = "rope.scaling.type"
ROPE_SCALING_FACTOR_KEY = "rope.scaling.factor"
ROPE_SCALE_LINEAR_KEY = "rope.scale_linear"  # older files: a bare linear factor
ROPE_ORIGINAL_CONTEXT_KEY = "rope.scaling.original_context_length"
SLIDING_WINDOW_KEY = "attention.sliding_window"

# --- tensor names
OUTPUT_TENSOR = "output.weight"  # absent when the LM head is tied to token_embd
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # Llama 3.1+: per-frequency divisors of the RoPE speeds
GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Gemma 3: QK-norm and the norms on each sublayer's output
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_mlp_norm",
}
SUPPORTED_TYPES = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, IQ and TQ types"
# Llama 3 RoPE recipe constants that llama.cpp bakes into rope_freqs.weight without storing them
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192
# Gemma 3 facts llama.cpp hard-codes instead of storing (src/llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer is
# global, the others local; local RoPE base 10k; attention scale 1/sqrt(head_dim), except 27B's 1/sqrt(d_model/heads)
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
GEMMA3_27B_LAYERS = 62


@dataclass(frozen=True)
class Architecture:
    """What differs between GGUF architectures that map onto llmkit's Decoder."""

    permuted_qk: bool  # llama.cpp interleaved the Q/K rows (llama) or kept HF order (qwen2, gemma3: NEOX rope)
    norm_offset: float = 0.0  # the converter stored RMSNorm weights as (norm_offset + w) (Gemma: 1)


ARCHITECTURES = {"llama": Architecture(permuted_qk=True), "qwen2": Architecture(permuted_qk=False),
                 "gemma3": Architecture(permuted_qk=False, norm_offset=1.0)}


def open_gguf(path: str | Path) -> GgufFile:
    """Memory-map a GGUF file; a missing, foreign, truncated or corrupt file becomes one `LlmkitError`."""
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"GGUF file {path} does not exist; check the path (or pass a Hugging Face/llmkit directory)")
    if not path.is_file():
        raise LlmkitError(f"{path} is not a file; pass the .gguf file itself")
    try:
        return GgufFile(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as error:
        raise LlmkitError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); it is truncated, corrupt or not "
            "GGUF at all: re-download it"
        ) from None


def _source(reader: GgufFile) -> Path:
    return reader.path


def _metadata(reader: GgufFile, key: str, default: Any = ...) -> Any:
    """One metadata value; a missing required key names the file and the key."""
    if key not in reader.fields:
        if default is ...:
            raise LlmkitError(
                f"{_source(reader)} has no metadata key {key!r}; the file is incomplete: re-convert it with "
                "llama.cpp's convert_hf_to_gguf.py or re-download it"
            )
        return default
    return reader.fields[key]


def _float(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _bad_type(reader: GgufFile, key: str, value: Any, wanted: str) -> LlmkitError:
    return LlmkitError(f"{_source(reader)}: metadata {key}={value!r} is a {type(value).__name__}, but it must be "
                       f"{wanted}; the file was written by a broken converter: re-convert it with llama.cpp's "
                       "convert_hf_to_gguf.py or re-download it")


def _int_metadata(reader: GgufFile, key: str, default: Any = ..., per_layer: bool = False) -> Any:
    """An integer metadata value (or `default`). With `per_layer`, an array with one value per layer (what
    variable-head GGUFs store) is accepted when every layer has the same value."""
    value = _metadata(reader, key, default)
    if per_layer and isinstance(value, list):
        if value and len(set(value)) == 1:
            value = value[0]
        else:
            raise LlmkitError(f"{_source(reader)}: metadata {key} gives each layer its own count ({value[:8]}...); "
                              "per-layer head counts are not supported by llmkit's decoder, which uses one count for "
                              "every layer")
    if value is default:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_type(reader, key, value, "an integer")
    return value


def _float_metadata(reader: GgufFile, key: str, default: Any = ...) -> Any:
    """A float metadata value as the decimal it was written from (or `default`)."""
    value = _metadata(reader, key, default)
    if value is default:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad_type(reader, key, value, "a number")
    return _float(value)


def _rope_scaling(reader: GgufFile, arch: str, head_dim: int, theta: float) -> RopeScaling | None:
    """Linear scaling from metadata, or Llama 3 scaling recognised from the rope_freqs tensor."""
    kind = _metadata(reader, f"{arch}.{ROPE_SCALING_TYPE_KEY}", None)
    factor = _float_metadata(reader, f"{arch}.{ROPE_SCALING_FACTOR_KEY}", None)
    legacy_factor = _float_metadata(reader, f"{arch}.{ROPE_SCALE_LINEAR_KEY}", None)
    if kind is None and legacy_factor is not None:
        kind, factor = "linear", legacy_factor
    if kind == "linear" and factor is not None and _float(factor) != 1.0:
        return RopeScaling(kind="linear", factor=_float(factor))
    if kind not in (None, "none", "linear"):
        raise LlmkitError(
            f"{_source(reader)}: RoPE scaling type {kind!r} ({arch}.{ROPE_SCALING_TYPE_KEY}) is not supported; "
            "llmkit supports linear and Llama 3 scaling"
        )
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS_TENSOR), None)
    if freqs is None:
        return None
    # llama.cpp divides each base speed by rope_freqs[i]: 1 for short wavelengths, `factor` for long ones.
    divisors = torch.from_numpy(np.array(dequantized_tensor(reader, freqs), dtype=np.float32)).flatten()
    original = _int_metadata(reader, f"{arch}.{ROPE_ORIGINAL_CONTEXT_KEY}", LLAMA3_ORIGINAL_CONTEXT)
    scaling = RopeScaling(
        kind="llama3", factor=float(divisors.max()), low_freq_factor=LLAMA3_LOW_FREQ_FACTOR,
        high_freq_factor=LLAMA3_HIGH_FREQ_FACTOR, original_max_seq_len=int(original),
    )
    expected = rope_inverse_frequencies(head_dim, theta) / rope_inverse_frequencies(head_dim, theta, scaling)
    if divisors.shape != expected.shape or not torch.allclose(divisors, expected, rtol=1e-4):
        raise LlmkitError(
            f"{_source(reader)}: tensor {ROPE_FREQS_TENSOR} does not follow the Llama 3 RoPE scaling recipe "
            f"(factor {scaling.factor:g}, low/high frequency factors 1/4, original context {int(original)}); "
            "llmkit cannot represent arbitrary per-frequency RoPE factors"
        )
    return scaling


def config_from_gguf(reader_or_path: GgufFile | str | Path) -> Config:
    """An llmkit `Config` from a GGUF file's metadata (architectures: see `ARCHITECTURES`)."""
    reader = reader_or_path if isinstance(reader_or_path, GgufFile) else open_gguf(reader_or_path)
    source = _source(reader)
    arch = _metadata(reader, ARCHITECTURE_KEY)
    if arch not in ARCHITECTURES:
        raise LlmkitError(
            f"{source} holds a {arch!r} model ({ARCHITECTURE_KEY}); llmkit reads GGUF architectures "
            f"{', '.join(ARCHITECTURES)}: convert the model from its Hugging Face directory instead if llmkit supports it"
        )
    count = lambda key, default=..., per_layer=False: _int_metadata(reader, f"{arch}.{key}", default, per_layer)
    d_model = count(EMBEDDING_LENGTH_KEY)
    n_heads = count(HEAD_COUNT_KEY, per_layer=True)
    rope_dims = count(ROPE_DIMENSIONS_KEY, None)
    head_dim = count(KEY_LENGTH_KEY, rope_dims if rope_dims is not None else d_model // max(n_heads, 1))
    if rope_dims is not None and rope_dims != head_dim:
        raise LlmkitError(
            f"{source}: {arch}.{ROPE_DIMENSIONS_KEY}={rope_dims} rotates only part of each {head_dim}-channel head; "
            "llmkit's RoPE rotates whole heads, so this model is not supported"
        )
    vocab_size = count(VOCAB_SIZE_KEY, None)
    if vocab_size is None:
        tokens = reader.fields.get(TOKENS_KEY)
        if tokens is None:
            raise LlmkitError(f"{source} has neither {arch}.{VOCAB_SIZE_KEY} nor {TOKENS_KEY}; re-convert the file")
        vocab_size = len(tokens)
    theta = _float_metadata(reader, f"{arch}.{ROPE_BASE_KEY}", 10000.0)
    names = {t.name for t in reader.tensors}
    keys = {"n_layers": BLOCK_COUNT_KEY, "n_heads": HEAD_COUNT_KEY, "n_kv_heads": HEAD_COUNT_KV_KEY,
            "d_model": EMBEDDING_LENGTH_KEY, "head_dim": KEY_LENGTH_KEY, "d_ff": FEED_FORWARD_LENGTH_KEY,
            "max_seq_len": CONTEXT_LENGTH_KEY, "norm_eps": RMS_EPSILON_KEY, "vocab_size": VOCAB_SIZE_KEY,
            "sliding_window": SLIDING_WINDOW_KEY}
    fields = dict(
        name=source.stem,
        vocab_size=vocab_size,
        n_layers=count(BLOCK_COUNT_KEY),
        n_heads=n_heads,
        n_kv_heads=count(HEAD_COUNT_KV_KEY, n_heads, per_layer=True),
        d_model=d_model,
        head_dim=head_dim,
        d_ff=count(FEED_FORWARD_LENGTH_KEY),
        max_seq_len=count(CONTEXT_LENGTH_KEY),
        norm="rmsnorm",
        norm_eps=_float_metadata(reader, f"{arch}.{RMS_EPSILON_KEY}"),
        mlp="swiglu",
        qkv_bias="blk.0.attn_q.bias" in names,
        out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        tie_embeddings=OUTPUT_TENSOR not in names,
        position="rope",
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, head_dim, theta),
        bos_id=_int_metadata(reader, BOS_KEY, None),
        eos_id=_int_metadata(reader, EOS_KEY, None),
        extra={"source": str(source), "format": "gguf", "architecture": arch,  # notes only
               "gguf_name": str(_metadata(reader, MODEL_NAME_KEY, ""))},
    )
    if arch == "gemma3":
        fields.update(_gemma3_fields(reader, fields))
    return build_config(source, {field: f"{arch}.{key}" for field, key in keys.items()}, **fields)


def _gemma3_fields(reader: GgufFile, fields: dict[str, Any]) -> dict[str, Any]:
    """What Gemma 3 changes from the Llama fields: GeGLU (tanh), embeddings times sqrt(d), (1 + w) norms, QK-norm,
    sandwich norms, sliding-window local layers (window from the file; pattern, local RoPE base and attention scale
    from llama.cpp's constants). A RoPE scaling in the file applies to the global layers only, as in llama.cpp."""
    n_layers = fields["n_layers"]
    scalar = fields["d_model"] / fields["n_heads"] if n_layers == GEMMA3_27B_LAYERS else fields["head_dim"]
    return dict(mlp="geglu", gelu_approximate="tanh", scale_embeddings=True, norm_offset=1.0, qk_norm=True,
                post_norms=True, sliding_window=_int_metadata(reader, f"gemma3.{SLIDING_WINDOW_KEY}"),
                layer_types=tuple("global" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "local" for i in range(n_layers)),
                rope_local_theta=GEMMA3_LOCAL_ROPE_THETA, attention_scale=scalar**-0.5)


def llmkit_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'blocks.3.attn.q_proj.weight'; None for a tensor llmkit has no place for."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"blocks.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


def gguf_name(name: str) -> str:
    """The inverse of `llmkit_name`: 'blocks.3.attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    base, _, suffix = name.rpartition(".")
    for gguf_base, llmkit_base in GLOBAL_NAMES.items():
        if base == llmkit_base:
            return f"{gguf_base}.{suffix}"
    _, index, rest = base.split(".", 2)
    block = {value: key for key, value in BLOCK_NAMES.items()}[rest]
    return f"blk.{index}.{block}.{suffix}"


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (0, D/2, 1, D/2+1, ...) back to (0, 1, ..., D-1).

    Works for weights (rows, in) and biases (rows,)."""
    half = weight.shape[0] // n_heads // 2
    interleaved = weight.reshape(n_heads, half, 2, *weight.shape[1:])  # (H, D/2, pair, ...)
    return interleaved.swapaxes(1, 2).reshape(weight.shape)  # (H, pair, D/2, ...) -> (rows, ...)


def numpy_shape(tensor: GgufTensor) -> tuple[int, ...]:
    return tuple(int(dim) for dim in reversed(tensor.shape))  # ggml lists dims innermost first


def dequantized_tensor(reader: GgufFile, tensor: GgufTensor) -> np.ndarray:
    """A tensor's values as float32 in numpy order, as llmkit's model holds them (a Gemma norm weight without the
    converter's +1); unsupported types name the tensor and the fix."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise LlmkitError(
            f"{_source(reader)}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which cannot be "
            f"dequantized; re-quantize the model to one of {SUPPORTED_TYPES}"
        ) from None
    values = values.reshape(numpy_shape(tensor))  # (out, in) for linear weights
    offset = ARCHITECTURES.get(_metadata(reader, ARCHITECTURE_KEY, None), ARCHITECTURES["llama"]).norm_offset
    if offset and tensor.name.endswith("norm.weight"):
        values = values - np.float32(offset)
    return values


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """llmkit parameter name -> shape of the Decoder `config` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in Decoder(config).state_dict().items()}


def _shape_facts(config: Config, arch: str) -> str:
    return (f"{arch}.{EMBEDDING_LENGTH_KEY}={config.d_model}, {arch}.{FEED_FORWARD_LENGTH_KEY}={config.d_ff}, "
            f"heads={config.n_heads}/{config.n_kv_heads}, head_dim={config.head_dim}, vocab={config.vocab_size}")


def checked_tensors(reader: GgufFile, config: Config) -> Iterator[tuple[str, GgufTensor]]:
    """(llmkit name, tensor) for every tensor of the file that the Decoder `config` describes, each checked against
    the metadata (name and shape); raises naming the first missing tensor once all are seen. `rope_freqs` is skipped
    (read into config.rope_scaling). Shared by `load_gguf` and llmkit.quant's loader, which keeps blocks packed."""
    source, arch = _source(reader), _metadata(reader, ARCHITECTURE_KEY)
    expected = expected_shapes(config)
    seen = set()
    # a bar on a terminal only (disable=None): a 7B file takes minutes to dequantize
    for tensor in tqdm(reader.tensors, desc=f"loading {source.name}", unit="tensor", leave=False, disable=None):
        if tensor.name == ROPE_FREQS_TENSOR:
            continue
        name = llmkit_name(tensor.name)
        if name is None:
            raise LlmkitError(
                f"{source}: tensor {tensor.name} has no counterpart in llmkit's {arch} decoder; this model variant "
                "is not supported"
            )
        if name not in expected:
            raise LlmkitError(
                f"{source}: tensor {tensor.name} is not part of the model its metadata describes ({arch}."
                f"{BLOCK_COUNT_KEY}={config.n_layers}, {_shape_facts(config, arch)}); the file is inconsistent: "
                "re-download or re-convert it"
            )
        shape = numpy_shape(tensor)
        if shape != expected[name]:
            raise LlmkitError(
                f"{source}: tensor {tensor.name} has shape {shape} but the file's metadata "
                f"({_shape_facts(config, arch)}) implies {expected[name]}; the file is inconsistent: re-download or "
                "re-convert it"
            )
        seen.add(name)
        yield name, tensor
    missing = [name for name in expected if name not in seen]
    if missing:
        raise LlmkitError(
            f"{source} lacks tensor {gguf_name(missing[0])} (and {len(missing) - 1} more) that its metadata "
            f"({_shape_facts(config, arch)}) calls for; the file is incomplete: re-download or re-convert it"
        )


def permuted_heads(reader: GgufFile, config: Config, name: str) -> int | None:
    """The head count whose Q/K row order llama.cpp interleaved in tensor `name` (llmkit name), or None when its
    rows are in Hugging Face order already. `unpermute_rows` with it restores them; it moves whole rows only, so it
    applies equally to dequantized values and to a block-quantized tensor's rows of bytes (blocks run along the
    input dimension, within one row)."""
    if not ARCHITECTURES[_metadata(reader, ARCHITECTURE_KEY)].permuted_qk or not name.startswith("blocks."):
        return None
    if ".attn.q_proj." in name:
        return config.n_heads
    if ".attn.k_proj." in name:
        return config.n_kv_heads
    return None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named, dequantized state dict (in `dtype`) of a GGUF file; never unpickles."""
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in checked_tensors(reader, config):
        values = dequantized_tensor(reader, tensor)
        heads = permuted_heads(reader, config, name)
        if heads is not None:
            values = unpermute_rows(values, heads)
        if not values.flags.writeable:
            values = values.copy()  # F32 tensors are views of the read-only memory map
        state_dict[name] = torch.from_numpy(values).to(dtype)
    return config, state_dict
