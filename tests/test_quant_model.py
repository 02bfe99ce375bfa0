"""quant.quantize / dequantize on a model, native quantized checkpoints (packed on disk and in memory), the
`llmkit quantize` verb end to end with generate / perplexity / info on its output, and SmolLM2's perplexity cost."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from helpers import byte_tokenizer, run_cli, tiny_decoder

from llmkit import LlmkitError
from llmkit.checkpoints import load_model, save_model
from llmkit.checkpoints.native import QUANTIZATION_FILE, WEIGHTS_FILE
from llmkit.data.sources import builtin_corpus_path
from llmkit.eval.perplexity import file_perplexity
from llmkit.quant import FORMATS, QuantLinear, dequantize, load_quantized, quantize, save_quantized
from llmkit.quant.formats import get_format
from llmkit.quant.linear import KERNEL_MAX_ROWS

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_quantize_swaps_every_target_and_matches_the_dequantized_network(scheme):
    model = tiny_decoder()
    float_weights = {name: m.weight.detach().clone() for name, m in model.named_modules()
                     if name.rsplit(".", 1)[-1] in TARGETS}
    ids = torch.randint(0, 256, (2, KERNEL_MAX_ROWS // 2 + 4))  # more rows than any kernel takes: dequantize path
    quantize(model, scheme)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(float_weights) and model.lm_head.__class__.__name__ == "Linear"
    with torch.no_grad():
        quantized_logits = model(ids)
    dequantize(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for name, weight in float_weights.items():  # the inverse holds exactly the format's W_hat
        w_hat = get_format(scheme).dequantize(get_format(scheme).quantize(weight, None), torch.float32)
        assert torch.equal(model.get_submodule(name).weight, w_hat)
    with torch.no_grad():  # 136 rows: the dequantize path in both, so the same fp32 numbers
        assert torch.allclose(model(ids), quantized_logits, atol=1e-5, rtol=0)


def test_quantizing_twice_and_bad_settings_are_clear_errors():
    model = quantize(tiny_decoder(), "int8")
    with pytest.raises(LlmkitError, match="already quantized"):
        quantize(model, "int4")
    with pytest.raises(LlmkitError, match="unknown --scheme"):
        quantize(tiny_decoder(), "int3")
    with pytest.raises(LlmkitError, match="--group_size 128 does not divide in_features 64"):
        quantize(tiny_decoder(), "int4", group_size=128)  # tiny-llama's width is 64
    with pytest.raises(LlmkitError, match="no QuantLinear"):
        dequantize(tiny_decoder())


@pytest.mark.parametrize("scheme", ["int8", "int4", "q4_0", "nf4"])
def test_checkpoint_round_trip_stays_packed(tmp_path, scheme):
    model = quantize(tiny_decoder(), scheme, head=True)
    save_quantized(model, tmp_path, byte_tokenizer())
    info = json.loads((tmp_path / QUANTIZATION_FILE).read_text())
    assert info["scheme"] == scheme and info["head"] and len(info["layers"]) == 14
    loaded = load_quantized(tmp_path)
    packed_dtypes = {b.dtype for m in loaded.modules() if isinstance(m, QuantLinear) for b in m.buffers()}
    assert packed_dtypes & {torch.int8, torch.uint8}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            again = loaded.get_submodule(name)
            ours, theirs = layer.packed.tensors, again.packed.tensors
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
        assert torch.equal(model(ids[:, :1]), loaded(ids[:, :1]))  # one row: the kernel path, same in both
    file_bytes = (tmp_path / WEIGHTS_FILE).stat().st_size
    held = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    assert held < 1.35 * file_bytes  # int4 layers also hold bf16 kernel scales (1 bit per weight at g32)
    with pytest.raises(LlmkitError, match="quantized llmkit checkpoint.*load_quantized"):
        load_model(tmp_path)  # the float loader refuses it, naming the loader to use


def test_cli_quantize_then_generate_perplexity_info(tmp_path, capsys):
    save_model(tiny_decoder(), tmp_path / "tiny", byte_tokenizer())
    out = tmp_path / "tiny-int8"
    code, stdout, err = run_cli(capsys, "quantize", "--model", str(tmp_path / "tiny"), "--scheme", "int8",
                                "--output", str(out), "--perplexity_tokens", "200")
    assert code == 0, err
    assert "float32" in stdout and "-> int8" in stdout and "perplexity on 200 tokens" in stdout
    assert (out / QUANTIZATION_FILE).is_file() and (out / "tokenizer.json").is_file()
    code, stdout, err = run_cli(capsys, "info", "--model", str(out))
    assert code == 0 and "quantized        int8, 14 linear layers" in stdout and "weights in RAM" in stdout
    code, stdout, err = run_cli(capsys, "generate", "--model", str(out), "--prompt", "ab", "--max_new_tokens", "4")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "perplexity", "--model", str(out), "--max_tokens", "100")
    assert code == 0 and "perplexity" in stdout, err
    code, stdout, err = run_cli(capsys, "quantize", "--model", str(out), "--output", str(tmp_path / "again"))
    assert code == 2 and "already quantized" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run_cli(capsys, "quantize", "--model", str(tmp_path / "tiny"), "--scheme", "int4",
                                "--group_size", "48", "--output", str(tmp_path / "g48"))
    assert code == 2 and "--group_size" in err


def test_cli_quantize_to_k_quants_checks_every_width_first(tmp_path, capsys):
    # K-quant super-blocks of 256 inputs: a model whose projections all take 256-multiples quantizes and runs packed
    save_model(tiny_decoder(d_model=256, n_heads=4, n_kv_heads=2, d_ff=512), tmp_path / "wide", byte_tokenizer())
    code, stdout, err = run_cli(capsys, "quantize", "--model", str(tmp_path / "wide"), "--scheme", "q4_k",
                                "--output", str(tmp_path / "wide-q4_k"), "--perplexity_tokens", "100")
    assert code == 0, err
    assert "-> q4_k" in stdout and "perplexity on 100 tokens" in stdout
    model = load_quantized(tmp_path / "wide-q4_k")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {layer.scheme for layer in layers} == {"q4_k"}
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    float_model = load_model(tmp_path / "wide")
    with torch.no_grad():
        assert (model(ids) - float_model(ids)).abs().max() < 0.5  # 4.5-bit weights: near, not equal
    # 64-wide rows (tiny_decoder's default d_model) are not whole super-blocks: refused before anything is written
    save_model(tiny_decoder(), tmp_path / "narrow", byte_tokenizer())
    code, _, err = run_cli(capsys, "quantize", "--model", str(tmp_path / "narrow"), "--scheme", "q6_k",
                           "--output", str(tmp_path / "narrow-q6_k"))
    assert code == 2 and "multiple of 256" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "narrow-q6_k").exists()


MEASURE_RSS = """
import sys, tempfile
from llmkit import Config
from llmkit.memory import proc_status_kib
from llmkit.models.decoder import Decoder
from llmkit.quant import load_quantized, quantize, save_quantized
warm = tempfile.mkdtemp()  # a first, tiny load pays the one-off costs (allocator arenas, kernel set-up: ~70 MiB)
save_quantized(quantize(Decoder(Config.from_name("tiny-llama")), "int8"), warm)
load_quantized(warm)
before = proc_status_kib("VmRSS")
model = load_quantized(sys.argv[1])
print((proc_status_kib("VmRSS") - before) * 1024)
"""


@pytest.mark.slow
def test_smollm2_int8_within_one_percent_int4_g32_within_35_percent_q4_1_lossless(tmp_path, smollm2_float,
                                                                                   smollm2_tokenizer):
    """Each scheme quantizes its own deep copy of the shared fp32 load (the same weights a fresh load_model gives)."""
    tokenizer = smollm2_tokenizer

    def ppl(model):  # noqa: ANN001, ANN202
        return file_perplexity(model, tokenizer, builtin_corpus_path(), max_tokens=2048).perplexity

    base = ppl(smollm2_float)
    int8 = quantize(copy.deepcopy(smollm2_float), "int8")
    save_quantized(int8, tmp_path / "int8", tokenizer)
    del int8
    int8_ppl = ppl(load_quantized(tmp_path / "int8"))
    int4_ppl = ppl(quantize(copy.deepcopy(smollm2_float), "int4", group_size=32))
    print(f"SmolLM2 perplexity, 2,048 tokens of Tiny Shakespeare: fp32 {base:.3f}, int8 {int8_ppl:.3f}, "
          f"int4 g32 {int4_ppl:.3f}")
    assert abs(int8_ppl / base - 1) < 0.01  # the bound
    # SmolLM2's shipped weights are Q4_1 (dequantized): re-rounding them to another 4-bit grid compounds two roundings.
    # Measured here (2,048 tokens): int4 g32 +28.6%, int4_asym g32 +20%, q4_0 +17% (the bytes llama.cpp's Q4_0 writes);
    # int8 +0.65%. Bound for int4 g32: 35%. The full-precision picture needs fp32 weights (issue 12's quality report).
    assert abs(int4_ppl / base - 1) < 0.35
    # Q4_1 again is lossless: every block's min and step already lie on the Q4_1 grid, so the same weights come back
    q4_1_ppl = ppl(quantize(copy.deepcopy(smollm2_float), "q4_1"))
    assert abs(q4_1_ppl / base - 1) < 1e-6
    # stays quantized: loading adds about the file's size to the process (fresh interpreter, VmRSS before/after;
    # measured 205 MiB for a 210 MiB file)
    file_bytes = (tmp_path / "int8" / WEIGHTS_FILE).stat().st_size
    result = subprocess.run([sys.executable, "-c", MEASURE_RSS, str(tmp_path / "int8")], capture_output=True,
                            text=True, check=True)
    added = int(result.stdout.strip().splitlines()[-1])
    print(f"int8 file {file_bytes / 2**20:.1f} MiB, RSS added by load_quantized {added / 2**20:.1f} MiB")
    assert added < 1.1 * file_bytes
