"""Byte-level BPE training: exact round trips on any text, EOS handling, and the same ids in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmkit.checkpoints import load_tokenizer
from llmkit.commands.tokenizer import tokenizer_train
from llmkit.data.tokenizer_train import TRAINING_RECORD_FILE, train_tokenizer
from llmkit.errors import LlmkitError
from llmkit.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n"
    "It's a truth universally acknowledged, that a single fox in possession of a good tail...\n\n"
) * 30
# Text the tokenizer never saw: scripts, emoji sequences, combining marks, control characters, CRLF, tabs.
UNSEEN_TEXT = (
    "Grüße aus Köln — ça va? Ελληνικά, русский, 日本語のテキスト, 한국어 🤖🎉 👨‍👩‍👧 e\u0301\r\n"
    "\tIndented  double  spaces\x00\x07 <not special> 1234567 \U0010ffff end"
)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus_file: Path) -> Tokenizer:
    return train_tokenizer([corpus_file], vocab_size=300, show_progress=False)


def test_round_trips_unseen_unicode_exactly(trained: Tokenizer) -> None:
    ids = trained.encode(UNSEEN_TEXT)
    assert trained.decode(ids) == UNSEEN_TEXT
    assert max(ids) < trained.vocab_size


def test_learns_merges_and_eos_is_the_first_special_token(trained: Tokenizer) -> None:
    assert trained.vocab_size == 300  # 256 bytes + <|endoftext|> + 43 merges
    assert trained.eos_id == trained.token_to_id("<|endoftext|>") == 0
    assert trained.bos_id is None and trained.add_bos is False
    assert trained.encode(" fox") == [trained.token_to_id("Ġfox")]  # a frequent word became one token
    assert len(trained.encode(" the lazy dog")) < len(b" the lazy dog")
    # the special token is matched whole in text, and decodes back
    ids = trained.encode("fox<|endoftext|>dog")
    assert trained.eos_id in ids and trained.decode(ids) == "fox<|endoftext|>dog"


def test_training_is_deterministic(corpus_file: Path, trained: Tokenizer) -> None:
    again = train_tokenizer([corpus_file], vocab_size=300, show_progress=False)
    assert again.backend.to_str() == trained.backend.to_str()


def test_saved_tokenizer_loads_in_llmkit_and_transformers(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    expected = trained.encode(UNSEEN_TEXT)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(UNSEEN_TEXT) == expected and reloaded.eos_id == trained.eos_id

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / TOKENIZER_FILE))
    assert fast.encode(UNSEEN_TEXT, add_special_tokens=False) == expected
    assert fast.decode(expected) == UNSEEN_TEXT

    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.encode(UNSEEN_TEXT) == expected  # with special tokens on: no BOS is added
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == trained.eos_id
    assert auto.decode(expected) == UNSEEN_TEXT


def test_jsonl_text_field_is_used(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": "zebra zebra zebra", "other": "qqq"}) + "\n" for _ in range(50)))
    tokenizer = train_tokenizer([path], vocab_size=270, text_field="body", show_progress=False)
    assert tokenizer.token_to_id("Ġzebra") is not None and tokenizer.token_to_id("qqq") is None


def test_invalid_settings(corpus_file: Path) -> None:
    with pytest.raises(LlmkitError, match=r"vocab_size 257 leaves no room for merges.*pass --vocab_size 258 or more"):
        train_tokenizer([corpus_file], vocab_size=257)
    with pytest.raises(LlmkitError, match=r"256 bytes plus 2 special token\(s\); pass --vocab_size 259"):
        train_tokenizer([corpus_file], vocab_size=258, special_tokens=("<|endoftext|>", "<|pad|>"))
    with pytest.raises(LlmkitError, match="special_tokens is empty"):
        train_tokenizer([corpus_file], special_tokens=())
    with pytest.raises(LlmkitError, match="min_frequency 0 must be at least 1"):
        train_tokenizer([corpus_file], min_frequency=0)
    with pytest.raises(LlmkitError, match=r"input .*nowhere\.txt does not exist"):
        train_tokenizer([corpus_file.parent / "nowhere.txt"])


def test_cli_verb_writes_a_loadable_directory(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "tok"
    tokenizer_train([str(corpus_file)], output=str(output), vocab_size=280)
    assert {TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, TRAINING_RECORD_FILE} <= {p.name for p in output.iterdir()}
    assert "byte-level BPE with 280 tokens" in capsys.readouterr().out
    loaded = load_tokenizer(output)
    assert loaded.vocab_size == 280 and loaded.decode(loaded.encode(UNSEEN_TEXT)) == UNSEEN_TEXT
    record = json.loads((output / TRAINING_RECORD_FILE).read_text())
    assert record["vocab_size"] == 280 and record["inputs"][0]["path"] == str(corpus_file.resolve())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tokenizer", "train", "--vocab_size", "1000000000"], r"--vocab_size 1,000,000,000 is more than llmkit trains"),
        (["tokenizer", "train", "--vocab_size", "200"], r"vocab_size 200 leaves no room for merges.*--vocab_size 258"),
        (["prepare", "--vocab_size", "1000000000"], r"--vocab_size 1,000,000,000 is more than llmkit trains"),
        (["prepare", "--vocab_size", "-5"], r"vocab_size -5 leaves no room for merges"),
    ],
)
def test_cli_refuses_vocab_sizes_bpe_cannot_train(argv, message, corpus_file, tmp_path, capsys) -> None:
    """1,000,000,000 made the Rust trainer try to allocate 70 GB and abort with a backtrace."""
    import re

    from llmkit.cli import main

    with pytest.raises(SystemExit) as exit:
        main([*argv, "--data", f"[{corpus_file}]", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(message, err) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before anything was read or written


def test_cli_verb_without_data_trains_on_the_builtin_corpus(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmkit.checkpoints import load_tokenizer
    from llmkit.data.sources import builtin_corpus_path

    tokenizer_train(output=str(tmp_path / "tok"), vocab_size=300)
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.vocab_size == 300 and "wrote" in capsys.readouterr().out
    line = builtin_corpus_path().read_text(encoding="utf-8").splitlines()[0]  # "First Citizen:"
    assert len(tokenizer.encode(line, add_bos=False)) < len(line.encode())  # merges learned from Shakespeare's text
