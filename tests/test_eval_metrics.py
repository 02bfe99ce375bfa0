"""Generation metrics: the wrappers give the libraries' own numbers; SQuAD EM/F1 on answers with known scores."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmkit.errors import LlmkitError
from llmkit.eval.metrics import (
    ROUGE_TYPES,
    bleu,
    chrf,
    exact_match,
    exact_match_score,
    normalize_answer,
    rouge,
    rouge_per_example,
    token_f1,
    token_f1_score,
)

PREDICTIONS = [
    "#Person1# is running late for the meeting.\nThey will arrive at ten.",
    "The cats were sitting on the mats and watching birds.",
    "Tom asks Mary to lend him some money for the rent.",
]
REFERENCES = [
    "#Person1# runs late to the meeting.\n#Person1# arrives around ten o'clock.",
    "A cat sat on the mat watching the birds outside.",
    "Tom borrows money from Mary to pay his rent.",
]
SECOND_REFERENCES = [
    "Someone will be late for a meeting at ten.",
    "The cats sat on the mats.",
    "Mary lends Tom money.",
]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(use_stemmer: bool) -> None:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    library = [scorer.score(reference, prediction) for prediction, reference in zip(PREDICTIONS, REFERENCES)]
    ours = rouge(PREDICTIONS, REFERENCES, use_stemmer=use_stemmer)
    for kind in ROUGE_TYPES:
        assert ours[kind] == sum(scores[kind].fmeasure for scores in library) / len(library)  # exact: no drift
    per_example = rouge_per_example(PREDICTIONS, REFERENCES, use_stemmer=use_stemmer)
    assert per_example == [{kind: scores[kind].fmeasure for kind in ROUGE_TYPES} for scores in library]


def test_rouge_stemming_and_lsum_newlines_matter() -> None:
    plain, stemmed = rouge(PREDICTIONS, REFERENCES), rouge(PREDICTIONS, REFERENCES, use_stemmer=True)
    assert stemmed["rouge1"] > plain["rouge1"]  # "runs"/"running", "cats"/"cat" match once stemmed
    # rougeLsum reads newlines as sentence breaks (rouge-score's convention); rougeL ignores them.
    # Swapped sentences: one LCS covers only one of them, the summary-level LCS covers both.
    prediction, reference = "the dog ran\nthe cat sat", "the cat sat\nthe dog ran"
    split = rouge([prediction], [reference])
    one_line = rouge([prediction.replace("\n", " ")], [reference.replace("\n", " ")])
    assert split["rougeL"] == one_line["rougeL"] == one_line["rougeLsum"] == 0.5
    assert split["rougeLsum"] == 1.0


def test_rouge_with_several_references_takes_the_best() -> None:
    references = [[first, second] for first, second in zip(REFERENCES, SECOND_REFERENCES)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    library = [scorer.score_multi(refs, prediction) for prediction, refs in zip(PREDICTIONS, references)]
    ours = rouge(PREDICTIONS, references, use_stemmer=True, rouge_types=("rouge1", "rougeL"))
    assert ours == {kind: sum(s[kind].fmeasure for s in library) / 3 for kind in ("rouge1", "rougeL")}
    assert ours["rouge1"] >= rouge(PREDICTIONS, REFERENCES, use_stemmer=True)["rouge1"]


def test_bleu_and_chrf_equal_sacrebleu() -> None:
    assert bleu(PREDICTIONS, REFERENCES) == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert chrf(PREDICTIONS, REFERENCES) == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    both = [[first, second] for first, second in zip(REFERENCES, SECOND_REFERENCES)]
    assert bleu(PREDICTIONS, both) == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, SECOND_REFERENCES]).score
    assert chrf(PREDICTIONS, both, word_order=2) == sacrebleu.corpus_chrf(
        PREDICTIONS, [REFERENCES, SECOND_REFERENCES], word_order=2
    ).score  # chrF++
    # A variable number of references: sacrebleu's None marks a missing one.
    ragged = [REFERENCES[0], [REFERENCES[1], SECOND_REFERENCES[1]], REFERENCES[2]]
    streams = [REFERENCES, [None, SECOND_REFERENCES[1], None]]
    assert bleu(PREDICTIONS, ragged) == sacrebleu.corpus_bleu(PREDICTIONS, streams).score
    assert 0 < bleu(PREDICTIONS, REFERENCES) < bleu(PREDICTIONS, both) <= 100
    assert bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)


def test_squad_normalisation() -> None:
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1"),
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),
        ("in 1889", "1889", 0.0, 2 / 3),  # precision 1/2, recall 1
        ("Denver Broncos", "Broncos", 0.0, 2 / 3),
        ("the Denver Broncos won", "Denver Broncos", 0.0, 0.8),  # precision 2/3, recall 1
        ("Carolina Panthers", "Denver Broncos", 0.0, 0.0),
        ("", "", 1.0, 1.0),  # SQuAD v2: no answer predicted for a no-answer question
        ("", "Paris", 0.0, 0.0),
        ("a the an", "", 1.0, 1.0),  # only articles normalises to empty
    ],
)
def test_exact_match_and_f1_on_known_answers(prediction: str, reference: str, em: float, f1: float) -> None:
    assert exact_match_score(prediction, reference) == em
    assert token_f1_score(prediction, reference) == pytest.approx(f1)


def test_corpus_exact_match_and_f1_take_the_best_reference() -> None:
    predictions = ["Denver Broncos", "in 1889", "Saint Bernadette Soubirous"]
    references = [["Denver Broncos", "The Broncos"], ["1889", "March 1889"], "Bernadette"]
    assert exact_match(predictions, references) == pytest.approx(1 / 3)
    assert token_f1(predictions, references) == pytest.approx((1.0 + 2 / 3 + 0.5) / 3)  # 1889 vs "march 1889": 1/2


def test_errors() -> None:
    with pytest.raises(LlmkitError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(LlmkitError, match="no predictions to score"):
        bleu([], [])
    with pytest.raises(LlmkitError, match="pass lists"):
        exact_match("Paris", "Paris")
    with pytest.raises(LlmkitError, match="example 1 has references \\[\\]"):
        token_f1(["a", "b"], ["a", []])
    with pytest.raises(LlmkitError, match=r"unknown ROUGE types \['rougeX'\]"):
        rouge(["a"], ["a"], rouge_types=("rouge1", "rougeX"))
