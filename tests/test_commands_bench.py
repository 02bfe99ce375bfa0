"""`llmkit bench peft` on a tiny model: every figure is the one a direct measurement gives, results resume from
disk, and settings that do not match a saved result are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.checkpoints import load_model, load_tokenizer, save_model
from llmkit.commands.bench import ARMS, RESULT_FILE, TEMPLATE, bench_peft, markdown_table, tokens_per_second
from llmkit.commands.finetune import rouge_on
from llmkit.config import Config
from llmkit.data.sft import builtin_dialogsum
from llmkit.data.tokenizer_train import train_tokenizer
from llmkit.errors import LlmkitError
from llmkit.eval.builtin import shakespeare_perplexity
from llmkit.eval.perplexity import perplexity
from llmkit.models.decoder import Decoder
from llmkit.peft.core import count_parameters
from llmkit.peft.registry import apply_method, load_adapter, settings_from_dict

OPTIONS = dict(methods=["lora", "prompt"], train_rows=6, test_rows=2, steps=4, batch_size=2, max_length=96,
               perplexity_tokens=300, device="cpu")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama with a small BPE tokenizer and a context long enough for whole DialogSum prompts."""
    root = tmp_path_factory.mktemp("shootout")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_perplexity().text[:100_000])
    tokenizer = train_tokenizer([corpus], vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    config = Config.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, max_seq_len=4096)
    save_model(Decoder(config), root / "model", tokenizer=tokenizer)
    return root / "model"


@pytest.fixture(scope="module")
def shootout(tiny_model, tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("bench") / "run"
    return bench_peft(model=str(tiny_model), output=str(output), **OPTIONS), output


def test_each_figure_is_what_a_direct_measurement_gives(tiny_model, shootout):
    report, output = shootout
    results = report["results"]
    assert list(results) == ["base", "lora", "prompt"]
    tokenizer = load_tokenizer(tiny_model)
    base = load_model(tiny_model).eval()
    # "before": the base model's own greedy summaries and perplexity, computed here in this process
    assert results["base"]["rouge"] == pytest.approx(rouge_on(base, tokenizer, builtin_dialogsum("test", 2), TEMPLATE))
    text = shakespeare_perplexity()
    with torch.no_grad():
        expected = perplexity(base, tokenizer, text.text, window=text.window, stride=text.stride, max_tokens=300)
    assert results["base"]["general_perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    total = count_parameters(base)[1]
    for name in ("lora", "prompt"):
        arm, result = ARMS[name], results[name]
        fresh = apply_method(load_model(tiny_model), arm.method, settings_from_dict(arm.method, arm.settings), tokenizer)
        assert result["trainable_parameters"] == count_parameters(fresh)[0]
        assert result["trainable_percent"] == pytest.approx(100 * count_parameters(fresh)[0] / total)
        adapter = output / name / "adapter"
        assert result["adapter_bytes"] == sum(file.stat().st_size for file in adapter.iterdir())
        assert result["train_tokens"] > 0 and result["tokens_per_s"] > 0 and result["peak_memory_mb"] > 0
        # the "after" figures are the trained adapter's: reload it onto the base and score again
        trained = load_adapter(load_model(tiny_model), adapter, tokenizer=tokenizer).eval()
        with torch.no_grad():
            after = perplexity(trained, tokenizer, text.text, window=text.window, stride=text.stride, max_tokens=300)
        assert result["general_perplexity"] == pytest.approx(after.perplexity, rel=1e-5)
        assert result["general_perplexity"] != pytest.approx(expected.perplexity, rel=1e-6)  # training changed it
        assert not (output / name / "checkpoints").exists()  # only kept while an arm can still be resumed


def test_report_files_hold_the_results(shootout):
    report, output = shootout
    saved = json.loads((output / "shootout.json").read_text())
    assert saved["results"] == report["results"] and saved["setup"]["steps"] == OPTIONS["steps"]
    table = (output / "shootout.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["base", "lora", "prompt"]
    assert f"{report['results']['lora']['rouge']['rougeL']:.4f}" in table[3]
    assert (output / "shootout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reuses_saved_results_and_refuses_other_settings(tiny_model, shootout):
    report, output = shootout
    saved_path = output / "lora" / RESULT_FILE
    record = json.loads(saved_path.read_text())
    record["result"]["tokens_per_s"] = 12345.0  # a value no run would produce: seen again only if reused
    saved_path.write_text(json.dumps(record))
    again = bench_peft(model=str(tiny_model), output=str(output), **OPTIONS)
    assert again["results"]["lora"]["tokens_per_s"] == 12345.0
    assert again["results"]["prompt"] == report["results"]["prompt"]
    # the base model's result does not depend on training settings, so it is reused; the LoRA arm's is refused
    with pytest.raises(LlmkitError, match="lora/result.json was made with other settings; pass another --output"):
        bench_peft(model=str(tiny_model), output=str(output), **{**OPTIONS, "methods": ["lora"], "steps": 5})


def test_bad_options_are_refused_before_any_work(tiny_model, tmp_path):
    with pytest.raises(LlmkitError, match=r"unknown methods \['lorra'\]; choose from full, last_2_blocks"):
        bench_peft(model=str(tiny_model), methods=["lorra"], output=str(tmp_path))
    with pytest.raises(LlmkitError, match="batch_size=8 is more than train_rows=4"):
        bench_peft(model=str(tiny_model), train_rows=4, batch_size=8, output=str(tmp_path))
    with pytest.raises(LlmkitError, match="model not found: .*nothing.gguf"):
        bench_peft(model=str(tmp_path / "nothing.gguf"), output=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_tokens_per_second_is_the_median_step_rate_skipping_warmup_and_resume_gaps(tmp_path):
    rows = [{"kind": "train", "step": step, "tokens": 100 * step, "elapsed_s": elapsed}
            for step, elapsed in [(1, 5.0), (2, 6.0), (3, 7.0), (4, 7.5), (5, 8.5)]]
    rows += [{"kind": "eval", "step": 5, "val_loss": 1.0}]
    rows += [{"kind": "train", "step": 6, "tokens": 600, "elapsed_s": 2.0},  # resumed: the clock restarted
             {"kind": "train", "step": 7, "tokens": 700, "elapsed_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # step rates: 3 -> 100/1.0, 4 -> 100/0.5, 5 -> 100/1.0, 7 -> 100/1.0; step 2 is warm-up, 6 crosses the restart
    assert tokens_per_second(tmp_path) == 100.0
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(LlmkitError, match="too few training steps"):
        tokens_per_second(tmp_path)


def test_markdown_table_names_the_method_behind_each_arm():
    rouge = {"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25}
    trained = {"trainable_parameters": 1000, "trainable_percent": 0.5, "adapter_bytes": 2_500_000, "weights_mb": 10.0,
               "peak_memory_mb": 300.0, "tokens_per_s": 99.0, "rouge": rouge, "general_perplexity": 12.5}
    table = markdown_table({"base": {"weights_mb": 10.0, "rouge": rouge, "general_perplexity": 12.0},
                            "dora": trained, "lora": trained})
    lines = table.splitlines()
    assert lines[2].startswith("| base | - | - | - | 10 | - | - | 0.3000 | 0.1000 | 0.2500 | 12.00 |")
    assert lines[3].startswith("| dora (lora) | 1,000 | 0.500 | 2.5 MB | 10 | 300 | 99 |")
    assert lines[4].startswith("| lora | 1,000 |")
