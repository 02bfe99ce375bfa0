"""`llmkit bench quant`: the quantization quality report on tiny random models (decoder and encoder), its bad input,
GPTQ/AWQ provenance in quantization.json and `llmkit info`; on the real all-MiniLM-L6-v2 (slow)."""

import json
import math

import pytest
import torch

from llmkit.checkpoints import save_model
from llmkit.checkpoints.native import QUANTIZATION_FILE
from llmkit.config import Config
from llmkit.eval.perplexity import perplexity
from llmkit.models.encoder import Encoder
from llmkit.quant import awq, calibration_batches, gptq, load_quantized, save_quantized
from tests.helpers import byte_tokenizer, run_cli, shakespeare_text, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(shakespeare_text()[:3000], encoding="utf-8")
    return path


def read_report(output) -> dict:  # noqa: ANN001
    for name in ("quant_report.md", "quant_report.json", "quant_report.png"):
        assert (output / name).is_file(), name
    assert (output / "quant_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((output / "quant_report.json").read_text())


def test_decoder_report_has_a_row_per_scheme_and_kld_falls_with_bits(tmp_path, capsys, text_file):
    model_dir = tmp_path / "tiny"
    save_model(tiny_decoder(), model_dir, byte_tokenizer())
    output = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "bench", "quant", "--model", str(model_dir), "--schemes",
                                "[int8, int4, q4_0]", "--data", str(text_file), "--max_tokens", "400",
                                "--decode_tokens", "4", "--output", str(output))
    assert code == 0, err
    report = read_report(output)
    rows = {row["scheme"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", "int8", "int4", "q4_0"]
    assert "| int4 g32 |" in (output / "quant_report.md").read_text() and "mean KLD" in stdout
    fp32, int8, int4, q4_0 = rows["fp32"], rows["int8"], rows["int4"], rows["q4_0"]
    # Reference perplexity: llmkit's sliding-window perplexity of the same model on the same first 400 tokens.
    expected = perplexity(tiny_decoder(), byte_tokenizer(), text_file.read_text(), max_tokens=400)
    assert fp32["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert int8["n_positions"] == expected.n_tokens
    # Quality falls with the bits: int8 (8 bits + a scale per row) is far closer to fp32 than the 4-bit formats.
    assert 0 < int8["mean_kld"] < int4["mean_kld"] and int8["mean_kld"] < q4_0["mean_kld"]
    assert int8["top1_agreement"] >= int4["top1_agreement"] and int8["p99_kld"] < int4["p99_kld"]
    assert abs(int8["perplexity_change_pct"]) < abs(int4["perplexity_change_pct"]) + 1e-9
    # Bits/weight from the packed tensors: int8 8 + 32/64 (fp32 scale per row of 64 or 128 inputs: mixed widths),
    # int4 g32 4 + 32/32, q4_0 4.5 (llama.cpp's 18-byte blocks of 32).
    assert 8.25 < int8["bits_per_weight"] < 8.5 and int4["bits_per_weight"] == pytest.approx(5.0)
    assert q4_0["bits_per_weight"] == pytest.approx(4.5)
    assert int4["file_bytes"] < int8["file_bytes"] < fp32["file_bytes"]
    assert int8["weights_ram_bytes"] < fp32["weights_ram_bytes"]
    assert all(row["decode_tok_s"] > 0 for row in rows.values())
    assert report["setup"]["threads"] == torch.get_num_threads() and report["setup"]["max_tokens"] == 400


def test_encoder_report_compares_sentence_embeddings(tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny_bert"
    save_model(Encoder(Config.from_name("tiny-bert")).eval(), model_dir, byte_tokenizer())
    lines = tmp_path / "sentences.txt"
    lines.write_text("\n".join(line for line in shakespeare_text().splitlines()[:400] if line.strip())[:6000],
                     encoding="utf-8")
    output = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "bench", "quant", "--model", str(model_dir), "--schemes", "[int8, int4]",
                                "--data", str(lines), "--n_texts", "40", "--output", str(output))
    assert code == 0, err
    rows = {row["scheme"]: row for row in read_report(output)["rows"]}
    assert list(rows) == ["fp32", "int8", "int4"] and "mean cosine" in stdout
    assert rows["fp32"]["mean_cosine"] == pytest.approx(1.0) and rows["fp32"]["retrieval_agreement"] == 1.0
    assert 1 > rows["int8"]["mean_cosine"] > rows["int4"]["mean_cosine"]
    assert rows["int8"]["n_texts"] == 40


@pytest.mark.parametrize(("argv", "message"), [
    (["--schemes", "[int3]"], "--schemes ['int3']: choose from"),
    (["--schemes", "[int8, int8]"], "names a scheme twice"),
    (["--max_tokens", "1"], "--max_tokens must be at least 2"),
    (["--data", "missing.txt"], "--data missing.txt is not a text file"),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    model_dir = tmp_path / "tiny"
    save_model(tiny_decoder(), model_dir, byte_tokenizer())
    code, _, err = run_cli(capsys, "bench", "quant", "--model", str(model_dir), *argv, "--output", str(tmp_path / "o"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_calibrated_schemes_on_an_encoder_are_refused(tmp_path, capsys):
    model_dir = tmp_path / "tiny_bert"
    save_model(Encoder(Config.from_name("tiny-bert")).eval(), model_dir, byte_tokenizer())
    code, _, err = run_cli(capsys, "bench", "quant", "--model", str(model_dir), "--schemes", "[int8, gptq]")
    assert code == 2 and "--schemes gptq calibrates a decoder" in err


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_checkpoints_record_their_provenance_and_info_shows_it(tmp_path, capsys, text_file, method):
    ids = calibration_batches(byte_tokenizer(), text_file, n_sequences=4, seq_len=32)  # after its first 2,048 bytes
    model = (gptq if method == "gptq" else awq)(tiny_decoder(), ids, group_size=32, progress=False)
    save_quantized(model, tmp_path / "q", byte_tokenizer())
    provenance = json.loads((tmp_path / "q" / QUANTIZATION_FILE).read_text())["provenance"]
    assert provenance["method"] == method and provenance["group_size"] == 32
    assert provenance["calibration_tokens"] == 4 * 32 and provenance["calibration_sequences"] == 4
    if method == "gptq":
        assert provenance["damp"] == 0.01 and provenance["act_order"] is False
    else:  # one alpha per scale group of each of the 2 blocks, from the grid {0, 0.05, ..., 0.95}
        alphas = [a for block in provenance["alphas"] for a in block if a is not None]
        assert len(provenance["alphas"]) == 2 and alphas
        assert all(math.isclose(a * provenance["alpha_grid"], round(a * provenance["alpha_grid"])) for a in alphas)
    save_quantized(load_quantized(tmp_path / "q"), tmp_path / "again")  # a reload keeps it
    assert json.loads((tmp_path / "again" / QUANTIZATION_FILE).read_text())["provenance"] == provenance
    code, stdout, err = run_cli(capsys, "info", "--model", str(tmp_path / "q"))
    assert code == 0, err
    assert f"calibrated       {method}, group size 32, 128 calibration tokens" in stdout


@pytest.mark.slow
def test_on_minilm_int8_embeddings_stay_close_and_int4_drifts_more(tmp_path, capsys):
    from llmkit.checkpoints.hf_bert import default_encoder_path

    output = tmp_path / "report"
    code, _, err = run_cli(capsys, "bench", "quant", "--model", str(default_encoder_path()), "--schemes",
                           "[int8, int4]", "--n_texts", "64", "--output", str(output))
    assert code == 0, err
    rows = {row["scheme"]: row for row in read_report(output)["rows"]}
    print({name: (row["mean_cosine"], row["retrieval_agreement"]) for name, row in rows.items()})
    assert rows["int8"]["mean_cosine"] > 0.99
    assert rows["int4"]["mean_cosine"] < rows["int8"]["mean_cosine"]
    assert rows["int8"]["retrieval_agreement"] >= rows["int4"]["retrieval_agreement"]
