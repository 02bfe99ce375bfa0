"""Gemma 3: QK-norm, sandwich norms, sliding-window local layers with their own RoPE base, held against
transformers' Gemma3ForCausalLM on a tiny random config (sequences longer than the window, so local layers differ
from global ones), plus Gemma 3's GGUF (architecture `gemma3`, SentencePiece tokenizer) against transformers' GGUF
readers, and the real Gemma 3 270M Q4_K_M file (slow tests)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from llmkit import Config, LlmkitError
from llmkit.checkpoints.gguf import load_gguf
from llmkit.checkpoints.hf import export_hf, load_hf
from llmkit.checkpoints.hf_config import config_from_hf
from llmkit.generate.decode import generate, generate_tokens
from llmkit.generate.native_step import NativeDecodeStep, plan
from llmkit.models.decoder import Decoder
from llmkit.quant.gguf_load import load_gguf_quantized, weight_bytes
from llmkit.quant.linear import QuantLinear
from llmkit.tokenizer import Tokenizer
from tests.helpers import load_llmkit, run_cli
from tests.test_checkpoints_gguf import write_gguf

VOCAB = 128
WINDOW = 5  # tokens a local layer sees (its own included); the test sequences are several windows long
# fp32 on both sides: only summation order differs (~1e-6), while a wrong norm place, window edge or RoPE base
# moves logits by 1e-2 or more.
TOLERANCE = 1e-4


def hf_gemma3(**changes) -> Gemma3ForCausalLM:
    """A seeded tiny Gemma 3: 6 layers (5 local + 1 global, Gemma 3's pattern), MQA with head_dim 32 (n_heads *
    head_dim != d_model), query_pre_attn_scalar 24 (not head_dim), local RoPE base 100 and global 5,000 (not the
    defaults, so both must be read), every weight drawn away from its init."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=128, sliding_window=WINDOW,
                  query_pre_attn_scalar=24, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                  attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**fields, **changes})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(mean=0.0, std=0.3 if "norm" in name else 0.1)  # Gemma norms scale by (1 + w)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Gemma3ForCausalLM, Decoder, Path]:
    """(transformers model, llmkit's import of its saved directory, the directory)."""
    directory = tmp_path_factory.mktemp("gemma3")
    hf_model = hf_gemma3()
    hf_model.save_pretrained(directory)
    return hf_model, load_llmkit(directory), directory


def token_ids(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- config


def test_import_reads_gemma3_fields(pair):
    _, model, _ = pair
    config = model.config
    assert config.layer_types == ("local",) * 5 + ("global",)
    assert config.local_layers == (0, 1, 2, 3, 4)
    assert (config.sliding_window, config.rope_theta, config.rope_local_theta) == (WINDOW, 5000.0, 100.0)
    assert config.attention_scale == pytest.approx(24**-0.5)
    assert config.qk_norm and config.post_norms and config.norm_offset == 1.0 and config.scale_embeddings
    assert config.hf_architecture == "Gemma3ForCausalLM"


def test_other_models_keep_their_layers():
    """The new fields' defaults build exactly the modules (and state dict) a Llama had before."""
    model = Decoder(Config.from_name("tiny-llama"))
    assert model.config.local_layers == ()
    assert not any(("q_norm" in name or "post_" in name) for name in model.state_dict())


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types=("local", "global")), "sliding_window"),
    (dict(layer_types=("local",), sliding_window=4), "layer_types lists 1 layers but n_layers=2"),
    (dict(sliding_window=0), "sliding_window=0 must be a positive"),
    (dict(qk_norm=True, norm="layernorm"), "qk_norm=True normalises q and k with RMSNorm"),
    (dict(sliding_window=4, position="alibi"), "RoPE decoders only"),
    (dict(post_norms=True, post_norm=True), "post_norms=True"),
    (dict(layer_types=("local", "sideways"), sliding_window=4), "layer_types"),
])
def test_config_refuses_impossible_attention_variants(changes, message):
    with pytest.raises(LlmkitError, match=message):
        Config(n_layers=2, **changes)


def test_native_config_files_from_before_the_fields_still_load(tmp_path):
    config = Config.from_name("tiny-llama")
    config.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    for key in ("qk_norm", "post_norms", "sliding_window", "layer_types", "rope_local_theta"):
        del data[key]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert Config.load(tmp_path / "config.json") == config


# --------------------------------------------------------------------------- numerics against transformers


def test_logits_match_transformers_beyond_the_window(pair):
    hf_model, model, _ = pair
    ids = token_ids(length=4 * WINDOW + 3)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids)
        # the window matters: the same weights with a window wider than the text give other logits after WINDOW tokens
        wide = Decoder(dataclasses.replace(model.config, sliding_window=1000)).eval()
        wide.load_state_dict(model.state_dict())
        full = wide(ids)
    assert expected.abs().max() > 1.0
    assert max_difference(got, expected) <= TOLERANCE
    assert max_difference(full[:, :WINDOW], expected[:, :WINDOW]) <= TOLERANCE
    assert max_difference(full[:, WINDOW:], expected[:, WINDOW:]) > 100 * TOLERANCE


def test_cached_decode_matches_full_forward_and_reference_kernel(pair):
    """Prefill shorter than the window, then one token at a time well past it: the local mask must follow the
    cache. The reference (hand-written softmax) kernel gives the same logits."""
    hf_model, model, _ = pair
    ids = token_ids(length=4 * WINDOW, batch=1)
    with torch.no_grad():
        expected = hf_model(ids).logits
        cache = model.new_cache(batch_size=1, max_len=ids.shape[1])
        steps = [model(ids[:, :3], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(3, 2 * WINDOW)]
        steps += [model(ids[:, 2 * WINDOW :], cache=cache)]  # a multi-token chunk after the window filled
        model.kernel = "reference"
        reference = model(ids)
        model.kernel = "sdpa"
    assert max_difference(torch.cat(steps, dim=1), expected) <= TOLERANCE
    assert max_difference(reference, expected) <= TOLERANCE


def test_greedy_tokens_equal_transformers_generate(pair):
    hf_model, model, _ = pair
    prompt = token_ids(length=3, batch=1)[0].tolist()
    steps = list(generate_tokens(model, prompt, max_new_tokens=3 * WINDOW))
    ours = [tokens[0] for tokens in steps]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=3 * WINDOW, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_left_padded_batch_matches_transformers(pair):
    hf_model, model, _ = pair
    ids = token_ids(length=3 * WINDOW, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        alone = hf_model(ids[:1, 4:]).logits
        got = model(ids, attention_mask=mask)
        full_row = hf_model(ids[1:]).logits
    assert max_difference(got[0, 4:], alone[0]) <= TOLERANCE
    assert max_difference(got[1], full_row[0]) <= TOLERANCE


def test_export_loads_in_transformers_with_same_logits(pair, tmp_path):
    hf_model, model, _ = pair
    export_hf(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    ids = token_ids(length=3 * WINDOW)
    with torch.no_grad():
        assert max_difference(reloaded(ids).logits, hf_model(ids).logits) <= TOLERANCE
    assert load_llmkit(tmp_path).config == model.config.__class__(**{**model.config.to_dict(), "name": tmp_path.name})


def test_legacy_rope_keys_are_read(tmp_path):
    """Older Gemma 3 config.json files say rope_theta / rope_local_base_freq / sliding_window_pattern."""
    data = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64,
                intermediate_size=96, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=128, sliding_window=8, sliding_window_pattern=2, rope_theta=1e6,
                rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                query_pre_attn_scalar=32)
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = config_from_hf(tmp_path)
    assert config.layer_types == ("local", "global", "local", "global")
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling.factor) == (1e6, 1e4, 8.0)


def test_softcapping_is_refused(tmp_path):
    hf_gemma3(final_logit_softcapping=30.0).save_pretrained(tmp_path)
    with pytest.raises(LlmkitError, match="final_logit_softcapping=30.0"):
        load_hf(tmp_path)


# --------------------------------------------------------------------------- GGUF (architecture gemma3)

GGUF_BLOCK_NAMES = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
                    "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
                    "post_attn_norm": "post_attention_norm", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_mlp_norm": "post_ffw_norm"}


def write_gemma3_gguf(path: Path, model: Decoder) -> Path:
    """`model` as llama.cpp's converter writes a Gemma 3: HF row order (NEOX RoPE), norm weights stored as (1 + w),
    tied head (no output.weight), the window in metadata (pattern and local RoPE base are llama.cpp constants)."""
    config, tensors = model.config, {}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().copy()
        if name.endswith("norm.weight"):
            array = array + 1
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            module, suffix = rest.rsplit(".", 1)
            tensors[f"blk.{index}.{GGUF_BLOCK_NAMES[module]}.{suffix}"] = array
        else:
            tensors[{"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}[name]] = array
    arch = "gemma3"
    metadata = {
        f"{arch}.block_count": config.n_layers, f"{arch}.context_length": config.max_seq_len,
        f"{arch}.embedding_length": config.d_model, f"{arch}.feed_forward_length": config.d_ff,
        f"{arch}.attention.head_count": config.n_heads, f"{arch}.attention.head_count_kv": config.n_kv_heads,
        f"{arch}.attention.key_length": config.head_dim, f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.rope.freq_base": config.rope_theta, f"{arch}.attention.layer_norm_rms_epsilon": config.norm_eps,
        f"{arch}.attention.sliding_window": config.sliding_window, f"{arch}.vocab_size": config.vocab_size,
        "tokenizer.ggml.bos_token_id": config.bos_id, "tokenizer.ggml.eos_token_id": config.eos_id,
    }
    return write_gguf(path, metadata, tensors, arch)


def test_gguf_import_matches_transformers(tmp_path):
    """A tiny Gemma 3 written the way llama.cpp's converter does; llama.cpp's constants (every 6th layer global,
    local RoPE base 10k, scale 1/sqrt(head_dim)) are what the HF model is given."""
    hf_model = hf_gemma3(query_pre_attn_scalar=32, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 5000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    hf_model.save_pretrained(tmp_path / "hf")
    path = write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", load_llmkit(tmp_path / "hf"))
    config, state = load_gguf(path)
    model = Decoder(config).eval()
    model.load_state_dict(state)
    quantized = load_gguf_quantized(path)
    ids = token_ids(length=4 * WINDOW)
    with torch.no_grad():
        expected = hf_model(ids).logits
        assert max_difference(model(ids), expected) <= TOLERANCE
        assert max_difference(quantized(ids), expected) <= TOLERANCE
    assert config.layer_types == ("local",) * 5 + ("global",) and config.rope_local_theta == 10000.0


SPM_PIECES = ["\u2581", "a", "b", "c", "ab", "\u2581a", "\u2581ab", "abc", "\u2581abc", "ca", "\u2581c", "\u2581b", "bc",
              "\u2581\u2581", "\u00e9", "\u2581\u00e9"]


def write_spm_gguf(path: Path, add_space_prefix: bool) -> Path:
    """A tiny SentencePiece ('llama') vocabulary as Gemma's GGUF holds one: control tokens, a user-defined run of
    spaces written as real spaces, 256 byte-fallback tokens, pieces in merge order (scores deliberately not)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "   ", "\n\n"]
    types = [3, 3, 3, 2, 3, 4, 4]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [6] * 256
    tokens += SPM_PIECES
    types += [1] * len(SPM_PIECES)
    scores = [-1000.0] * 263 + [float(-i) for i in range(len(SPM_PIECES))][::-1]  # reversed: the order must win
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SPM_TEXTS = ["abc", "ab ab  abc", "   abc", "cab bca", "a\n\nb", "z\u00e9\u00e9 \u00e9", "<start_of_turn>abc", "\u65e5 ok",
             " a  b   c    a"]


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    path = write_spm_gguf(tmp_path / "spm.gguf", add_space_prefix=False)
    ours = Tokenizer.from_gguf(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.encode("\u65e5")[1:] == [7 + 0xE6, 7 + 0x97, 7 + 0xA5]  # byte fallback: UTF-8 bytes' tokens
    assert ours.encode("ab")[0] == 2 and ours.add_bos  # the file says add BOS


def test_sentencepiece_space_prefix(tmp_path):
    """Llama 1/2 files ask for a space in front of the text (tokenizer.ggml.add_space_prefix, default true)."""
    ours = Tokenizer.from_gguf(write_spm_gguf(tmp_path / "spm.gguf", add_space_prefix=True))
    abc = SPM_PIECES.index("\u2581abc") + 263
    assert ours.encode("abc", add_bos=False) == [abc]
    assert ours.decode([abc]) == "abc"


# --------------------------------------------------------------------------- real weights: Gemma 3 270M Q4_K_M

PROMPT = "The capital of France is"
# varied text for the tokenizer: runs of spaces and newlines, code, accents, CJK, emoji, digits, special tokens
REAL_TEXTS = SPM_TEXTS + [
    PROMPT, "  leading spaces and   runs   of spaces\n\n\nnewlines\ttabs",
    "\u00dcn\u00efc\u00f6d\u00e9 \u2014 \u201cquotes\u201d \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "emoji \U0001f600 \U0001f1eb\U0001f1f7 and a rare \u1e01\u0336",
    "code: def f(x):\n    return x**2  # comment", "<start_of_turn>user\nhi<end_of_turn>",
    "numbers 1234567 3.14159 and 1,000,000", "<bos>text <eos> more", "a" * 50, " trailing space ",
]


@pytest.fixture(scope="module")
def real_quantized(gemma3_gguf):
    return load_gguf_quantized(gemma3_gguf)


@pytest.fixture(scope="module")
def real_tokenizer(gemma3_gguf):
    return Tokenizer.from_gguf(gemma3_gguf)


@pytest.fixture(scope="module")
def real_transformers(gemma3_gguf):
    """transformers' own GGUF reader (it dequantizes every tensor to fp32)."""
    return AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.mark.slow
def test_real_gemma3_continues_coherently_with_quantized_weights(real_quantized, real_tokenizer, gemma3_gguf):
    """llama.cpp continues the prompt with "... the capital of the country of France ..."; the file's Q4_K, Q5_0,
    Q6_K and Q8_0 matrices stay packed, each format on llmkit's kernels over the file's own bytes (quant/native.py),
    so the weights take no more than the file (the issue's bound: <= 1.2x; 0.97x measured 2026-12-06, the file
    also holds the vocabulary). A float copy of any matrix would be 3-6x its blocks."""
    text = generate(real_quantized, real_tokenizer, PROMPT, max_new_tokens=12)
    assert "the capital of the country of France" in text, text
    schemes = {module.scheme for module in real_quantized.modules() if isinstance(module, QuantLinear)}
    assert schemes == {"q4_k", "q5_0", "q6_k", "q8_0"}
    assert weight_bytes(real_quantized) <= 1.2 * gemma3_gguf.stat().st_size


@pytest.mark.slow
def test_real_gemma3_native_step_equals_the_modules(real_quantized):
    """The native decode step (llmkit/generate/native_step.py) covers Gemma 3's blocks as the file loads them (Q4_K,
    Q5_0, Q6_K, Q8_0 products, one per projection; QK-norm, sandwich norms, sliding-window layers with their own RoPE
    base, scaled embeddings): the modules' logits and KV cache, bit for bit."""
    program, why = plan(real_quantized)
    assert program is not None, why
    step = NativeDecodeStep(real_quantized, program)
    prompt = torch.tensor([[2, 818, 5279, 529, 7001, 563]])  # <bos> The capital of France is
    results = []
    with torch.inference_mode():
        for forward in (real_quantized, step):
            cache = real_quantized.new_cache(1, 12)
            real_quantized(prompt, cache=cache)
            logits = [forward(torch.tensor([[token]]), cache=cache) for token in (506, 5279, 529, 506)]
            results.append((torch.cat(logits, dim=1), cache))
    (eager, eager_cache), (native, native_cache) = results
    assert torch.equal(native, eager)
    assert all(torch.equal(a, b) for a, b in zip(native_cache.keys + native_cache.values,
                                                 eager_cache.keys + eager_cache.values))


@pytest.mark.slow
def test_real_gemma3_greedy_tokens_equal_transformers(real_transformers, real_quantized, gemma3_gguf):
    """llmkit's dequantized import computes what transformers computes from the same file (same fp32 weights); the
    quantized path rounds activations to int8 per block of 32 as llama.cpp does (llmkit.quant.native; the head
    keeps float32 activations), hence the looser bound."""
    config, state = load_gguf(gemma3_gguf)
    model = Decoder(config).eval()
    model.load_state_dict(state)
    del state
    prompt = [2, 818, 5279, 529, 7001, 563]  # <bos> The capital of France is
    with torch.no_grad():
        theirs = real_transformers.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 6:]
        ours = [tokens[0] for tokens in generate_tokens(model, prompt, max_new_tokens=20)]
        ids = torch.tensor([prompt + theirs.tolist()])
        expected = real_transformers(ids).logits
        assert max_difference(model(ids), expected) <= 1e-3  # fp32, 640-wide sums: ~1e-5 seen
        quantized = real_quantized(ids)
    assert ours == theirs.tolist()
    assert max_difference(quantized, expected) <= 0.5  # int8 activations: ~0.1 seen, logits up to ~30
    assert torch.equal(quantized[0, :6].argmax(-1), expected[0, :6].argmax(-1))


@pytest.mark.slow
def test_real_gemma3_tokenizer_matches_transformers(real_tokenizer, gemma3_gguf):
    theirs = AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    for text in REAL_TEXTS:
        assert real_tokenizer.encode(text) == theirs(text).input_ids, text
        assert real_tokenizer.decode(real_tokenizer.encode(text, add_bos=False)) == text


@pytest.mark.slow
def test_real_gemma3_info_cli(gemma3_gguf, capsys):
    code, out, err = run_cli(capsys, "info", "--model", str(gemma3_gguf))
    assert code == 0, err
    assert "Q4_K" in out and "Q6_K" in out and "gemma" in out.lower()


@pytest.mark.slow
def test_real_gemma3_generate_cli(gemma3_gguf, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", str(gemma3_gguf), "--prompt", PROMPT,
                             "--max_new_tokens", "12")
    assert code == 0, err
    assert "capital of the country of France" in out
