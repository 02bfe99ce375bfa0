"""`llmkit prune` on a tiny llmkit checkpoint: it writes a pruned checkpoint and a report; bad flags exit 2 with one
line."""

import json

import pytest
import torch

from llmkit.checkpoints import load_model, save_model
from llmkit.commands.prune import PLOT_FILE, REPORT_FILE
from tests.helpers import byte_tokenizer, cli_status, run_cli, shakespeare_text, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):  # noqa: ANN201
    directory = tmp_path_factory.mktemp("tiny")
    save_model(tiny_decoder(), directory / "model", byte_tokenizer())
    (directory / "calib.txt").write_text(shakespeare_text()[:6000], encoding="utf-8")  # > 2,048 held out + a window
    return directory


def test_prune_writes_a_sparse_checkpoint_and_a_report(tiny_model_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "prune", "--model", str(tiny_model_dir / "model"), "--method", "sparsegpt",
                             "--pattern", "2:4", "--data", str(tiny_model_dir / "calib.txt"), "--n_sequences", "4",
                             "--seq_len", "64", "--perplexity_tokens", "256", "--output", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert set(report["layer_sparsity"].values()) == {0.5}
    assert report["calibration"]["tokens"] == 4 * 64 and report["perplexity"]["after"] > 0
    assert (tmp_path / "out" / PLOT_FILE).stat().st_size > 0 and "perplexity on 256 tokens" in out
    pruned = load_model(tmp_path / "out")
    weight = pruned.blocks[1].mlp.down_proj.weight
    assert torch.all((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2)


def test_structured_prune_writes_the_smaller_model(tiny_model_dir, tmp_path, capsys):
    code, err = cli_status(capsys, "prune", "--model", str(tiny_model_dir / "model"), "--structured", "neurons",
                           "--amount", "0.25", "--importance", "magnitude", "--perplexity_tokens", "0",
                           "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert load_model(tmp_path / "out").config.d_ff == 96
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["parameters"]["after"] == report["parameters"]["before"] - 2 * 3 * 64 * 32


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity 1.5 is not a fraction"),
    (["--method", "magnitude", "--pattern", "3:2"], "--pattern 3:2 keeps 3 of every 2 weights"),
    (["--method", "wanda", "--sparsity", "0.5"], "--method wanda scores weights by their inputs: pass calibration"),
    (["--structured", "heads"], "--structured heads needs --amount"),
    (["--structured", "layers", "--amount", "0.5", "--importance", "magnitude"], "drop --importance magnitude"),
    (["--method", "magnitude", "--sparsity", "0.5", "--amount", "0.2"], "--amount applies to --structured"),
])
def test_bad_flags_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys, flags, message):
    code, err = cli_status(capsys, "prune", "--model", str(tiny_model_dir / "model"), *flags,
                           "--output", str(tmp_path / "out"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
