"""GGUF export held against readers no one here wrote: the bytes against `gguf.quants.quantize` of llama.cpp's
layout, the file against transformers' GGUF loader (logits and token ids), the file read back by llmkit, and a round
trip of the real SmolLM2-135M-Instruct file (greedy tokens, chat template, vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmkit import Config, LlmkitError
from llmkit.checkpoints import default_model_path, load_model, load_tokenizer, save_model
from llmkit.checkpoints.gguf_export import export_gguf, gguf_pre
from llmkit.data.tokenizer_train import train_tokenizer
from llmkit.models.decoder import Decoder
from llmkit.quant import pack_gguf
from llmkit.quant.gguf_load import load_gguf_quantized
from llmkit.tokenizer import Tokenizer
from tests.helpers import cli_status, run_cli, tiny_decoder

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CORPUS = "The quick brown fox jumps over the lazy dog. It's a truth universally acknowledged, isn't it?\n" * 40
# digit-free: transformers' GGUF tokenizer conversion drops digit splitting (DESIGN.md, known pitfalls)
TEXT = "The lazy fox's truth <|im_start|>jumps over  the dog!\n\tIsn't it? Ünïcode ✓ <|im_end|>"
IDS = torch.tensor([[1, 77, 150, 299, 42, 3, 310, 8, 200]])  # 310: a padding row of the embedding
VARIANTS = {  # llama.cpp architecture llama (Q/K rows permuted), tied head (SmolLM2), qwen2 (q/k/v biases)
    "llama": dict(),
    "tied": dict(tie_embeddings=True),
    "qwen2": dict(qkv_bias=True),
}
TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A trained byte-level BPE (about 300 tokens, merges, three special tokens) with a chat template."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    trained = train_tokenizer([corpus], vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    return Tokenizer(trained.backend, bos_id=1, eos_id=2, pad_id=0, add_bos=False, chat_template=CHAT_TEMPLATE)


def make_model(variant: str = "llama", **overrides) -> Decoder:
    """tiny-llama with 320 rows (more than the tokenizer's 300 ids) and random norms and biases, so a misplaced or
    mis-permuted tensor changes the logits."""
    model = tiny_decoder("tiny-llama", **{"vocab_size": 320, **VARIANTS[variant], **overrides})
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return model


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K row order, written here independently of the exporter."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_reference(model: Decoder, quant: str, arch: str) -> dict[str, tuple[Q, np.ndarray]]:
    """GGUF name -> (type, raw data) llama.cpp's converter would store: its names, its Q/K order, 1-D tensors in
    F32, the LM head in Q8_0 at 4-bit types, blocks packed by gguf.quants (llama.cpp's packers in numpy)."""
    names = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
             "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    config, expected = model.config, {}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().copy()
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            module, suffix = rest.rsplit(".", 1)
            if arch == "llama" and module in ("attn.q_proj", "attn.k_proj"):
                array = llama_cpp_permute(array, config.n_heads if module == "attn.q_proj" else config.n_kv_heads)
            target = f"blk.{index}.{names[module]}.{suffix}"
        else:
            target = {"embed.weight": "token_embd", "final_norm.weight": "output_norm", "lm_head.weight": "output"}[name]
            target += ".weight"
        head = target == "output.weight" or (target == "token_embd.weight" and config.tie_embeddings)
        qtype = Q.F32 if array.ndim == 1 else Q.Q8_0 if head and quant.startswith("q4") else TYPES[quant]
        data = array.astype(np.float16) if qtype == Q.F16 else array if qtype == Q.F32 else \
            gguf.quants.quantize(array, qtype)
        expected[target] = (qtype, data)
    return expected


def dequantized_state_dict(model: Decoder, quant: str) -> dict[str, torch.Tensor]:
    """The weights a reader of the exported file gets: quantization acts on each row alone, so it commutes with
    llama.cpp's row permutation and is computed here on llmkit's layout."""
    config, result = model.config, {}
    for name, tensor in model.state_dict().items():
        head = name == "lm_head.weight" or (name == "embed.weight" and config.tie_embeddings)
        qtype = Q.F32 if tensor.ndim == 1 else Q.Q8_0 if head and quant.startswith("q4") else TYPES[quant]
        if qtype == Q.F32:
            result[name] = tensor.clone()
        elif qtype == Q.F16:
            result[name] = tensor.half().float()
        else:
            packed = gguf.quants.quantize(tensor.numpy(), qtype)
            result[name] = torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(tensor.shape).copy())
    return result


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# --- the file against gguf.quants, transformers' GGUF loader and llmkit's importer


@pytest.mark.parametrize("quant", TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_matches_llama_cpp_layout_transformers_and_llmkit(tmp_path, tokenizer, variant, quant):
    model = make_model(variant)
    path = export_gguf(model, tmp_path / f"tiny.{quant}.gguf", tokenizer, quant)
    arch = "qwen2" if variant == "qwen2" else "llama"

    reader = gguf.GGUFReader(path)
    expected = gguf_reference(model, quant, arch)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    for tensor in reader.tensors:  # the exact bytes llama.cpp's converter and packers write
        qtype, data = expected[tensor.name]
        assert tensor.tensor_type == qtype, tensor.name
        assert np.array_equal(np.asarray(tensor.data).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(data).reshape(-1).view(np.uint8)), tensor.name
    assert reader.fields["general.architecture"].contents() == arch

    weights = dequantized_state_dict(model, quant)
    reference = Decoder(model.config).eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        ours = reference(IDS)
    theirs = transformers_logits(path, IDS)
    # Same weights (the dequantized bytes) in both: only fp32 summation order differs (observed ~1e-7).
    assert (ours - theirs).abs().max() <= 1e-5
    if quant == "f16":
        with torch.no_grad():
            original = model(IDS)
        # Each weight rounded to fp16 (relative error <= 2^-11); through two layers the logits (size ~1) moved by
        # ~2e-4 here: 2e-3 is that bound with a margin, far below what a wrong tensor would do (~1).
        assert (theirs - original).abs().max() <= 2e-3

    loaded = load_model(path)  # llmkit's importer: the dequantized bytes exactly
    state_dict = loaded.state_dict()
    assert sorted(state_dict) == sorted(weights)
    for name, tensor in weights.items():
        assert torch.equal(state_dict[name], tensor), name
        if quant == "f32":
            assert torch.equal(state_dict[name], model.state_dict()[name]), name
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    assert loaded.config.qkv_bias == model.config.qkv_bias


@pytest.mark.parametrize("d_model", [256, 64])  # 64: rows that are not whole 256-value super-blocks
def test_q4_k_m_is_llama_quantizes_mix_and_reads_back(tmp_path, tokenizer, d_model):
    model = make_model("tied", d_model=d_model, n_heads=4, n_kv_heads=2, d_ff=512, n_layers=8)
    with pytest.raises(LlmkitError, match="pack=llmkit.quant.pack_gguf"):  # gguf.quants cannot write K-quants
        export_gguf(model, tmp_path / "no.gguf", tokenizer, "q4_k_m")
    path = export_gguf(model, tmp_path / "tiny.Q4_K_M.gguf", tokenizer, "q4_k_m", pack=pack_gguf)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    # llama-quantize: Q6_K for the (tied) head and for attn_v / ffn_down in layers 0, 3, 6, 7 of 8 (the first and last
    # eighth, every third between); Q4_K elsewhere; rows of 64 fall back to Q5_0 (Q4_K) and Q8_0 (Q6_K)
    k4, k6 = (Q.Q4_K, Q.Q6_K) if d_model == 256 else (Q.Q5_0, Q.Q8_0)
    assert types["token_embd.weight"] == k6 and types["blk.0.attn_norm.weight"] == Q.F32
    for layer in range(8):
        more = layer in (0, 3, 6, 7)
        assert types[f"blk.{layer}.attn_v.weight"] == (k6 if more else k4)
        assert types[f"blk.{layer}.ffn_down.weight"] == (Q.Q6_K if more else Q.Q4_K)  # rows of d_ff = 512
        assert types[f"blk.{layer}.attn_q.weight"] == types[f"blk.{layer}.ffn_up.weight"] == k4
    # gguf.quants' own dequantizer (llama.cpp's reference in numpy) reads every block back near the weights
    for tensor in reader.tensors:
        if tensor.tensor_type in (Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0):
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            assert np.isfinite(values).all() and np.abs(values).max() < 10, tensor.name
    # transformers' GGUF loader and llmkit's importer read the same weights: the same logits; the packed load runs
    # the K-quant blocks on llmkit's kernels within int8-activation error of them
    theirs = transformers_logits(path, IDS)
    with torch.no_grad():
        ours = load_model(path)(IDS)
        original = model(IDS)
        packed = load_gguf_quantized(path)(IDS)
    assert (ours - theirs).abs().max() <= 1e-5
    assert 0 < (ours - original).abs().max() <= 0.5  # 4-6 bit weights: close to the float model, not equal
    assert (packed - ours).abs().max() <= 0.1


def test_tokenizer_and_metadata_survive(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    model = make_model("tied")
    path = export_gguf(model, tmp_path / "tiny.gguf", tokenizer, "q8_0")
    fields = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
    config = model.config
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    for key, value in {"block_count": 2, "context_length": 256, "embedding_length": 64, "feed_forward_length": 128,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                       "vocab_size": 320}.items():
        assert fields[f"llama.{key}"] == value, key
    assert np.float32(fields["llama.rope.freq_base"]) == np.float32(config.rope_theta)
    assert np.float32(fields["llama.attention.layer_norm_rms_epsilon"]) == np.float32(config.norm_eps)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320 and tokens[:3] == SPECIALS and types[:4] == [3, 3, 3, 1]
    assert tokens[300:302] == ["[PAD300]", "[PAD301]"] and set(types[300:]) == {5}  # llama.cpp's padding
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges] != []
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.padding_token_id"] == 0 and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE

    ids = tokenizer.encode(TEXT)
    read_back = load_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert read_back.encode(TEXT) == ids
    assert reference(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert len(ids) < len(TEXT.encode()) and read_back.decode(ids) == TEXT  # merges applied, text round-trips
    assert (read_back.bos_id, read_back.eos_id, read_back.pad_id, read_back.add_bos) == (1, 2, 0, False)
    messages = [{"role": "user", "content": "Hi"}]
    assert read_back.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def test_add_bos_rule_survives(tmp_path, tokenizer):
    with_bos = Tokenizer(tokenizer.backend, bos_id=1, eos_id=2, add_bos=True)
    path = export_gguf(make_model(), tmp_path / "bos.gguf", with_bos, "f32")
    assert load_tokenizer(path).encode("The fox") == with_bos.encode("The fox") == [1, *tokenizer.encode("The fox")]


def test_rope_scaling_round_trips(tmp_path, tokenizer):
    for scaling in (dict(kind="linear", factor=4.0),
                    dict(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_seq_len=64)):
        model = make_model(rope_scaling=scaling)
        path = export_gguf(model, tmp_path / f"{scaling['kind']}.gguf", tokenizer, "f32")
        loaded = load_model(path)
        assert loaded.config.rope_scaling == model.config.rope_scaling
        with torch.no_grad():
            assert (loaded(IDS) - model(IDS)).abs().max() <= 1e-5
        if scaling["kind"] == "llama3":
            assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}


def test_pre_tokenizer_is_recognised_from_tokenizer_json(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok")
    assert gguf_pre(Tokenizer.from_dir(tmp_path / "tok")) == "gpt-2"
    odd = Tokenizer.from_dir(tmp_path / "tok")
    from tokenizers import pre_tokenizers

    odd.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.warns(UserWarning, match="writing tokenizer.ggml.pre='default', so llama.cpp may split text"):
        assert gguf_pre(odd) == "default"


# --- bad input


def test_models_gguf_cannot_hold_are_refused(tmp_path, tokenizer):
    with pytest.raises(LlmkitError, match=r"exporting .* \(arch='encoder'\) to GGUF is not supported; supported: "
                                          r"llama-family decoders"):
        export_gguf(_encoder(), tmp_path / "x.gguf", tokenizer)
    with pytest.raises(LlmkitError, match=r"exporting tiny-gpt2 to GGUF is not supported \(it has norm='layernorm', "
                                          r"mlp='gelu', position='learned', out_bias=True, mlp_bias=True\)"):
        export_gguf(tiny_decoder("tiny-gpt2"), tmp_path / "x.gguf", tokenizer)
    with pytest.raises(LlmkitError, match=r"--quant 'q5_k' is not a GGUF export type; choose one of f32, f16, q8_0"):
        export_gguf(make_model(), tmp_path / "x.gguf", tokenizer, "q5_k")
    with pytest.raises(LlmkitError, match=r"tensor token_embd.weight has rows of 48 values, not a multiple of "
                                          r"Q4_0's 32-value blocks; export this model with --quant f16"):
        export_gguf(make_model(d_model=48, n_heads=4, n_kv_heads=2, d_ff=64), tmp_path / "x.gguf", tokenizer, "q4_0")
    with pytest.raises(LlmkitError, match=r"the tokenizer has ids up to 299 but the model's embedding has 256 rows"):
        export_gguf(make_model(vocab_size=256), tmp_path / "x.gguf", tokenizer)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary
    export_gguf(make_model(d_model=48, n_heads=4, n_kv_heads=2, d_ff=64), tmp_path / "x.gguf", tokenizer, "f16")


def _encoder():
    torch.manual_seed(0)
    from llmkit.checkpoints import network_for

    return network_for(Config.from_name("tiny-bert"))


def test_cli_convert_to_gguf(tmp_path, capsys, tokenizer):
    model = make_model()
    save_model(model, tmp_path / "native", tokenizer=tokenizer)
    output = tmp_path / "tiny.Q8_0.gguf"
    code, out, _ = run_cli(capsys, "convert", "--model", str(tmp_path / "native"), "--output", str(output),
                           "--to", "gguf", "--quant", "q8_0")
    assert code == 0 and f"to {output} (GGUF q8_0," in out
    weights = dequantized_state_dict(model, "q8_0")
    assert all(torch.equal(load_model(output).state_dict()[name], w) for name, w in weights.items())

    argv = ("convert", "--model", str(tmp_path / "native"), "--to", "gguf")
    code, err = cli_status(capsys, *argv, "--output", str(output))
    assert code == 2 and "--output " + str(output) + " already exists; pass --overwrite to replace it" in err
    assert run_cli(capsys, *argv, "--output", str(output), "--overwrite", "true")[0] == 0
    assert gguf.GGUFReader(output).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    code, err = cli_status(capsys, *argv, "--output", str(tmp_path / "x.gguf"), "--quant", "q5_k")
    assert code == 2 and "q5_k" in err and "q4_0" in err  # jsonargparse names the choices
    code, err = cli_status(capsys, *argv, "--output", str(tmp_path / "x.bin"))
    assert code == 2 and "must be a .gguf file name with --to gguf" in err
    code, err = cli_status(capsys, "convert", "--model", str(tmp_path / "native"), "--output", str(tmp_path / "d"),
                           "--quant", "q8_0")
    assert code == 2 and "--quant q8_0 applies to --to gguf only" in err

    save_model(_encoder(), tmp_path / "bert")
    code, err = cli_status(capsys, "convert", "--model", str(tmp_path / "bert"), "--output", str(tmp_path / "b.gguf"),
                           "--to", "gguf")
    assert code == 2 and "(arch='encoder') to GGUF is not supported" in err and not (tmp_path / "b.gguf").exists()


# --- the real SmolLM2-135M-Instruct (GGUF Q4_1): import -> export -> import


def greedy(model: Decoder, ids: list[int], steps: int = 20) -> list[int]:
    """`steps` greedy tokens after `ids`, through a KV cache (one prefill, then one-token steps): the same argmax at
    each step as re-running the whole sequence, at a fraction of the work (every model here decodes the same way)."""
    cache = model.new_cache(batch_size=1, max_len=len(ids) + steps)
    new, step = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            new.append(int(model(step, cache=cache, last_token_only=True)[0, -1].argmax()))
            step = torch.tensor([[new[-1]]])
    return new


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path, capsys, smollm2_float, smollm2_tokenizer):
    source = default_model_path()
    original, tokenizer = smollm2_float, smollm2_tokenizer  # load_model(source), load_tokenizer(source), read once
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                                                                          "France?"}]))
    expected = greedy(original, prompt)
    source_reader = gguf.GGUFReader(source)  # parsing the 49k-token vocabulary takes seconds: once
    sizes = {}
    for quant in ("q8_0", "f16"):
        path = export_gguf(original, tmp_path / f"smollm2.{quant}.gguf", tokenizer, quant)
        sizes[quant] = path.stat().st_size
        assert greedy(load_model(path), prompt) == expected, quant
        fields = gguf.GGUFReader(path).fields
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "general.name",
                    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
            assert fields[key].contents() == source_reader.fields[key].contents(), key
        assert load_tokenizer(path).chat_template == tokenizer.chat_template
    # Q4_1 of the imported Q4_1 weights: every tensor equals the file llama.cpp wrote, byte for byte (types, the Q/K
    # row order, the Q8_0 token embedding, the blocks re-packed from their own dequantized values)
    path = export_gguf(original, tmp_path / "smollm2.q4_1.gguf", tokenizer, "q4_1")
    sizes["q4_1"] = path.stat().st_size
    written = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    for tensor in source_reader.tensors:
        assert written[tensor.name].tensor_type == tensor.tensor_type, tensor.name
        assert np.array_equal(np.asarray(written[tensor.name].data), np.asarray(tensor.data)), tensor.name
    assert len(written) == 272
    with capsys.disabled():
        print(f"\nSmolLM2-135M GGUF sizes: source Q4_1 {source.stat().st_size:,}, "
              + ", ".join(f"{quant} {size:,}" for quant, size in sizes.items()))
    tokenizer.save(tmp_path / "tok")  # a tokenizer.json source: its pre-tokenizer is recognised as llama.cpp's
    assert gguf_pre(Tokenizer.from_dir(tmp_path / "tok")) == "smollm"
