"""Tokenizer tests: the real SmolLM2 GGUF against transformers, tiny GGUFs against transformers' own pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from llmkit.checkpoints import default_model_path, load_tokenizer
from llmkit.errors import LlmkitError
from llmkit.tokenizer import (
    LLAMA3_REGEX,
    QWEN2_REGEX,
    REPLACEMENT_CHAR,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    StreamDecoder,
    Tokenizer,
    stream_decode,
)

# Multilingual, emoji, combining marks, tabs and whitespace runs; no digit runs (see DESIGN.md, Known pitfalls).
MIXED_TEXT = (
    "Hello, world! Grüße aus Köln — ça va? Ελληνικά, русский, 日本語のテキスト, 한국어.\n\n"
    "  Indented\tline with  double  spaces 🤖🎉 and 👨‍👩‍👧 family; e\u0301 (combining).\n   \n"
)
STREAM_TEXT = "日本語 🤖 naïve 👨‍👩‍👧 中文字符 é 😀!"
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
TINY_CORPUS = [
    "Hello world, hello there! It's late and we're testing tokens.\n\n  Indented line\twith tab.",
    "Don't stop: THE QUICK brown fox's tail... jumps 987 times?!  Ünïcödé ça va, 日本語 テキスト 🤖 12345",
] * 20
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_gguf(path: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pre: str, **options) -> Path:
    """Write a GGUF holding only tokenizer metadata, as llama.cpp's converter lays it out."""
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(options.get("model", "gpt2"))
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(merge) for merge in merges])
    writer.add_token_types([3 if token in TINY_SPECIALS else 1 for token in tokens])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    if "add_bos" in options:
        writer.add_add_bos_token(options["add_bos"])
    if "chat_template" in options:
        writer.add_chat_template(options["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def smollm2_hf():
    """transformers' own GGUF tokenizer conversion (slow: ~5 s), the reference for ids and chat template."""
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE (vocab, merges) trained here, so tiny GGUFs have realistic merges."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


# ---- the real SmolLM2 GGUF -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_metadata(smollm2):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert smollm2.add_bos is False  # the GGUF says add_bos_token = False (DESIGN.md)
    assert smollm2.vocab_size == 49152
    assert smollm2.id_to_token(2) == "<|im_end|>" and smollm2.token_to_id("<|im_start|>") == 1
    assert smollm2.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert {0, 1, 2} <= smollm2.special_ids


@pytest.mark.slow
def test_smollm2_ids_match_transformers(smollm2, smollm2_hf):
    ids = smollm2.encode(MIXED_TEXT)
    assert ids == smollm2_hf(MIXED_TEXT)["input_ids"]
    assert len(ids) > 40
    assert smollm2.decode(ids) == MIXED_TEXT
    assert smollm2.encode_batch([MIXED_TEXT, "Hi"]) == [ids, smollm2.encode("Hi")]


@pytest.mark.slow
def test_smollm2_special_tokens_in_text(smollm2, smollm2_hf):
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = smollm2.encode(text)
    assert ids[0] == 1 and 2 in ids
    assert ids == smollm2_hf(text)["input_ids"]
    assert smollm2.decode(ids, skip_special_tokens=True) == "user\nHi\n"


@pytest.mark.slow
def test_smollm2_splits_digits_one_by_one(smollm2, smollm2_hf):
    assert smollm2.encode("12345") == [smollm2.token_to_id(digit) for digit in "12345"]
    # The original SmolLM2 tokenizer.json: Digits(individual_digits=True) before the byte-level regex,
    # rebuilt here around transformers' vocabulary and merges.
    original = BackendTokenizer.from_str(smollm2_hf.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    text = "Call 555-0123 at 10:30 on 2024-11-05; pi = 3.14159.\n\n  0. Item\n  12. Item"
    assert smollm2.encode(text) == original.encode(text, add_special_tokens=False).ids
    # llama.cpp on this file gives ["\n\n  ", "0", "."] (DESIGN.md, Known pitfalls).
    assert [smollm2.decode([i]) for i in smollm2.encode("\n\n  0.")] == ["\n\n  ", "0", "."]


@pytest.mark.slow
@pytest.mark.parametrize("with_system", [False, True])
def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_hf, with_system):
    messages = ([{"role": "system", "content": "You are terse."}] if with_system else []) + CONVERSATION
    ours = smollm2.apply_chat_template(messages)
    assert ours == smollm2_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    assert ("You are terse." in ours) == with_system
    without_prompt = smollm2.apply_chat_template(messages, add_generation_prompt=False)
    assert without_prompt == smollm2_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


@pytest.mark.slow
def test_smollm2_save_round_trip(smollm2, tmp_path):
    from transformers import AutoTokenizer

    smollm2.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    ids = smollm2.encode(MIXED_TEXT + " 12345")
    assert loaded.encode(MIXED_TEXT + " 12345") == ids
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (1, 2, 2, False)
    assert loaded.chat_template == smollm2.chat_template and loaded.stop_ids == smollm2.stop_ids
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(MIXED_TEXT + " 12345")["input_ids"] == ids
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == (
        smollm2.apply_chat_template(CONVERSATION)
    )


@pytest.mark.slow
def test_smollm2_stream_decoder(smollm2):
    ids = smollm2.encode(STREAM_TEXT)
    # The test means something only if some character is spread over several tokens.
    assert any(REPLACEMENT_CHAR in smollm2.decode([token_id]) for token_id in ids)
    decoder = StreamDecoder(smollm2)
    pieces = [decoder.push(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(pieces) == smollm2.decode(ids) == STREAM_TEXT
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "".join(stream_decode(smollm2, ids)) == STREAM_TEXT


@pytest.mark.slow
def test_stream_decoder_flushes_incomplete_bytes(smollm2):
    ids = smollm2.encode("🤖")
    assert len(ids) > 1  # the emoji's four bytes are more than one token
    decoder = StreamDecoder(smollm2)
    assert decoder.push(ids[0]) == ""  # half a character is held back
    assert decoder.flush() == smollm2.decode(ids[:1]) == REPLACEMENT_CHAR  # and given out as decode would


# ---- tiny GGUFs: each pre-tokenizer against a reference pipeline ---------------------------------------------------


def test_qwen2_gguf_matches_transformers_qwen2_tokenizer(tiny_bpe, tmp_path):
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = tiny_bpe
    ours = Tokenizer.from_gguf(write_gguf(tmp_path / "qwen2.gguf", vocab, merges, "qwen2"))
    reference = Qwen2Tokenizer(vocab=vocab, merges=merges)  # builds its pipeline from the same vocab and merges
    text = "Hello there! It's 12345 — THE fox's 987 tails?!\n\n  tab\there\r\n 日本語 🤖 ça"
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text
    assert ours.add_bos is False


def test_gpt2_gguf_matches_transformers_gpt2_tokenizer(tiny_bpe, tmp_path):
    from transformers.models.gpt2.tokenization_gpt2 import GPT2Tokenizer

    vocab, merges = tiny_bpe
    ours = Tokenizer.from_gguf(write_gguf(tmp_path / "gpt2.gguf", vocab, merges, "gpt-2"))
    reference = GPT2Tokenizer(vocab=vocab, merges=merges)
    text = "Hello world, it's 2024!\n\n   Indented\tTAB  ça 🤖 12345"
    assert ours.encode(text) == reference(text)["input_ids"]


def test_llama3_pre_tokenizer(tiny_bpe, tmp_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    assert LLAMA3_REGEX == TikTokenConverter().pattern  # transformers' Llama-3 / cl100k split pattern
    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "llama3.gguf", vocab, merges, "llama-bpe"))
    pieces = [piece for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str("1234567 DON'T\n\nstop")]
    assert pieces == ["123", "456", "7", "ĠDON", "'T", "ĊĊ", "stop"]  # digits in threes, contractions any case
    assert tokenizer.add_bos is True  # llama.cpp adds BOS for llama-bpe unless the file says otherwise
    assert tokenizer.encode("Hello")[0] == tokenizer.bos_id and tokenizer.encode("Hello", add_bos=False)[0] != 1
    no_bos = Tokenizer.from_gguf(write_gguf(tmp_path / "no_bos.gguf", vocab, merges, "llama-bpe", add_bos=False))
    assert no_bos.add_bos is False


def test_llama3_ignores_merges_for_words_in_vocab(tmp_path):
    # "abc" is a token but no merge builds it: llama.cpp (ignore_merges for llama3) emits it whole; qwen2 does not.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate([*TINY_SPECIALS, *sorted(alphabet), "ab", "abc"])}
    merges = [("a", "b")]
    llama3 = Tokenizer.from_gguf(write_gguf(tmp_path / "l.gguf", vocab, merges, "llama3", add_bos=False))
    qwen2 = Tokenizer.from_gguf(write_gguf(tmp_path / "q.gguf", vocab, merges, "qwen2"))
    assert llama3.encode("abc") == [vocab["abc"]]
    assert qwen2.encode("abc") == [vocab["ab"], vocab["c"]]


def test_qwen2_regex_splits_every_digit():
    split = pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated")
    assert [piece for piece, _ in split.pre_tokenize_str("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_default_pre_follows_llama_cpp_regex_chain(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "default.gguf", vocab, merges, "default"))
    pieces = [piece for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str("a+=b 1234567")]
    # Punctuation runs first, then GPT-2's regex, then number runs, then groups of three digits.
    assert pieces == ["a", "+=", "b", "Ġ", "123", "456", "7"]


@pytest.mark.parametrize(("pre", "add_bos"), [("llama-bpe", None), ("qwen2", True), ("llama-bpe", False)])
def test_save_round_trips_through_transformers(tiny_bpe, tmp_path, pre, add_bos):
    from transformers import AutoTokenizer

    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, pre))
    if add_bos is not None:  # the rule changed after loading: the saved files must follow it
        tokenizer.add_bos = add_bos
    tokenizer.save(tmp_path / "saved")
    text = "Hello there, it's 12345 🤖"
    ids = tokenizer.encode(text)
    assert (ids[0] == tokenizer.bos_id) == tokenizer.add_bos
    assert Tokenizer.from_dir(tmp_path / "saved").encode(text) == ids
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")(text)["input_ids"] == ids
    # Without add_bos_token in the config, the post-processor tells whether BOS is added (Llama 3 dirs).
    config_file = tmp_path / "saved" / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    del config["add_bos_token"]
    config_file.write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path / "saved").add_bos is tokenizer.add_bos


def test_from_dir_reads_template_file_and_special_tokens_map(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2")).save(tmp_path / "dir")
    (tmp_path / "dir" / TOKENIZER_CONFIG_FILE).unlink()
    (tmp_path / "dir" / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    (tmp_path / "dir" / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tokenizer = Tokenizer.from_dir(tmp_path / "dir")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, None)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
    assert tokenizer.stop_ids == {0, 2}


def test_chat_template_features_match_transformers(tiny_bpe, tmp_path):
    from transformers import AutoTokenizer

    template = (
        "{{ bos_token }}{% for message in messages %}\n"
        "  {% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}\n"
        "  {% if loop.index0 > 2 %}{% break %}{% endif %}\n"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if tools %}{{ tools | tojson }}{% endif %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    vocab, merges = tiny_bpe
    path = write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2", chat_template=template)
    ours = Tokenizer.from_gguf(path)
    ours.save(tmp_path / "dir")
    reference = AutoTokenizer.from_pretrained(tmp_path / "dir")
    tools = [{"name": "add", "description": "a < b & ü"}]
    messages = [{"role": "system", "content": "  Be brief. "}, *CONVERSATION, {"role": "user", "content": "dropped"}]
    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=tools) == expected
    assert "dropped" not in expected and '"a < b & ü"' in expected
    with pytest.raises(LlmkitError, match="unknown role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


# ---- errors --------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(LlmkitError, match=r"tokenizer not found: .*nothing\.gguf: pass a \.gguf file"):
        Tokenizer.from_gguf(tmp_path / "nothing.gguf")
    with pytest.raises(LlmkitError, match=r"tokenizer not found: .*nothing: pass a \.gguf file or a Hugging Face"):
        Tokenizer.from_dir(tmp_path / "nothing")
    with pytest.raises(LlmkitError, match=r"nothing does not exist; pass a \.gguf file, a Hugging Face model directory"):
        load_tokenizer(tmp_path / "nothing")


def test_garbage_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a gguf file" * 8)
    with pytest.raises(LlmkitError, match=r"model\.gguf is not a readable GGUF file .*download it again"):
        Tokenizer.from_gguf(path)


def test_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LlmkitError, match=f"has no {TOKENIZER_FILE}: pass a Hugging Face tokenizer directory"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(LlmkitError, match="is a directory, not a GGUF file: use Tokenizer.from_dir"):
        Tokenizer.from_gguf(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / TOKENIZER_FILE).write_text('{"model": ')
    with pytest.raises(LlmkitError, match=f"{TOKENIZER_FILE} is not a valid tokenizer file"):
        Tokenizer.from_dir(tmp_path)


def test_unsupported_gguf_tokenizers(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    with pytest.raises(LlmkitError, match="tokenizer.ggml.pre = 'mystery' is not a pre-tokenizer llmkit knows"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "a.gguf", vocab, merges, "mystery"))
    with pytest.raises(LlmkitError, match="tokenizer.ggml.model = 't5' is not supported"):  # Unigram
        Tokenizer.from_gguf(write_gguf(tmp_path / "b.gguf", vocab, merges, "gpt-2", model="t5"))
    with pytest.raises(LlmkitError, match="tokenizer.ggml.merges do not fit tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "c.gguf", vocab, [*merges, ("zz", "qq")], "gpt-2"))


def test_chat_errors(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2"))
    with pytest.raises(LlmkitError, match="no chat template: pass one .* or use generate with a plain prompt"):
        tokenizer.apply_chat_template(CONVERSATION)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(LlmkitError, match="message 1 .* needs 'role' and 'content'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "user"}])
    tokenizer.chat_template = "{% for m in messages %}"
    with pytest.raises(LlmkitError, match="chat template is not valid jinja"):
        tokenizer.apply_chat_template(CONVERSATION)


def test_decode_rejects_ids_outside_vocab(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2"))
    with pytest.raises(LlmkitError, match=f"token id {len(vocab)} is outside the vocabulary"):
        tokenizer.decode([5, len(vocab)])


def test_gguf_without_tokenizer(tmp_path):
    path = tmp_path / "weights_only.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LlmkitError, match="has no 'tokenizer.ggml.model' metadata: it is not a GGUF file with a tok"):
        Tokenizer.from_gguf(path)


def test_bad_tokenizer_dirs(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2")).save(tmp_path / "dir")
    with pytest.raises(LlmkitError, match="is not a directory: pass the directory holding tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "dir" / TOKENIZER_FILE)
    config_file = tmp_path / "dir" / TOKENIZER_CONFIG_FILE
    config_file.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(LlmkitError, match="bos_token '<s>' is not in tokenizer.json's vocabulary: fix tokenizer_conf"):
        Tokenizer.from_dir(tmp_path / "dir")
    config_file.write_text("{not json")
    with pytest.raises(LlmkitError, match=f"{TOKENIZER_CONFIG_FILE} is not valid JSON .*: fix it"):
        Tokenizer.from_dir(tmp_path / "dir")
    config_file.write_text("[]")
    with pytest.raises(LlmkitError, match="should hold a JSON object"):
        Tokenizer.from_dir(tmp_path / "dir")


def test_bos_needed_but_missing(tiny_bpe, tmp_path):
    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2"))
    tokenizer.bos_id = None
    with pytest.raises(LlmkitError, match="this tokenizer has no BOS token: call encode with add_bos=False"):
        tokenizer.encode("hi", add_bos=True)
    with pytest.raises(LlmkitError, match="add_bos=True but the tokenizer has no BOS token: pass bos_id"):
        Tokenizer(tokenizer.backend, bos_id=None, add_bos=True)


def test_a_fixed_padding_and_truncation_in_tokenizer_json_is_dropped(tmp_path):
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers

    backend = BackendTokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_padding(length=8, pad_id=0, pad_token="[PAD]")
    backend.enable_truncation(max_length=2)
    backend.save(str(tmp_path / "tokenizer.json"))
    # llmkit pads its own batches and refuses over-long inputs; a fixed length from the file would corrupt both.
    assert Tokenizer.from_dir(tmp_path).encode("a b a") == [1, 2, 1]


@pytest.mark.parametrize(
    "template, limit",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop steps"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "loop steps"),
        ("{{ 'x' * 10000000000 }}", "would build 10,000,000,000 items"),
        ("{{ 7 ** 123456789 }}", "exponent above 1,000"),
        ("{% for i in range(90000) %}{{ 'abcdefghij' * 100 }}{% endfor %}", "grew past"),
    ],
)
def test_chat_template_that_never_ends_is_stopped(tiny_bpe, tmp_path, template, limit):
    import time

    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, "qwen2"))
    tokenizer.chat_template = template
    started = time.monotonic()
    expected = f"the chat template of .*t.gguf was stopped: it.*{limit}.*limits: 1,000,000 loop steps, 10 s"
    with pytest.raises(LlmkitError, match=expected):
        tokenizer.apply_chat_template(CONVERSATION)
    assert time.monotonic() - started < 10  # before the change the nested loops ran for hours


def test_chat_template_time_limit(monkeypatch):
    from llmkit import chat_template

    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.2)
    # 1,000 x 900 steps stay under the step budget; the body's filter calls make each step slow enough to time out
    slow = "{% for i in range(1000) %}{% for j in range(900) %}{{ '' | trim }}{% endfor %}{% endfor %}"
    with pytest.raises(LlmkitError, match=r"was stopped: it ran longer than 0.2 s"):
        chat_template.render_chat_template(slow, [{"role": "user", "content": "hi"}])


def test_chat_template_limits_leave_long_messages_alone():
    from llmkit.chat_template import MAX_RENDERED_CHARS, render_chat_template

    long = "word " * (MAX_RENDERED_CHARS // 2)  # a long document in a message is not a runaway template
    text = render_chat_template("{% for m in messages %}<{{ m['content'] }}>{% endfor %}",
                                [{"role": "user", "content": long}])
    assert text == f"<{long}>"


PIECE_TEXT = (
    "First  Citizen:\n\nBefore we   proceed any further, hear me speak.\r\n\tAll: Speak, speak! 12345 678 -- "
    "it's     they'll  <|endoftext|> Grüße 日本語 🤖 e\u0301 ... !!!  ?? \n \n  end\n"
) * 40


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama3", "qwen2", "default"])
@pytest.mark.parametrize("piece_chars", [7, 50, 333])
def test_encode_array_in_pieces_gives_the_ids_of_the_whole_text(tiny_bpe, tmp_path, pre, piece_chars):
    """Long documents are tokenized in pieces (prepare's memory); the cuts must not change a single id."""
    vocab, merges = tiny_bpe
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", vocab, merges, pre))
    from llmkit.tokenizer import text_pieces

    pieces = text_pieces(PIECE_TEXT, piece_chars)
    assert len(pieces) > 10 and "".join(pieces) == PIECE_TEXT
    ids = tokenizer.encode_array(PIECE_TEXT, np.uint16, piece_chars=piece_chars)
    assert ids.dtype == np.uint16 and ids.tolist() == tokenizer.encode(PIECE_TEXT, add_bos=False)


def test_text_pieces_keeps_a_stretch_without_spaces_whole():
    from llmkit.tokenizer import text_pieces

    assert text_pieces("x" * 100 + " y", 10) == ["x" * 100, " y"]
    assert text_pieces("x" * 100, 10) == ["x" * 100]
    assert text_pieces("a b  c", 1) == ["a", " b", "  c"]  # never between two spaces: "  c" is one regex piece
