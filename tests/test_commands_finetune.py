"""`llmkit finetune`: every method through the one loop, adapters that reload to the same model, ROUGE on the
built-in data, and `chat --adapter`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.checkpoints import load_model, load_tokenizer, save_model
from llmkit.commands.finetune import finetune
from llmkit.config import Config
from llmkit.data.sources import builtin_corpus_path
from llmkit.data.tokenizer_train import train_tokenizer
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.peft.registry import METHODS, load_adapter, settings_from_dict
from llmkit.peft.settings import LoraSettings, PromptTuningSettings
from llmkit.train.settings import TrainSettings

SETTINGS = {"lora": {"rank": 4, "alpha": 8}, "qlora": {"rank": 4, "alpha": 8}, "prompt": {"n_virtual_tokens": 4},
            "prefix": {"n_virtual_tokens": 4, "hidden": 16}, "ia3": {}, "adapter": {"bottleneck": 8},
            "selective": {"mode": "last_blocks", "n_blocks": 1}}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama with a BPE tokenizer trained on a little Shakespeare, and a 40-row instruction file."""
    root = tmp_path_factory.mktemp("finetune")
    corpus = root / "corpus.txt"
    text = builtin_corpus_path().read_text(encoding="utf-8")
    corpus.write_text(text[:200_000])
    tokenizer = train_tokenizer([corpus], vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id))
    save_model(model, root / "base", tokenizer=tokenizer)
    rows = [{"instruction": "Repeat the word.", "input": word, "output": f"{word} {word}"}
            for word in ("king", "queen", "lord", "lady", "sword", "crown", "night", "day") * 5]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "base", data


def run(tiny_base, tmp_path, method: str, **options) -> dict:
    base, data = tiny_base
    train = TrainSettings(max_steps=12, batch_size=4, lr=3e-2, warmup_steps=1, eval_every=6, eval_batches=2,
                          checkpoint_every=6, log_every=1)
    settings = {method: settings_from_dict(method, SETTINGS[method])}  # the typed flags --METHOD.X
    return finetune(model=str(base), data=[str(data)], method=method, template="alpaca", max_length=200, train=train,
                    output=str(tmp_path / method), **settings, **options)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_every_method_trains_and_its_adapter_reloads_onto_the_base(tiny_base, tmp_path, method, one_thread):
    assert set(SETTINGS) == set(METHODS)
    summary = run(tiny_base, tmp_path, method)
    assert summary["steps"] == 12 and summary["val_loss"] is not None
    metrics = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in metrics if row["kind"] == "train"]
    assert sum(losses[-4:]) < sum(losses[:4]), losses  # 12 noisy steps: compare the first and last four

    tokenizer = load_tokenizer(tiny_base[0])
    reloaded = load_adapter(load_model(tiny_base[0]), summary["adapter"], tokenizer=tokenizer).eval()
    base = load_model(tiny_base[0]).eval()
    ids = torch.tensor([tokenizer.encode("Repeat the word. king")])
    with torch.no_grad():
        assert not torch.allclose(reloaded(ids), base(ids), atol=1e-4), "the adapter changed nothing"
        # The adapter written at the end reproduces the trained model: reload it twice, same logits.
        again = load_adapter(load_model(tiny_base[0]), summary["adapter"], tokenizer=tokenizer).eval()
        torch.testing.assert_close(again(ids), reloaded(ids))


def test_merged_lora_model_equals_the_adapter_on_its_base(tiny_base, tmp_path, one_thread):
    summary = run(tiny_base, tmp_path, "lora", merge=True)
    tokenizer = load_tokenizer(tiny_base[0])
    adapted = load_adapter(load_model(tiny_base[0]), summary["adapter"], tokenizer=tokenizer).eval()
    merged = load_model(summary["merged"]).eval()
    ids = torch.tensor([tokenizer.encode("Repeat the word. crown")])
    with torch.no_grad():
        # fp32: W + s*B@A rounds differently from W@x + s*B@(A@x); after lr 3e-2 training the logits (|x| < 1)
        # differ by up to ~3e-5, while the same two models run in float64 agree to ~7e-7 (the merged fp32 weights)
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-4, rtol=1e-5)


def test_merge_is_refused_for_methods_that_cannot_fold(tiny_base, tmp_path, one_thread):
    with pytest.raises(LlmkitError, match="--merge works for lora and ia3"):
        run(tiny_base, tmp_path, "prompt", merge=True)


def test_an_unknown_method_flag_is_a_usage_error_before_any_model_loads(monkeypatch, capsys):
    import llmkit.checkpoints
    from llmkit.cli import main

    monkeypatch.setattr(llmkit.checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--lora.rnak", "4"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --lora.rnak" in capsys.readouterr().err


def test_another_methods_flag_with_method_is_refused(tiny_base, tmp_path, monkeypatch):
    base, data = tiny_base
    import llmkit.checkpoints

    monkeypatch.setattr(llmkit.checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(LlmkitError, match=r"--lora.rank: settings of method lora, but --method is ia3; pass --method "
                                          r"lora, or drop --lora.rank"):
        finetune(model=str(base), data=[str(data)], method="ia3", lora=LoraSettings(rank=4), output=str(tmp_path / "x"))


def test_a_bad_setting_is_one_error_line_through_the_cli(capsys):
    from llmkit.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--lora.rank", "0", "--model", "no/such/model"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err == "error: LoRA rank=0 must be a positive integer (8 or 16 are common)\n"


def test_examples_longer_than_the_context_with_virtual_tokens_are_refused(tiny_base, tmp_path):
    base, data = tiny_base
    with pytest.raises(LlmkitError, match="--max_length 256 plus 4 virtual tokens exceeds tiny-llama's context window"):
        finetune(model=str(base), data=[str(data)], method="prompt", prompt=PromptTuningSettings(n_virtual_tokens=4),
                 max_length=256, output=str(tmp_path / "x"))


def test_chat_and_generate_apply_an_adapter(tiny_base, tmp_path, capsys, one_thread):
    from llmkit.cli import main

    summary = run(tiny_base, tmp_path, "lora")
    main(["generate", "--model", str(tiny_base[0]), "--prompt", "[Repeat the word. king]", "--max_new_tokens", "6"])
    base_text = capsys.readouterr().out
    main(["generate", "--model", str(tiny_base[0]), "--adapter", summary["adapter"], "--prompt",
          "[Repeat the word. king]", "--max_new_tokens", "6"])
    assert capsys.readouterr().out != base_text
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_base[0]), "--adapter", str(tmp_path / "nothing"), "--prompt", "[hi]"])
    assert "nothing/adapter_config.json does not exist" in capsys.readouterr().err


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("finetune_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_finetune_recipe_parses_and_its_settings_fit_its_method(recipe):
    import yaml

    from llmkit.cli import build_parser
    from llmkit.commands.finetune import chosen_settings

    parser = build_parser(["finetune"])
    options = parser.instantiate_classes(parser.parse_args(["finetune", "--config", str(recipe)])).finetune
    assert recipe.read_text().splitlines()[0] == f"# llmkit finetune --config recipes/{recipe.name}"
    assert options.method in yaml.safe_load(recipe.read_text())  # the recipe sets its method's --METHOD.X flags
    # parse_args raised on a field the method does not have; this raises on another method's settings
    chosen_settings(options.method, {name: getattr(options, name) for name in METHODS})


def test_there_is_a_recipe_for_every_method():
    assert {path.stem.removeprefix("finetune_") for path in RECIPES} == set(METHODS)


def test_the_torch_free_settings_name_what_the_methods_accept():
    from typing import get_args

    from llmkit.peft.adapters import ACTIVATIONS
    from llmkit.peft.settings import NF4_BLOCK_SIZE, NF4_TARGETS, Activation, ComputeDtype
    from llmkit.quant.nf4 import COMPUTE_DTYPES, DEFAULT_BLOCK_SIZE, DEFAULT_TARGETS

    assert set(get_args(Activation)) == set(ACTIVATIONS) and set(get_args(ComputeDtype)) == set(COMPUTE_DTYPES)
    assert (NF4_BLOCK_SIZE, NF4_TARGETS) == (DEFAULT_BLOCK_SIZE, DEFAULT_TARGETS)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--limit", "-3"], r"--limit -3 must be at least 1 \(the most rows to use\); pass --limit null for every row"),
        (["--limit", "0"], r"--limit 0 must be at least 1"),
        (["--rouge_rows", "-1"], r"--rouge_rows -1 must be 0"),
    ],
)
def test_cli_refuses_a_limit_below_one(options, message, tiny_base, tmp_path, capsys):
    """`finetune --limit -3` went on and reported '0 records'."""
    import re

    from llmkit.cli import main

    base, data = tiny_base
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--model", str(base), "--data", f"[{data}]", "--output", str(tmp_path / "x"), *options])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(message, err) and err.count("\n") == 1


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hello", "output": "hi"}, r"map yours with --fields.instruction NAME or --fields.input NAME"),
        ({"instruction": "Say hi."}, r"name the field that holds the output with --fields.output NAME"),
        ({"instruction": "Say hi.", "output": " "}, r"fill or drop the row \(or pass --skip_bad_rows true\)"),
    ],
)
def test_data_errors_name_the_cli_flags(row, message, tiny_base, tmp_path, capsys):
    """The errors named Python calls (FieldMap(output=...), skip_bad_rows=True) that a CLI user cannot type."""
    import re

    from llmkit.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--model", str(tiny_base[0]), "--data", f"[{data}]", "--output", str(tmp_path / "x"),
              "--max_length", "200"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(message, err) and "FieldMap" not in err and err.count("\n") == 1
