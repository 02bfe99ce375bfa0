"""SFT data: formats and field maps, row checks, templates, loss masking, truncation, padding, packing (a packed row
computes what each example computes alone), the resumable batch source, and the SmolLM2 chat template."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmkit.data.batch import IGNORE_INDEX
from llmkit.data.packing import PAD_DOCUMENT, pack_examples, padded_batch, sft_batches, sft_validation_batches
from llmkit.data.sft import (
    FieldMap,
    SFTExample,
    SFTRecord,
    builtin_dialogsum,
    load_sft_dataset,
    load_sft_records,
    tokenize_records,
)
from llmkit.data.shared import shared_data_file
from llmkit.data.sources import builtin_corpus_path
from llmkit.data.templates import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    FLAN_DIALOGUE_SUMMARY,
    RESPONSE_DELIMITER,
    PromptTemplate,
    TemplateSet,
    render,
    render_prompt,
)
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer
from llmkit.train.loop import TrainSettings, train
from llmkit.train.objectives import causal_lm_loss
from tests.helpers import byte_tokenizer, tiny_decoder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

CODE_ALPACA = "code_alpaca_2k/code_alpaca_2k.json.gz"  # in the shared data
BOS, EOS, TURN_START = "<s>", "<|im_end|>", "<|im_start|>"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hi.", "output": "Hi!"},  # no input field at all
]
PLAIN = TemplateSet("plain", (PromptTemplate("{instruction}"),))  # prompt = instruction + RESPONSE_DELIMITER
# fp32 kernels: packed and alone differ only in summation order (measured ~2e-7); 1e-5 is far below any bug.
TOLERANCE = 1e-5


def chatml_tokenizer(add_bos: bool = True) -> Tokenizer:
    """Byte tokens (id = byte), then BOS 256, <|im_end|> 257 (EOS and pad), <|im_start|> 258; ChatML template."""
    return byte_tokenizer((BOS, EOS, TURN_START), bos_id=256, eos_id=257, pad_id=257, add_bos=add_bos,
                          chat_template=CHATML)


def sft_decoder(**fields) -> Decoder:
    """tiny-llama over the chatml_tokenizer's 259 ids."""
    return tiny_decoder(vocab_size=259, max_seq_len=128, **fields)


def examples_of(texts: list[tuple[str, str]], **options) -> list[SFTExample]:
    """Examples of (instruction, output) pairs through the short PLAIN template (one byte, one token)."""
    records = [SFTRecord(output, instruction) for instruction, output in texts]
    return tokenize_records(records, chatml_tokenizer(), PLAIN, **options)[0]


# ---- formats and field maps ------------------------------------------------------------------------------------------


def test_jsonl_plain_and_gzip_json_array_csv_and_parquet_give_the_same_records(tmp_path):
    full = [{**row, "input": row.get("input", "")} for row in ALPACA_ROWS]
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "b.jsonl.gz", ALPACA_ROWS, compress=True)
    with gzip.open(tmp_path / "c.json.gz", "wt", encoding="utf-8") as file:
        json.dump(ALPACA_ROWS, file, indent=2)
    (tmp_path / "d.json").write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    with open(tmp_path / "e.csv", "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(full)
    pq.write_table(pa.Table.from_pylist(full), tmp_path / "f.parquet")
    expected = [(row["instruction"], row["input"], row["output"]) for row in full]
    for name in ("a.jsonl", "b.jsonl.gz", "c.json.gz", "d.json", "e.csv", "f.parquet"):
        records, report = load_sft_records(tmp_path / name)
        assert [(r.instruction, r.input, r.output) for r in records] == expected, name
        assert report.rows == 3 and report.skipped == 0


def test_field_map_renames_dialogsum_fields_and_prompt_completion_and_chat_rows(tmp_path):
    dialogue = {"fname": "train_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "x"}
    path = write_jsonl(tmp_path / "d.jsonl", [dialogue])
    records, _ = load_sft_records(path, FieldMap(input="dialogue", output="summary"))
    assert (records[0].input, records[0].output, records[0].instruction) == (dialogue["dialogue"], "They greet.", "")
    pairs = [{"question": "2+2?", "answer": "4"}]
    records, _ = load_sft_records(write_jsonl(tmp_path / "p.jsonl", pairs), FieldMap(prompt="question", completion="answer"))
    assert (records[0].instruction, records[0].output) == ("2+2?", "4")
    chat = [{"conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(chat), path)  # messages as a list<struct> column
    records, _ = load_sft_records(path, FieldMap(messages="conversation"))
    assert records[0].output == "Hello." and [m["role"] for m in records[0].messages] == ["system", "user"]
    assert records[0].origin == f"{path}, row 0"


def test_real_code_alpaca_json_array_has_two_empty_outputs_that_are_reported_or_skipped():
    with pytest.raises(LlmkitError, match=r"code_alpaca_2k.json.gz, record 238: field 'output' is empty"):
        load_sft_records(shared_data_file(CODE_ALPACA))
    records, report = load_sft_records(shared_data_file(CODE_ALPACA), skip_bad_rows=True)
    assert (len(records), report.rows, report.skipped) == (2015, 2017, 2)
    assert "record 238" in report.errors[0] and "record 1860" in report.errors[1]
    assert "2 bad rows skipped" in report.summary()


def test_builtin_dialogsum_reads_the_shared_splits():
    train_rows = builtin_dialogsum("train", limit=3)
    assert len(train_rows) == 3 and train_rows[0].input.startswith("#Person1#: Hi, Mr. Smith. I'm Doctor Hawkins.")
    assert train_rows[0].output.startswith("Mr. Smith's getting a check-up")
    test_rows = builtin_dialogsum("test", limit=2)
    assert len(test_rows) == 2 and all(row.output for row in test_rows)  # summary1 of the three references
    with pytest.raises(LlmkitError, match="DialogSum has no split 'validation'"):
        builtin_dialogsum("validation")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad.jsonl, line 2: not valid JSON"),
        ('["a list"]', r"bad.jsonl, line 2: holds a JSON list, not an object"),
        ('{"instruction": "x"}', r"bad.jsonl, line 2: no field 'output' \(fields: instruction\); .*--fields.output NAME"),
        ('{"instruction": "x", "output": 5}', r"line 2: field 'output' holds a int, not text"),
        ('{"output": "y"}', r"line 2: no 'instruction' or 'input' text to prompt with"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]}',
         r"line 2: the last message of 'messages' must be a non-empty 'assistant' reply"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "?"}]}',
         r"line 2: messages\[0\] must be an object with string 'role' and 'content'"),
    ],
)
def test_a_bad_row_names_file_line_and_field_or_is_skipped_and_counted(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n" + line + "\n" + json.dumps(ALPACA_ROWS[1]) + "\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match=message):
        load_sft_records(path)
    records, report = load_sft_records(path, skip_bad_rows=True)
    assert len(records) == 2 and report.skipped == 1 and report.rows == 3


def test_csv_errors_name_the_line_and_unsupported_files_are_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,input,output\n"two\nlines",,ok\nsecond,,\n', encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"rows.csv, line 4: field 'output' is empty"):
        load_sft_records(path)
    (tmp_path / "rows.txt").write_text("x", encoding="utf-8")
    with pytest.raises(LlmkitError, match="unsupported file type"):
        load_sft_records(tmp_path / "rows.txt")


# ---- templates -------------------------------------------------------------------------------------------------------


def test_flan_dialogue_summary_set_rotates_deterministically_with_seed_and_row():
    assert len(FLAN_DIALOGUE_SUMMARY.templates) == 7
    record = SFTRecord("They greet.", input="#Person1#: Hi.")
    prompts = [render_prompt(record, FLAN_DIALOGUE_SUMMARY, row=row, seed=3) for row in range(14)]
    assert len(set(prompts[:7])) == 7 and prompts[7:] == prompts[:7]  # every phrasing once per 7 rows
    assert prompts[0] == FLAN_DIALOGUE_SUMMARY.templates[3].prompt.format(input="#Person1#: Hi.") + RESPONSE_DELIMITER
    assert prompts == [render_prompt(record, "flan_dialogue_summary", row=row, seed=3) for row in range(14)]
    assert render_prompt(record, FLAN_DIALOGUE_SUMMARY, row=0, seed=4) == prompts[1]
    assert render(record, FLAN_DIALOGUE_SUMMARY, 0, 3) == (prompts[0], "They greet.")
    with pytest.raises(LlmkitError, match=r"field 'input' is empty but the flan_dialogue_summary template needs it"):
        render_prompt(SFTRecord("x", instruction="only an instruction", origin="f.jsonl, line 9"), FLAN_DIALOGUE_SUMMARY)


def test_alpaca_template_with_and_without_input_and_its_errors():
    with_input = render_prompt(SFTRecord("5", "Add the numbers.", "2 and 3"), "alpaca")
    expected = ALPACA_WITH_INPUT.prompt.format(instruction="Add the numbers.", input="2 and 3") + RESPONSE_DELIMITER
    assert with_input == expected
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    without = render_prompt(SFTRecord("Hi!", "Say hi."), "alpaca")
    assert without == ALPACA_NO_INPUT.prompt.format(instruction="Say hi.") + RESPONSE_DELIMITER
    assert "### Input" not in without
    with pytest.raises(LlmkitError, match=r"d.jsonl, line 1: field 'instruction' is empty but the alpaca template"):
        render_prompt(SFTRecord("s", input="dialogue", origin="d.jsonl, line 1"), "alpaca")
    chat_row = SFTRecord("Hello.", messages=({"role": "user", "content": "Hi"},), origin="c.jsonl, line 1")
    with pytest.raises(LlmkitError, match=r"c.jsonl, line 1: a chat row \(field 'messages'\) needs --template chat"):
        render_prompt(chat_row, "alpaca")
    with pytest.raises(LlmkitError, match="unknown template 'vicuna'; choose one of alpaca, chat, flan_dialogue_summary"):
        render_prompt(chat_row, "vicuna")
    with pytest.raises(LlmkitError, match="template='chat' renders with the model's chat template: pass the tokenizer"):
        render_prompt(chat_row, "chat")


def test_chat_template_prompt_and_completion_end_with_one_eos():
    tokenizer = chatml_tokenizer(add_bos=False)
    record = SFTRecord("Hello.", messages=({"role": "user", "content": "Hi"},))
    prompt, completion = render(record, "chat", tokenizer=tokenizer)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "Hello.<|im_end|>\n"
    [example], _ = tokenize_records([record], tokenizer, template="chat")
    completion_ids = [token for token in example.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(completion_ids) == "Hello.<|im_end|>"  # the newline after EOS is cut
    assert tokenizer.decode(example.input_ids[: len(example.input_ids) - len(completion_ids)]) == prompt


# ---- tokenizing and truncation ---------------------------------------------------------------------------------------


def test_labels_ignore_the_prompt_and_the_completion_ends_with_eos():
    tokenizer = chatml_tokenizer()
    [example], report = tokenize_records([SFTRecord("5", "Add.", "2 and 3")], tokenizer)
    prompt = render_prompt(SFTRecord("5", "Add.", "2 and 3"), "alpaca")
    n_prompt = 1 + len(prompt.encode())  # BOS + one token per byte
    assert example.input_ids[0] == tokenizer.bos_id and len(example.input_ids) == n_prompt + 2
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == [ord("5"), tokenizer.eos_id] == example.input_ids[n_prompt:]
    assert tokenizer.decode(example.input_ids[1:n_prompt]).endswith("### Response:\n")
    assert report.examples == 1 and report.truncated == 0


def test_left_truncation_keeps_bos_and_completion_and_counts_and_drop_mode_drops():
    texts = [("short", "ok"), ("a much longer instruction " * 4, "the whole answer"), ("x", "y" * 80)]
    records = [SFTRecord(output, instruction) for instruction, output in texts]
    examples, report = tokenize_records(records, chatml_tokenizer(), PLAIN, max_length=60)
    assert (report.truncated, report.dropped, report.examples) == (1, 1, 2)  # "y" * 80 + EOS cannot fit at all
    assert examples[0].input_ids == [256, *b"short", *RESPONSE_DELIMITER.encode(), *b"ok", 257]
    long = examples[1].input_ids
    assert len(long) == 60 and long[0] == 256  # BOS stays, then the end of the prompt
    assert bytes(long[1:-17]).decode() == ("a much longer instruction " * 4)[-26:] + RESPONSE_DELIMITER
    assert bytes(long[-17:-1]).decode() == "the whole answer" and long[-1] == 257  # the completion is whole
    assert examples[1].labels.count(IGNORE_INDEX) == 60 - 17
    _, report = tokenize_records(records, chatml_tokenizer(), PLAIN, max_length=60, truncation="drop")
    assert (report.truncated, report.dropped, report.examples) == (0, 2, 1)
    with pytest.raises(LlmkitError, match="no example is left of 1 records"):
        tokenize_records(records[2:], chatml_tokenizer(), PLAIN, max_length=60)


def test_load_sft_dataset_end_to_end_with_skips_in_rendering(tmp_path):
    rows = [ALPACA_ROWS[0], {"input": "no instruction here", "output": "o"}]
    with pytest.raises(LlmkitError, match=r"d.jsonl, line 2: field 'instruction' is empty"):
        load_sft_dataset(write_jsonl(tmp_path / "d.jsonl", rows), chatml_tokenizer())
    examples, report = load_sft_dataset(tmp_path / "d.jsonl", chatml_tokenizer(), skip_bad_rows=True)
    assert len(examples) == 1 and report.skipped == 1 and report.rows == 2


# ---- loss masking ----------------------------------------------------------------------------------------------------


class NoisyPromptLogits(torch.nn.Module):
    """The wrapped model's logits with random values wherever the label is ignored."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        self.model, self.ignored = model, labels == IGNORE_INDEX

    def forward(self, input_ids, logits_at=None, **kwargs):
        logits = self.model(input_ids, **kwargs)  # (B, T, V) everywhere, then noise where the label is ignored
        noisy = torch.where(self.ignored[..., None], torch.randn_like(logits) * 50, logits)
        return noisy if logits_at is None else noisy[logits_at]


def test_loss_is_the_mean_over_completion_tokens_and_ignores_prompt_logits():
    examples = examples_of([("Add the numbers 2 and 3.", "5"), ("Name a colour.", "Blue.")])
    batch = padded_batch(examples)
    model = sft_decoder()
    loss = causal_lm_loss(model, batch).mean()
    with torch.no_grad():
        log_probs = model(batch["input_ids"], attention_mask=batch["attention_mask"]).log_softmax(-1)
    terms = []
    for row, example in enumerate(examples):
        for t in range(len(example.input_ids) - 1):
            if example.labels[t + 1] != IGNORE_INDEX:  # token t + 1 is a completion token, predicted at t
                terms.append(-log_probs[row, t, example.input_ids[t + 1]])
    assert len(terms) == 2 + 6  # "5"+EOS and "Blue."+EOS
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    torch.manual_seed(1)
    assert torch.allclose(causal_lm_loss(NoisyPromptLogits(model, batch["labels"]), batch).mean(), loss, atol=1e-6)


# ---- padding, packing and the batch source ---------------------------------------------------------------------------


def test_padded_batch_shapes_mask_and_labels():
    examples = examples_of([("a", "b"), ("a longer prompt", "and answer")])
    lengths = [len(example.input_ids) for example in examples]
    batch = padded_batch(examples, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][0, lengths[0] - 1:] == IGNORE_INDEX).all()  # the final EOS and the padding predict nothing
    assert batch["labels"][1, :-1].tolist() == examples[1].labels[1:]
    assert padded_batch(examples, length=100)["input_ids"].shape == (2, 100)


@pytest.mark.parametrize("variant", [dict(), dict(position="learned", norm="layernorm", mlp="gelu", n_kv_heads=4),
                                     dict(position="alibi")], ids=["llama", "gpt2", "alibi"])
def test_packed_row_logits_equal_each_example_run_alone(variant):
    examples = examples_of([("first", "one"), ("second prompt", "two words"), ("3", "three!")])
    source = sft_batches(examples, batch_size=1, packing=True, max_length=128)
    assert len(source) == 1
    batch = source.collate(source.rows)
    model = sft_decoder(**variant)
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"])
        alone = torch.cat([model(torch.tensor([example.input_ids]))[0] for example in examples])
    used = len(alone)
    assert (packed[0, :used] - alone).abs().max() < TOLERANCE
    assert (batch["document_ids"][0, used:] == PAD_DOCUMENT).all()
    # the loss of the packed batch equals the loss of the padded batch: the same completion tokens, computed alone
    assert torch.allclose(causal_lm_loss(model, batch).mean(), causal_lm_loss(model, padded_batch(examples)).mean(),
                          atol=TOLERANCE)


def test_packing_fills_rows_greedily_in_order_and_document_ids_refuse_a_cache():
    examples = [SFTExample([1] * length, [1] * length) for length in (5, 4, 3, 6, 2)]
    assert pack_examples(examples, 9) == [[0, 1], [2, 3], [4]]
    with pytest.raises(LlmkitError, match="example 3 has 6 tokens, more than max_length=5"):
        pack_examples(examples, 5)
    model = sft_decoder()
    with pytest.raises(LlmkitError, match="document_ids must be .* without a KV cache"):
        model(torch.ones(1, 3, dtype=torch.long), cache=model.new_cache(1, 8), document_ids=torch.zeros(1, 3))


def test_batch_source_is_deterministic_resumable_and_visits_each_row_once_per_epoch():
    examples = examples_of([(f"prompt {i}", f"answer {i}") for i in range(10)])
    source = sft_batches(examples, batch_size=2, seed=7)
    again = sft_batches(examples, batch_size=2, seed=7)
    for position in (0, 4, 10, 16):  # resume at any position: a fresh source gives the same batch
        assert torch.equal(source(position, 2)["input_ids"], again(position, 2)["input_ids"])
    epoch = [row for position in range(0, 10, 2) for row in (source.row_at(position), source.row_at(position + 1))]
    assert sorted(index for row in epoch for index in row) == list(range(10))
    assert [source.row_at(p) for p in range(10)] != [source.row_at(p) for p in range(10, 20)]  # a new order per epoch
    assert [source.row_at(p) for p in range(10)] != [sft_batches(examples, 2, seed=8).row_at(p) for p in range(10)]
    # two ranks of batch 2 hold the rows of one process with batch 4 (all examples here have one length)
    both = torch.cat([source(4, 2, rank=0, world_size=2)["input_ids"], source(4, 2, rank=1, world_size=2)["input_ids"]])
    assert torch.equal(both, source(4, 4)["input_ids"])
    with pytest.raises(LlmkitError, match="batch_size=11 needs at least that many examples; there are 10"):
        sft_batches(examples, batch_size=11)
    validation = list(sft_validation_batches(examples, batch_size=4)())
    assert [len(batch["input_ids"]) for batch in validation] == [4, 4, 2]
    assert validation[0]["input_ids"][0, : len(examples[0].input_ids)].tolist() == examples[0].input_ids


def test_training_loop_runs_on_packed_sft_batches(tmp_path):
    examples = examples_of([(f"Say {word}.", word) for word in ("yes", "no", "maybe", "never", "always", "soon")])
    source = sft_batches(examples, batch_size=2, packing=True, max_length=64)
    settings = TrainSettings(max_steps=12, batch_size=2, warmup_steps=1, eval_every=0, log_every=1,
                             checkpoint_every=100, lr=3e-3, device="cpu")
    model = sft_decoder().train()
    result = train(model, causal_lm_loss, source, settings, tmp_path)
    assert result.steps == 12 and result.losses[-1] < result.losses[0]


# ---- the real SmolLM2 tokenizer --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_template_completion_is_the_reply_and_im_end(tmp_path):
    from llmkit.checkpoints import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    messages = [{"role": "user", "content": "Summarize: the cat sat on the mat."},
                {"role": "assistant", "content": "A cat sat."}]
    records, _ = load_sft_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    [example], _ = tokenize_records(records, tokenizer, template="chat")
    completion = [token for token in example.labels if token != IGNORE_INDEX]
    assert completion[-1] == tokenizer.eos_id and tokenizer.decode(completion) == "A cat sat.<|im_end|>"
    prompt_ids = example.input_ids[: len(example.input_ids) - len(completion)]
    assert tokenizer.decode(prompt_ids) == tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")



def long_records() -> list[SFTRecord]:
    text = builtin_corpus_path().read_text(encoding="utf-8")
    return [SFTRecord("Summary.", instruction="Summarise this.", input=text[:300_000], origin="long, row 0"),
            SFTRecord("x " * 40_000, instruction="Repeat x.", origin="long, row 1"),  # completion over max_length
            SFTRecord("Short.", instruction="Say it short.", origin="long, row 2")]


@pytest.mark.parametrize("which, template", [("bytes", "alpaca"), ("smollm2", "alpaca"), ("smollm2", "chat")])
def test_long_rows_are_cut_before_tokenizing_with_the_same_examples(which, template, monkeypatch):
    """A 48 MB instruction peaked at 7.5 GB in finetune: the whole row was tokenized, then cut to max_length. Rows
    are now cut to a tail that surely holds max_length tokens first; the examples are the same ids."""
    from llmkit.checkpoints import default_model_path

    tokenizer = chatml_tokenizer() if which == "bytes" else Tokenizer.from_gguf(default_model_path())
    seen: list[int] = []
    encode = Tokenizer.encode

    def spy(self, text, add_bos=None):  # noqa: ANN001, ANN202
        seen.append(len(text))
        return encode(self, text, add_bos)

    monkeypatch.setattr(Tokenizer, "encode", spy)
    examples, report = tokenize_records(long_records(), tokenizer, template, max_length=256)
    assert max(seen) < 256 * tokenizer.max_token_chars + 1000  # nothing near the 300,000-character input
    assert (report.truncated, report.dropped) == (1, 1)
    monkeypatch.setattr(Tokenizer, "max_token_chars", 10**9)  # no cut: the old path, whole rows tokenized
    seen.clear()
    reference, _ = tokenize_records(long_records(), tokenizer, template, max_length=256)
    assert max(seen) > 300_000
    assert [(e.input_ids, e.labels) for e in examples] == [(e.input_ids, e.labels) for e in reference]
