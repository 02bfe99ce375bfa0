"""Exact and MinHash near-duplicate detection, the filter report, and the `filter_data` verb end to end."""

import gzip
import json

import numpy as np
import pytest

from llmkit.commands.filter import filter_data, report_path
from llmkit.data.dedup import (
    MERSENNE_PRIME,
    ExactDeduplicator,
    MinHashDeduplicator,
    _mul_mod_prime,
    candidate_probability,
    normalize_text,
)
from llmkit.data.filter import EXACT_DUPLICATE, NEAR_DUPLICATE, DocumentFilter, filter_documents
from llmkit.data.quality import QualityRules
from llmkit.errors import LlmkitError
from tests.helpers import shakespeare_text

GOOD_A = (
    "The old library at the edge of town opened its doors again this spring after a long renovation. Volunteers "
    "spent months sorting donated books, repairing shelves and painting the reading room a warm shade of green. "
    "Children now gather there on Saturday mornings to hear stories, while their parents browse the new collection "
    "of local history. The head librarian said that the building should have a future as a meeting place for "
    "everyone, with evening classes, a small café and a garden behind the main hall where neighbours can relax."
)
GOOD_B = (
    "Engineers at the harbour have started to replace the wooden pier that storms damaged two winters ago. The new "
    "structure rests on concrete piles driven deep into the seabed, and its deck is made of recycled plastic boards "
    "that should last for decades. Fishing crews will be able to unload their catch at any tide, and a wide walkway "
    "along the northern side gives visitors a safe view of the boats and the lighthouse on the rocks beyond the bay."
)
JUNK = "BUY NOW!!! cheap pills $$$ click here >>> http://spam.example"


@pytest.fixture(scope="module")
def shakespeare_words() -> list[str]:
    return shakespeare_text().split()


def chunk(words: list[str], index: int, size: int = 300) -> list[str]:
    return words[index * size: (index + 1) * size]


def changed(words: list[str], count: int) -> str:
    """The words with `count` of them, evenly spread, replaced by a new word."""
    out = list(words)
    for position in np.linspace(0, len(out) - 1, count + 2)[1:-1].astype(int):
        out[position] = f"changed{position}"
    return " ".join(out)


def shingle_jaccard(text_a: str, text_b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of the lowercased word n-gram sets (plain Python sets, no hashing)."""
    def shingles(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}

    a, b = shingles(text_a), shingles(text_b)
    return len(a & b) / len(a | b)


def test_exact_dedup_ignores_case_and_whitespace():
    deduplicator = ExactDeduplicator()
    assert not deduplicator.is_duplicate("Hello   World\n")
    assert deduplicator.is_duplicate("hello world")
    assert deduplicator.is_duplicate("  HELLO\tworld ")
    assert not deduplicator.is_duplicate("hello, world")
    assert len(deduplicator) == 2 and normalize_text(" A\n b ") == "a b"


def test_universal_hash_multiplication_is_exact_modulo_the_mersenne_prime():
    rng = np.random.default_rng(0)
    a = rng.integers(0, MERSENNE_PRIME, 2000, dtype=np.uint64)
    x = rng.integers(0, MERSENNE_PRIME, 2000, dtype=np.uint64)
    a[:2], x[:2] = MERSENNE_PRIME - 1, [MERSENNE_PRIME - 1, 1]  # the largest operands
    expected = [int(p) * int(q) % MERSENNE_PRIME for p, q in zip(a, x)]  # Python's unbounded integers
    assert _mul_mod_prime(a, x).tolist() == expected


def test_bands_and_rows_give_an_s_curve_around_the_threshold():
    deduplicator = MinHashDeduplicator(threshold=0.8, num_perm=128)
    bands, rows = deduplicator.bands, deduplicator.rows
    assert bands * rows <= 128
    p = lambda s: 1 - (1 - s**rows) ** bands
    assert p(0.9) > 0.9 and p(0.5) < 0.1 and p(0.95) > p(0.9) > p(0.8) > p(0.5)
    assert candidate_probability(0.9, bands, rows) == pytest.approx(p(0.9))
    low = MinHashDeduplicator(threshold=0.5)
    assert candidate_probability(0.5, low.bands, low.rows) > candidate_probability(0.5, bands, rows)  # curve moves


def test_near_duplicate_is_found_and_unrelated_text_is_not(shakespeare_words):
    deduplicator = MinHashDeduplicator()
    originals = [" ".join(chunk(shakespeare_words, index)) for index in range(30)]
    for index, text in enumerate(originals):
        assert deduplicator.add_or_find(text, key=f"scene-{index}") is None  # different passages of the play
    edited = changed(chunk(shakespeare_words, 7), 3)
    assert 0.85 < shingle_jaccard(edited, originals[7]) < 0.95
    assert deduplicator.add_or_find(edited, key="edited") == "scene-7"
    assert len(deduplicator) == 30  # a near duplicate is not added


def test_estimated_jaccard_is_close_to_the_exact_one(shakespeare_words):
    deduplicator = MinHashDeduplicator()
    original = " ".join(chunk(shakespeare_words, 3))
    pairs = [(original, changed(chunk(shakespeare_words, 3), count)) for count in (1, 4, 10, 20, 40)]
    pairs.append((original, " ".join(chunk(shakespeare_words, 4))))
    exact = [shingle_jaccard(a, b) for a, b in pairs]
    assert max(exact) > 0.95 and min(exact) < 0.1  # the pairs span the range
    for (a, b), similarity in zip(pairs, exact):
        estimate = deduplicator.estimated_jaccard(deduplicator.signature(a), deduplicator.signature(b))
        assert abs(estimate - similarity) < 0.1  # standard error sqrt(J(1-J)/128) <= 0.044


def test_signatures_are_the_same_for_the_same_seed_only():
    text = GOOD_A
    first, second = MinHashDeduplicator(seed=3).signature(text), MinHashDeduplicator(seed=3).signature(text)
    assert first.dtype == np.uint64 and first.shape == (128,) and (first < MERSENNE_PRIME).all()
    assert np.array_equal(first, second)
    assert not np.array_equal(first, MinHashDeduplicator(seed=4).signature(text))


def test_short_and_empty_documents():
    deduplicator = MinHashDeduplicator()
    assert deduplicator.add_or_find("good morning", key=0) is None  # fewer words than n: one shingle of all of them
    assert deduplicator.add_or_find("Good  Morning", key=1) == 0
    assert deduplicator.add_or_find("good evening", key=2) is None
    assert deduplicator.add_or_find("  ", key=3) is None and len(deduplicator) == 2


def test_bad_minhash_settings():
    with pytest.raises(LlmkitError, match=r"threshold must be in \(0, 1\], not 1.5"):
        MinHashDeduplicator(threshold=1.5)
    with pytest.raises(LlmkitError, match="num_perm >= 2 and ngram >= 1"):
        MinHashDeduplicator(ngram=0)
    with pytest.raises(LlmkitError, match="make both with the same num_perm"):
        MinHashDeduplicator.estimated_jaccard(np.zeros(128, np.uint64), np.zeros(64, np.uint64))
    with pytest.raises(LlmkitError, match=r"near_dedup_threshold must be in \(0, 1\], not 0"):
        DocumentFilter(QualityRules(), near_dedup_threshold=0)


def test_report_counts_add_up():
    near = GOOD_B.rsplit(" ", 1)[0] + " harbour."  # the last word changed
    documents = [GOOD_A, JUNK, GOOD_B, GOOD_A.upper(), near, "", GOOD_B]
    kept, report = filter_documents(documents, QualityRules(), count_tokens=len)
    assert list(kept) == [GOOD_A, GOOD_B]
    assert report.unit == "tokens" and report.total_documents == len(documents)
    assert report.kept_documents + sum(report.dropped_documents.values()) == report.total_documents
    assert report.kept_units + sum(report.dropped_units.values()) == report.total_units == sum(map(len, documents))
    assert report.dropped_documents == {"min_words": 2, EXACT_DUPLICATE: 2, NEAR_DUPLICATE: 1}
    assert report.failed_documents["stop_words"] == 2 and report.failed_documents["min_words"] == 2
    table = report.to_markdown()
    assert "| exact_duplicate | 2 | 28.6% |" in table and f"| **total** | 7 | | {report.total_units:,} |" in table
    data = report.to_dict()
    assert data["reasons"]["near_duplicate"] == {"dropped_documents": 1, "dropped_tokens": len(near), "failed_documents": 1}


def test_without_rules_or_dedup_everything_is_kept():
    kept, report = filter_documents([JUNK, JUNK], rules=None, exact_dedup=False, near_dedup=False)
    assert list(kept) == [JUNK, JUNK] and report.reasons == [] and report.total_units == 2 * len(JUNK.split())


def test_filter_verb_end_to_end(tmp_path, capsys):
    near = GOOD_B.replace("recycled", "reclaimed")  # one word changed
    rows = [GOOD_A, GOOD_B, "  " + GOOD_A.replace(" ", "  ").upper(), near, JUNK]
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps({"content": row, "id": i}) + "\n" for i, row in enumerate(rows)))
    report = filter_data([str(source)], output=str(tmp_path / "clean.jsonl"), text_field="content")
    kept = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert kept == [{"content": GOOD_A}, {"content": GOOD_B}]
    written = json.loads((tmp_path / "clean.report.json").read_text())
    assert written == report.to_dict()
    assert written["total"] == {"documents": 5, "words": sum(len(row.split()) for row in rows)}
    assert {name: item["dropped_documents"] for name, item in written["reasons"].items() if item["dropped_documents"]} \
        == {"min_words": 1, EXACT_DUPLICATE: 1, NEAR_DUPLICATE: 1}
    printed = capsys.readouterr().out
    assert "| near_duplicate | 1 | 20.0% |" in printed and "kept 2 of 5 documents" in printed


def test_filter_verb_options(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps({"text": row}) + "\n" for row in [JUNK, GOOD_A, GOOD_A]))
    output = tmp_path / "out.jsonl.gz"
    report = filter_data([str(source)], output=str(output), disable=["min_words", "stop_words", "alpha_words",
                                                                     "min_mean_word_length"], exact_dedup=False)
    with gzip.open(output, "rt", encoding="utf-8") as file:
        assert [json.loads(line)["text"] for line in file] == [JUNK, GOOD_A]  # the copy is a near duplicate (J = 1)
    assert "min_words" not in report.reasons and report_path(output) == tmp_path / "out.report.json"


def test_filter_verb_errors(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text(json.dumps({"text": GOOD_A}) + "\n")
    with pytest.raises(LlmkitError, match=r"unknown quality rule\(s\) \['stopwords'\]: valid names are .*stop_words"):
        filter_data([str(source)], output=str(tmp_path / "out.jsonl"), disable=["stopwords"])
    with pytest.raises(LlmkitError, match=r"output .*out.txt must end in \.jsonl or \.jsonl\.gz"):
        filter_data([str(source)], output=str(tmp_path / "out.txt"))
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_filter_verb_counts_tokens_with_a_tokenizer(tmp_path):
    from llmkit.checkpoints import default_model_path, load_tokenizer

    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps({"text": row}) + "\n" for row in [GOOD_A, JUNK, GOOD_B]))
    report = filter_data([str(source)], output=str(tmp_path / "out.jsonl"), tokenizer=str(default_model_path()))
    tokenizer = load_tokenizer(default_model_path())
    assert report.unit == "tokens"
    assert report.kept_units == len(tokenizer.encode(GOOD_A)) + len(tokenizer.encode(GOOD_B))
    assert report.dropped_units == {"min_words": len(tokenizer.encode(JUNK))}


def _cli_error(capsys, *argv: str) -> str:
    """Run the CLI expecting a refusal: exit status 2 and one `error:` line, no traceback."""
    from llmkit.cli import main

    with pytest.raises(SystemExit) as exit:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_filter_never_writes_over_its_input_or_an_existing_output(tmp_path, capsys):
    source = tmp_path / "raw.jsonl"
    text = "".join(json.dumps({"text": row}) + "\n" for row in [GOOD_A, GOOD_A, JUNK])
    source.write_text(text)
    err = _cli_error(capsys, "filter", "--data", str(source), "--output", str(tmp_path / "." / "raw.jsonl"))
    assert "--output" in err and "is also an input (--data)" in err
    err = _cli_error(capsys, "filter", "--data", str(tmp_path), "--output", str(source), "--overwrite", "true")
    assert "is also an input" in err  # a file read from an input folder is an input too
    assert source.read_text() == text
    existing = tmp_path / "clean.jsonl"
    existing.write_text("keep me\n")
    err = _cli_error(capsys, "filter", "--data", str(source), "--output", str(existing))
    assert err == f"error: --output {existing} already exists; pass --overwrite to replace it, or choose another --output\n"
    assert existing.read_text() == "keep me\n"
    filter_data(str(source), output=str(existing), overwrite=True)
    assert [json.loads(line)["text"] for line in existing.read_text().splitlines()] == [GOOD_A]
