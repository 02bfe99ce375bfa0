"""`llmkit pretrain` end to end on the built-in corpus, its YAML recipes, and its input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.cli import build_parser, main
from llmkit.commands.pretrain import pretrain
from llmkit.data.sources import builtin_corpus_path
from llmkit.errors import LlmkitError
from llmkit.train.settings import TrainSettings

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("pretrain_*.yaml"))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """80 steps of a tiny model on Tiny Shakespeare with a 512-token BPE, through the CLI."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    main(["pretrain", "--model", "tiny-llama", "--vocab_size", "512", "--seq_len", "64", "--output", str(run_dir),
          "--train.max_steps", "80", "--train.batch_size", "8", "--train.lr", "0.01", "--train.warmup_steps", "8",
          "--train.eval_every", "40", "--train.eval_batches", "4", "--train.checkpoint_every", "40",
          "--sample.max_new_tokens", "12"])
    return run_dir


def test_loss_on_tiny_shakespeare_falls_below_the_threshold(short_run):
    rows = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    train = [row["loss"] for row in rows if row["kind"] == "train"]
    evals = [row for row in rows if row["kind"] == "eval"]
    # A uniform guess over 512 tokens is ln(512) = 6.24 nats; 80 steps of the 2-layer model reach ~4.78 (seen here).
    assert train[0] > 6.0
    assert evals[-1]["val_loss"] < 5.0
    assert [row["step"] for row in evals] == [40, 80]
    assert all(isinstance(row["sample"], str) and row["sample"] for row in evals)


def test_the_run_directory_holds_data_checkpoints_and_plots(short_run):
    manifest = json.loads((short_run / "data" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512
    assert sorted(path.name for path in (short_run / "checkpoints").iterdir()) == ["step-00000040", "step-00000080"]
    assert (short_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_the_final_checkpoint_generates_text(short_run, capsys):
    main(["generate", "--model", str(short_run / "checkpoints" / "step-00000080"), "--prompt", "ROMEO:",
          "--max_new_tokens", "16", "--temperature", "1.0", "--seed", "0"])
    assert capsys.readouterr().out.strip()


def test_running_the_same_command_again_resumes_and_stops_at_once(short_run, capsys):
    result = pretrain(model="tiny-llama", seq_len=64, output=str(short_run), data=str(short_run / "data"),
                      train=TrainSettings(max_steps=80, batch_size=8, warmup_steps=8, eval_every=40, eval_batches=4))
    assert result.steps == 80
    assert "resuming from" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_shipped_recipe_parses(recipe):
    arguments = build_parser().parse_args(["pretrain", "--config", str(recipe)])
    options = arguments.pretrain
    assert options.train.max_steps > 0 and options.seq_len > 0
    assert recipe.read_text().startswith("# ") and "pretrain --config recipes/" in recipe.read_text().splitlines()[0]


def test_a_sequence_longer_than_the_context_is_refused(short_run):
    with pytest.raises(LlmkitError, match="seq_len=512 exceeds tiny-llama's context window of 256"):
        pretrain(model="tiny-llama", seq_len=512, data=str(short_run / "data"), output=str(short_run / "other"))


def test_unprepared_data_is_refused(tmp_path):
    with pytest.raises(LlmkitError, match="llmkit prepare"):
        pretrain(model="tiny-llama", data=str(tmp_path / "missing"), output=str(tmp_path / "run"))


def test_data_mixing_a_prepared_folder_and_raw_files_is_refused(short_run, tmp_path):
    text = tmp_path / "more.txt"
    text.write_text("more text")
    with pytest.raises(LlmkitError, match=r"--data mixes the prepared folder .*data with other paths"):
        pretrain(model="tiny-llama", data=[str(short_run / "data"), str(text)], output=str(tmp_path / "run"))


def test_raw_data_other_than_the_runs_is_refused_before_replacing_its_shards(short_run, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("other text " * 200)
    manifest = (short_run / "data" / "manifest.json").read_text()
    with pytest.raises(LlmkitError, match="already holds data prepared from other inputs; choose another --output"):
        pretrain(model="tiny-llama", data=str(text), output=str(short_run))
    assert (short_run / "data" / "manifest.json").read_text() == manifest


def test_chat_with_a_pretrained_checkpoint_completes_the_conversation_text(short_run, capsys, monkeypatch):
    """pretrain's help suggests `llmkit chat --model OUTPUT/checkpoints/step-N`; its tokenizer has no chat template,
    which made chat fail. It now chats by plain completion of the transcript, says so once, and a piped line of bytes
    that are not UTF-8 is one error line while the next line is still answered."""
    import io
    import sys

    from llmkit.checkpoints import load_tokenizer

    checkpoint = short_run / "checkpoints" / "step-00000080"
    assert load_tokenizer(checkpoint).chat_template is None
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ROMEO:\ncaf\xe9\nJULIET:\n"), encoding="utf-8"))
    main(["chat", "--model", str(checkpoint), "--max_new_tokens", "8"])
    captured = capsys.readouterr()
    assert captured.err.count("has no chat template: chatting by plain completion") == 1
    assert "error: this line of input holds bytes that are not UTF-8 (byte b'\\xe9' at character 3)" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out.count("\n") >= 2  # two replies, each ended by a newline (a tiny model may write blanks)


def test_chat_drops_the_oldest_turns_to_fit_and_refuses_one_message_that_cannot(short_run, capsys, monkeypatch):
    from llmkit.commands.chat import chat

    checkpoint = str(short_run / "checkpoints" / "step-00000080")
    with pytest.raises(LlmkitError, match=r"your message takes .* tokens of the prompt; tiny-llama's context is 256 "
                                          r"tokens with --max_new_tokens 8: shorten the message"):
        chat(model=checkpoint, message="word " * 400, max_new_tokens=8)
    import io
    import sys

    turns = "".join(f"{'ROMEO and JULIET ' * 12}{i}\n" for i in range(6)).encode()  # ~6 x 60 tokens: over 256
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(turns), encoding="utf-8"))
    chat(model=checkpoint, max_new_tokens=8)
    err = capsys.readouterr().err
    assert "its oldest turn is dropped" in err and "error:" not in err


@pytest.fixture(scope="module")
def other_vocabularies(short_run, tmp_path_factory) -> dict[int, Path]:
    """Data prepared with tokenizers trained on other text: one of the short run's size (512), one of 600 tokens."""
    from llmkit.commands.prepare import prepare_data

    root = tmp_path_factory.mktemp("other")
    corpus = root / "upper.txt"
    text = builtin_corpus_path().read_text(encoding="utf-8")
    corpus.write_text(text[:300_000].upper())  # other text, other merges: id 300 means another token
    for size in (512, 600):
        prepare_data(data=[str(corpus)], output=str(root / f"data{size}"), vocab_size=size, progress=False)
    return {size: root / f"data{size}" for size in (512, 600)}


def test_init_refuses_shards_of_another_tokenizer_of_the_same_size(short_run, other_vocabularies, tmp_path):
    """Only the vocabulary size was compared: 512 <= 512 passed and the model trained on ids meaning other tokens."""
    checkpoint = short_run / "checkpoints" / "step-00000080"
    data = other_vocabularies[512]
    assert json.loads((data / "manifest.json").read_text())["vocab_size"] == 512
    with pytest.raises(LlmkitError, match=rf"--data {data} was tokenized with .*tokenizer \(512 tokens\) but --init "
                                          rf"{checkpoint} reads ids with its own tokenizer \(512 tokens\), another vocab"):
        pretrain(model="tiny-llama", init=str(checkpoint), data=str(data), seq_len=64, output=str(tmp_path / "run"))
    pretrain(  # its own data: accepted
        model="tiny-llama", init=str(checkpoint), data=str(short_run / "data"), seq_len=64,
        output=str(tmp_path / "same"), train=TrainSettings(max_steps=1, batch_size=2, warmup_steps=0, eval_every=0))


@pytest.mark.parametrize("size, extra", [(600, ""), (512, " with other tokens")])
def test_resume_on_data_of_another_vocabulary_names_both(short_run, other_vocabularies, size, extra):
    """The resume failed with 'a different config than this run's (tiny-llama: 2 layers, d_model 64)', never
    naming the vocabulary."""
    data = other_vocabularies[size]
    expected = (rf"{short_run} holds a run on a 512-token vocabulary \(model 512 ids, tokenizer in .*step-00000080\) "
                rf"but --data {data} uses a {size}-token vocabulary \(tokenizer .*tokenizer\){extra}: resume with")
    with pytest.raises(LlmkitError, match=expected):
        pretrain(model="tiny-llama", seq_len=64, output=str(short_run), data=str(data),
                 train=TrainSettings(max_steps=80, batch_size=8, warmup_steps=8, eval_every=40, eval_batches=4))


def test_a_tokenizer_changed_after_prepare_is_refused(short_run, other_vocabularies, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(short_run / "data", data)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # someone retrained the tokenizer in place
        shutil.copy(other_vocabularies[512] / "tokenizer" / name, data / "tokenizer" / name)
    with pytest.raises(LlmkitError, match=rf"the tokenizer at {data}/tokenizer is not the one --data {data} was "):
        pretrain(model="tiny-llama", data=str(data), seq_len=64, output=str(tmp_path / "run"))
