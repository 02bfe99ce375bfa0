"""Preference data: rows of both shapes, transcripts split at the last shared "Assistant:", errors that name the
file, line and field, the seeded split, truncation rules and pair batches."""

from __future__ import annotations

import pytest
import torch

from llmkit.align.preference import (
    PairBatches,
    PairReport,
    TokenizedPair,
    builtin_hh_rlhf,
    load_pairs,
    pair_batch,
    split_held_out,
    split_transcripts,
    tokenize_pairs,
)
from llmkit.errors import LlmkitError
from tests.helpers import byte_tokenizer, write_jsonl

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_transcripts_split_at_the_last_shared_assistant_marker():
    pair = split_transcripts(f"{H} hi{A} hello{H} and?{A} fine", f"{H} hi{A} hello{H} and?{A} go away")
    assert (pair.prompt, pair.chosen, pair.rejected) == (f"{H} hi{A} hello{H} and?{A}", " fine", " go away")
    # differing earlier: the responses hold the later turns
    pair = split_transcripts(f"{H} hi{A} yes{H} ok{A} a", f"{H} hi{A} no{H} ok{A} a")
    assert (pair.prompt, pair.chosen, pair.rejected) == (f"{H} hi{A}", f" yes{H} ok{A} a", f" no{H} ok{A} a")


def test_hh_rlhf_pairs_all_split_and_most_differ_in_the_last_turn_only():
    pairs = builtin_hh_rlhf()
    assert len(pairs) == 2312  # SOURCE.md: 2,312 pairs, 2,307 differing only in the final assistant turn
    assert sum(A not in pair.chosen and A not in pair.rejected for pair in pairs) == 2307
    assert all(pair.prompt.endswith(A) and pair.chosen != pair.rejected for pair in pairs)


def test_load_pairs_reads_both_row_shapes(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"},
                                                  {"chosen": f"{H} q{A} good", "rejected": f"{H} q{A} bad"}])
    pairs, report = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q?", " yes", " no"), (f"{H} q{A}", " good", " bad")]
    assert report.rows == 2 and pairs[1].origin == f"{path}, line 2"


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Q", "chosen": "a"}, r"line 2: no field 'rejected'"),
    ({"chosen": "a", "rejected": 3}, r"line 2: field 'rejected' must be non-empty text"),
    ({"chosen": "same", "rejected": "same"}, r"line 2: 'chosen' and 'rejected' are the same"),
    ({"chosen": "x said a", "rejected": "x said b"}, r"line 2: .*share no prefix ending with .*add a 'prompt' field"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, r"line 2: field 'prompt' holds a int"),
    ("{not json", r"line 2: not valid JSON"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(LlmkitError, match=message):
        load_pairs(path)
    pairs, report = load_pairs(path, skip_bad_rows=True)
    assert len(pairs) == 1 and report.skipped == 1 and str(path) in report.errors[0]


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(50))
    train, held = split_held_out(items, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert split_held_out(items, 0.2, seed=3) == (train, held)
    assert split_held_out(items, 0.2, seed=4)[1] != held
    with pytest.raises(LlmkitError, match="--held_out"):
        split_held_out(items, 1.5, seed=0)


def test_tokenization_truncates_prompt_from_the_left_then_responses_from_the_right():
    tokenizer = byte_tokenizer(specials=["<eos>"], eos_id=256)
    pairs = load_pairs_from([{"prompt": "abcdefgh", "chosen": "XY", "rejected": "123456"}])
    (pair,), report = tokenize_pairs(pairs, tokenizer, max_length=8, max_prompt_length=4)
    assert pair.prompt == list(b"efgh")  # the prompt's last 4 tokens
    assert pair.chosen == [*b"XY", 256]  # fits: ends with EOS
    assert pair.rejected == list(b"1234")  # cut to 8 - 4 tokens, EOS lost
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)
    with pytest.raises(LlmkitError, match="--max_prompt_length 8 must be .* below --max_length 8"):
        tokenize_pairs(pairs, tokenizer, max_length=8, max_prompt_length=8)


def load_pairs_from(rows):
    from llmkit.align.preference import parse_pair

    return [parse_pair(row, f"row {index}") for index, row in enumerate(rows)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_batch_puts_chosen_then_rejected_with_masks(side):
    pairs = [TokenizedPair([1, 2], [3, 9], [4, 5, 9], -1.0, -2.0), TokenizedPair([1], [6, 9], [7, 9], -3.0, -4.0)]
    batch = pair_batch(pairs, pad_id=9, padding_side=side)
    assert batch["input_ids"].shape == (4, 5) and batch["labels"].tolist() == [0, 0]
    rows = [[token for token, real in zip(ids, mask, strict=True) if real]
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)]
    assert rows == [[1, 2, 3, 9], [1, 6, 9], [1, 2, 4, 5, 9], [1, 7, 9]]
    responses = [[token for token, scored in zip(ids, mask, strict=True) if scored]
                 for ids, mask in zip(batch["input_ids"].tolist(), batch["response_mask"].tolist(), strict=True)]
    assert responses == [[3, 9], [6, 9], [4, 5, 9], [7, 9]]
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.0, -3.0]))
    if side == "left":
        assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1, 1]


def test_pair_batches_cover_every_pair_each_epoch_in_a_seeded_order():
    pairs = [TokenizedPair([i], [i], [i + 100]) for i in range(6)]
    source = PairBatches(pairs, pad_id=0, seed=1)
    epoch = [int(source(position, 2)["input_ids"][k, 0]) for position in (0, 2, 4) for k in range(2)]
    assert sorted(epoch) == list(range(6)) and epoch != list(range(6))
    assert int(source(0, 2, rank=1, world_size=2)["input_ids"][0, 0]) == epoch[2]  # rank 1 takes the next slice
    assert PairReport().summary().startswith("0 rows")
