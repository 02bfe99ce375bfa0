"""Write an llmkit decoder and its tokenizer as a GGUF file that llama.cpp (and transformers' GGUF loader) runs.

The inverse of `llmkit.checkpoints.gguf`: the same tensor names (`gguf_name`), the same metadata keys, and
llama.cpp's Q/K row order for the "llama" architecture (its converter interleaves each head's rotate-half
channel pairs, `permute_rows`, because its RoPE kernel rotates adjacent pairs; "qwen2" keeps HF order).

Storage types (`--quant`), as llama.cpp's convert_hf_to_gguf.py and llama-quantize choose them:
    f32, f16          every matrix in that type; a Q8_0/Q4_x block is 32 values along a row
    q8_0              blocks of 32 int8 + one fp16 scale d:             w = d * q         (8.5 bits/weight)
    q4_0              blocks of 32 4-bit q in [0, 15] + fp16 d:          w = d * (q - 8)   (4.5 bits/weight)
    q4_1              blocks of 32 4-bit q + fp16 scale d and min m:     w = d * q + m     (5 bits/weight)
    q4_k_m            llama-quantize's Q4_K_M mix: Q4_K super-blocks of 256 (4.5 bits/weight) for most matrices,
                      Q6_K (6.5625) for the LM head and for attn_v / ffn_down in the layers `use_more_bits` picks
                      (the first and last eighth and every third between); a matrix whose rows are not a multiple
                      of 256 values falls back as llama.cpp's does: Q4_K -> Q5_0, Q6_K -> Q8_0
1-D tensors (norm weights, biases, rope_freqs) stay F32 whatever the type: they are tiny and llama.cpp's kernels
read them as F32. The token embedding is quantized like the other matrices. The LM head (`output`, or the token
embedding when the head is tied to it) is where llama-quantize spends more bits at 4-bit types: Q6_K, or Q8_0 when
the row width is not a multiple of the K-quant super-block (256; SmolLM2's 576 is not). At q4_0/q4_1 that tensor is
Q8_0 here (`HEAD_TYPES`), which is what llama.cpp wrote for SmolLM2; at q4_k_m it follows the mix above.

Blocks are packed by `gguf.quants.quantize`, the reference implementation of llama.cpp's packers in numpy (bit for
bit the bytes llama.cpp writes for Q8_0/Q4_0/Q4_1/Q5_0). The K-quants the `gguf` package cannot write are packed by
the `pack` function the caller passes (`llmkit.quant.pack_gguf`: llama.cpp's quantizers with their scale search,
llmkit/quant/kquants.py), since quantization sits above checkpoints in llmkit's import order.

The tokenizer is written as GGUF's byte-level BPE ("gpt2" model): the vocabulary padded to the embedding's rows
with "[PADn]" tokens (type UNUSED, as llama.cpp's converter pads), token types (CONTROL for special added tokens,
USER_DEFINED for other added tokens), merges, special ids, the BOS rule and the chat template. `tokenizer.ggml.pre`
names the pre-tokenizer (the regexes that split text before BPE): copied from a GGUF source, else recognised from
the tokenizer's own pre-tokenizer among the ones llmkit and llama.cpp know; when none matches, "default" is written
with a warning, since llama.cpp would then split text differently.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE
from torch import nn

from llmkit import tokenizer as tk  # GGUF tokenizer keys, the ones Tokenizer.from_gguf reads
from llmkit.checkpoints import gguf as gg  # the importer: its names and keys, inverted here
from llmkit.checkpoints.gguf import gguf_name
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.gguf_file import GgufFile
from llmkit.io import atomic_write
from llmkit.nn.position import rope_inverse_frequencies
from llmkit.tokenizer import Tokenizer

Q = GGMLQuantizationType
QUANT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
               "q4_k_m": Q.Q4_K}  # --quant -> storage (q4_k_m: of most matrices; `tensor_type` has the mix)
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
              "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M}  # general.file_type
HEAD_TYPES = {"q4_0": Q.Q8_0, "q4_1": Q.Q8_0, "q4_k_m": Q.Q6_K}  # the LM head (llama.cpp: Q6_K, else Q8_0; above)
BLOCK_VALUES = 32  # values per block of Q8_0 / Q4_0 / Q4_1 / Q5_0, along each row
SUPER_BLOCK_VALUES = 256  # values per K-quant super-block
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}  # llama-quantize's type for rows that are not whole super-blocks
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # types the gguf package cannot write: `export_gguf`'s `pack` does

# metadata keys the importer does not read (the others are shared with llmkit.checkpoints.gguf / llmkit.tokenizer)
MODEL_NAME_KEY = "general.name"
FILE_TYPE_KEY = "general.file_type"
QUANTIZATION_VERSION_KEY = "general.quantization_version"
VALUE_LENGTH_KEY = "attention.value_length"
UNK_ID_KEY = "tokenizer.ggml.unknown_token_id"
GGUF_TOKEN_TYPE_NORMAL, GGUF_TOKEN_TYPE_UNUSED = 1, 5
PAD_TOKEN = "[PAD{}]"  # llama.cpp's filler for ids the tokenizer does not define

# What a llama-family decoder leaves at these values; anything else has no place in GGUF's llama/qwen2 graphs.
LLAMA_FAMILY = dict(arch="decoder", norm="rmsnorm", mlp="swiglu", position="rope", out_bias=False, mlp_bias=False,
                    embed_norm=False, scale_embeddings=False, norm_offset=0.0, rope_fraction=1.0, n_experts=0,
                    attention_scale=None, qk_norm=False, post_norms=False, sliding_window=None)
SUPPORTED = "llama-family decoders: llama, mistral, smollm2 (GGUF 'llama') and qwen2 (GGUF 'qwen2')"
PERMUTED_QK = {"llama": True, "qwen2": False}  # as ARCHITECTURES in llmkit.checkpoints.gguf


def gguf_architecture(config: Config) -> str:
    """The GGUF architecture `config` exports as ('llama' or 'qwen2'); other models raise naming what differs."""
    what = config.hf_architecture or config.extra.get("architecture") or config.name
    if config.arch != "decoder":
        raise LlmkitError(f"exporting {what} (arch={config.arch!r}) to GGUF is not supported; supported: {SUPPORTED}: "
                          "export it with --to hf or --to native instead")
    different = [f"{field}={getattr(config, field)!r}" for field, value in LLAMA_FAMILY.items()
                 if getattr(config, field) != value]
    if different:
        raise LlmkitError(f"exporting {what} to GGUF is not supported (it has {', '.join(different)}); supported: "
                          f"{SUPPORTED}: export it with --to hf or --to native instead")
    return "qwen2" if config.qkv_bias else "llama"  # llama.cpp's qwen2 graph has the q/k/v biases and NEOX RoPE


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, rows (0..D/2-1 | D/2..D-1) -> (0, D/2, 1, D/2+1, ...); the inverse of
    `llmkit.checkpoints.gguf.unpermute_rows`. Works for weights (rows, in) and biases (rows,)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of the layers whose attn_v and ffn_down get Q6_K in a Q4_K_M file: the first and last
    eighth of the layers, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, array: np.ndarray, quant: str, config: Config) -> Q:
    """Storage type of one GGUF tensor: F32 for 1-D tensors, the head's type for the LM head, q4_k_m's mix, else
    --quant's."""
    if array.ndim == 1:
        return Q.F32
    head = name == "output.weight" or (name == "token_embd.weight" and config.tie_embeddings)
    qtype = HEAD_TYPES.get(quant, QUANT_TYPES[quant]) if head else QUANT_TYPES[quant]
    if quant == "q4_k_m" and name.startswith("blk.") and name.endswith((".attn_v.weight", ".ffn_down.weight")):
        qtype = Q.Q6_K if use_more_bits(int(name.split(".")[1]), config.n_layers) else qtype
    if qtype in K_FALLBACK and array.shape[-1] % SUPER_BLOCK_VALUES:
        qtype = K_FALLBACK[qtype]
    if qtype not in (Q.F32, Q.F16) and array.shape[-1] % BLOCK_VALUES:
        raise LlmkitError(f"tensor {name} has rows of {array.shape[-1]} values, not a multiple of {qtype.name}'s "
                          f"{BLOCK_VALUES}-value blocks; export this model with --quant f16 or --quant f32")
    return qtype


def gguf_tensors(model: nn.Module, arch: str, quant: str) -> list[tuple[str, np.ndarray, Q]]:
    """(GGUF name, float32 array in llama.cpp's layout, storage type) for every tensor of `model`, checked before
    anything is written."""
    config = model.config
    tensors = []
    for name, tensor in model.state_dict().items():
        array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        if PERMUTED_QK[arch] and name.startswith("blocks.") and ".attn.q_proj." in name:
            array = permute_rows(array, config.n_heads)
        elif PERMUTED_QK[arch] and name.startswith("blocks.") and ".attn.k_proj." in name:
            array = permute_rows(array, config.n_kv_heads)
        target = gguf_name(name)
        tensors.append((target, array, tensor_type(target, array, quant, config)))
    if config.rope_scaling is not None and config.rope_scaling.kind == "llama3":
        # llama.cpp divides each base speed by rope_freqs[i] (1 for short wavelengths, `factor` for long ones)
        divisors = (rope_inverse_frequencies(config.head_dim, config.rope_theta)
                    / rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling))
        tensors.append((gg.ROPE_FREQS_TENSOR, divisors.numpy().astype(np.float32), Q.F32))
    return tensors


def _pre_tokenizer_json(pre_tokenizer: Any) -> Any:
    holder = BackendTokenizer(BPE())
    holder.pre_tokenizer = pre_tokenizer
    return json.loads(holder.to_str())["pre_tokenizer"]


def source_gguf_fields(tokenizer: Tokenizer) -> dict[str, Any]:
    """The metadata llmkit's Tokenizer does not keep (pre-tokenizer name, unknown-token id), read from the GGUF file
    the tokenizer came from ({} for other sources)."""
    source = Path(tokenizer.source) if tokenizer.source else None
    if source is None or source.suffix.lower() != ".gguf" or not source.is_file():
        return {}
    fields = GgufFile(source).fields
    return {key: fields[key] for key in (tk.GGUF_PRE, UNK_ID_KEY) if key in fields}


def gguf_pre(tokenizer: Tokenizer, source_fields: dict[str, Any] | None = None) -> str:
    """`tokenizer.ggml.pre` for `tokenizer`: the value of the GGUF file it came from, or the first known name whose
    pre-tokenizer equals its own; "default" (with a warning) when none does."""
    source_fields = source_gguf_fields(tokenizer) if source_fields is None else source_fields
    if tk.GGUF_PRE in source_fields:
        return str(source_fields[tk.GGUF_PRE])
    source = tokenizer.source
    own = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer")
    for name in tk.PRE_FAMILIES:  # the first name of each family is llama.cpp's own (gpt-2, smollm, llama3, qwen2)
        # the pre-tokenizer Tokenizer.from_gguf builds for that name (a private helper: one definition of each)
        if _pre_tokenizer_json(tk._pre_tokenizer(name, Path(source or "tokenizer"))[0]) == own:
            return name
    warnings.warn(f"the tokenizer's pre-tokenizer ({json.dumps(own)[:120]}) is none that llama.cpp names; writing "
                  f"{tk.GGUF_PRE}='default', so llama.cpp may split text (and so tokenize it) differently", stacklevel=2)
    return "default"


def tokenizer_metadata(tokenizer: Tokenizer, config: Config) -> dict[str, Any]:
    """GGUF `tokenizer.*` metadata (key -> value) of a byte-level BPE tokenizer, its vocabulary padded to the
    model's `vocab_size` rows."""
    data = json.loads(tokenizer.backend.to_str())
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise LlmkitError(f"the tokenizer of {config.name} is a {model.get('type')} model with a {decoder.get('type')} "
                          "decoder; GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen2 style) "
                          "only: export with --to hf instead")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= config.vocab_size:
        raise LlmkitError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
                          f"{config.vocab_size} rows (vocab_size); the tokenizer belongs to another model")
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for token_id in range(config.vocab_size):
        if token_id not in by_id:
            tokens.append(PAD_TOKEN.format(token_id))
            types.append(GGUF_TOKEN_TYPE_UNUSED)
            continue
        tokens.append(by_id[token_id])
        if token_id in added:
            types.append(tk.GGUF_TOKEN_TYPE_CONTROL if added[token_id].special else tk.GGUF_TOKEN_TYPE_USER_DEFINED)
        else:
            types.append(GGUF_TOKEN_TYPE_NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    source_fields = source_gguf_fields(tokenizer)
    metadata: dict[str, Any] = {tk.GGUF_MODEL: tk.GGUF_BYTE_LEVEL_BPE, tk.GGUF_PRE: gguf_pre(tokenizer, source_fields),
                                tk.GGUF_TOKENS: tokens, tk.GGUF_TOKEN_TYPE: types, tk.GGUF_MERGES: merges}
    unk_token = model.get("unk_token")  # byte-level BPE needs none; llama.cpp's converter copies what is there
    unk_id = source_fields.get(UNK_ID_KEY, tokenizer.token_to_id(unk_token) if unk_token else None)
    bos_id = tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_id
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else config.eos_id
    for key, token_id in ((tk.GGUF_BOS_ID, bos_id), (tk.GGUF_EOS_ID, eos_id), (UNK_ID_KEY, unk_id),
                          (tk.GGUF_PAD_ID, tokenizer.pad_id)):
        if token_id is not None:
            metadata[key] = int(token_id)
    metadata[tk.GGUF_ADD_BOS] = bool(tokenizer.add_bos)
    if tokenizer.chat_template is not None:
        metadata[tk.GGUF_CHAT_TEMPLATE] = tokenizer.chat_template
    return metadata


def model_metadata(config: Config, arch: str, quant: str) -> dict[str, Any]:
    """GGUF `general.*` and `{arch}.*` metadata (key -> value) of `config`."""
    name = config.extra.get("gguf_name") or config.name
    metadata: dict[str, Any] = {
        MODEL_NAME_KEY: str(name), FILE_TYPE_KEY: int(FILE_TYPES[quant]),
        f"{arch}.{gg.CONTEXT_LENGTH_KEY}": config.max_seq_len, f"{arch}.{gg.EMBEDDING_LENGTH_KEY}": config.d_model,
        f"{arch}.{gg.BLOCK_COUNT_KEY}": config.n_layers, f"{arch}.{gg.FEED_FORWARD_LENGTH_KEY}": config.d_ff,
        f"{arch}.{gg.HEAD_COUNT_KEY}": config.n_heads, f"{arch}.{gg.HEAD_COUNT_KV_KEY}": config.n_kv_heads,
        f"{arch}.{gg.ROPE_BASE_KEY}": float(config.rope_theta), f"{arch}.{gg.ROPE_DIMENSIONS_KEY}": config.head_dim,
        f"{arch}.{gg.RMS_EPSILON_KEY}": float(config.norm_eps), f"{arch}.{gg.VOCAB_SIZE_KEY}": config.vocab_size,
    }
    if config.head_dim * config.n_heads != config.d_model:  # llama.cpp assumes d_model / n_heads unless told
        metadata[f"{arch}.{gg.KEY_LENGTH_KEY}"] = metadata[f"{arch}.{VALUE_LENGTH_KEY}"] = config.head_dim
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        metadata[f"{arch}.{gg.ROPE_SCALING_TYPE_KEY}"] = "linear"
        metadata[f"{arch}.{gg.ROPE_SCALING_FACTOR_KEY}"] = float(scaling.factor)
    elif scaling is not None:  # llama3: the rope_freqs tensor carries it; the original context for readers
        metadata[f"{arch}.{gg.ROPE_ORIGINAL_CONTEXT_KEY}"] = scaling.original_max_seq_len
    if QUANT_TYPES[quant] not in (Q.F32, Q.F16):
        metadata[QUANTIZATION_VERSION_KEY] = gguf.GGML_QUANT_VERSION
    return metadata


def _add(writer: GGUFWriter, key: str, value: Any) -> None:
    """One metadata value in the GGUF type llama.cpp's converter uses for it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_array(key, value)  # strings, or token types (ints: INT32 as llama.cpp writes them)


def export_gguf(model: nn.Module, path: str | Path, tokenizer: Tokenizer, quant: str = "f16",
                pack: Callable[[np.ndarray, Q], np.ndarray] | None = None) -> Path:
    """Write `model` (a llama-family Decoder) and `tokenizer` as one GGUF file at `path`, its matrices stored as
    `quant` (f32, f16, q8_0, q4_0, q4_1, q4_k_m); written to a temporary name and renamed, so `path` is never
    half-written. `pack` (array (rows, in) float32, type) -> blocks (rows, bytes) uint8 packs the block types; the
    default, gguf.quants.quantize, cannot write K-quants: q4_k_m needs `llmkit.quant.pack_gguf`.

    Raises:
        LlmkitError: unknown `quant`, a model GGUF has no architecture for, a non-byte-level tokenizer, or a row
            width that is not a multiple of the 32-value blocks of a quantized type.
    """
    if quant not in QUANT_TYPES:
        raise LlmkitError(f"--quant {quant!r} is not a GGUF export type; choose one of {', '.join(QUANT_TYPES)}")
    config = model.config
    if config.recurrent_layers:
        raise LlmkitError(f"{config.name} has {config.layer_mixers[config.recurrent_layers[0]]} layers, which llmkit's "
                          "GGUF export does not write; keep it in llmkit's own format (a checkpoint directory)")
    arch = gguf_architecture(config)
    metadata = {**model_metadata(config, arch, quant), **tokenizer_metadata(tokenizer, config)}
    tensors = gguf_tensors(model, arch, quant)  # every tensor checked before the file is opened
    if pack is None:
        if any(qtype in K_TYPES for _, _, qtype in tensors):
            raise LlmkitError(f"--quant {quant} stores K-quant blocks, which gguf.quants cannot write: pass "
                              "pack=llmkit.quant.pack_gguf to export_gguf (`llmkit convert` does)")
        pack = gguf.quants.quantize

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), arch)
        for key, value in metadata.items():
            _add(writer, key, value)
        for name, array, qtype in tensors:
            if qtype == Q.F32:
                writer.add_tensor(name, array)
            elif qtype == Q.F16:
                writer.add_tensor(name, array.astype(np.float16))
            else:
                blocks = pack(array, qtype)  # (rows, bytes) uint8, llama.cpp's packing
                writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    atomic_write(path, write)
    return path
