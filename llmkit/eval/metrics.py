"""Generation metrics: ROUGE via `rouge-score`, BLEU and chrF via `sacrebleu`, SQuAD exact match and token F1.

ROUGE (Lin 2004) counts n-gram (rouge1, rouge2) and longest-common-subsequence (rougeL) overlap; rougeLsum is
the summary-level LCS over sentences, and rouge-score splits sentences on newlines: put each sentence of a
summary on its own line. BLEU (Papineni et al. 2002) and chrF (Popovic 2015) are corpus-level scores from
sacrebleu on its 0-100 scale. Exact match and F1 follow the official SQuAD v2.0 evaluation script (Rajpurkar et al.):
answers are lower-cased and stripped of punctuation, articles and extra whitespace; F1 is over bag-of-words tokens.

Every function takes one prediction per example and, per example, one reference string or a list of them (the
best-scoring reference counts, as in SQuAD and rouge-score's score_multi).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

from llmkit.errors import LlmkitError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = frozenset(string.punctuation)

References = Sequence[str | Sequence[str]]  # per example: one reference, or several


def rouge(
    predictions: Sequence[str], references: References, use_stemmer: bool = False, rouge_types: Sequence[str] = ROUGE_TYPES
) -> dict[str, float]:
    """Corpus ROUGE: the mean over examples of each type's F-measure (best reference per example), in [0, 1]."""
    per_example = rouge_per_example(predictions, references, use_stemmer, rouge_types)
    return {kind: sum(scores[kind] for scores in per_example) / len(per_example) for kind in rouge_types}


def rouge_per_example(
    predictions: Sequence[str], references: References, use_stemmer: bool = False, rouge_types: Sequence[str] = ROUGE_TYPES
) -> list[dict[str, float]]:
    """Each example's ROUGE F-measures from rouge-score (score_multi picks the best reference per type)."""
    all_references = _reference_lists(predictions, references)
    unknown = sorted(set(rouge_types) - set(ROUGE_TYPES) - {f"rouge{n}" for n in range(3, 10)})
    if unknown or not rouge_types:
        raise LlmkitError(f"unknown ROUGE types {unknown or list(rouge_types)}; choose from {', '.join(ROUGE_TYPES)} "
                          "(or rouge3..rouge9)")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    results = []
    for prediction, targets in zip(predictions, all_references):
        scores = scorer.score_multi(targets, prediction)
        results.append({kind: scores[kind].fmeasure for kind in rouge_types})
    return results


def bleu(predictions: Sequence[str], references: References, **options) -> float:  # noqa: ANN003
    """sacrebleu.corpus_bleu's score (0-100); `options` go to sacrebleu (tokenize=, lowercase=, ...)."""
    return sacrebleu.corpus_bleu(list(predictions), _reference_streams(predictions, references), **options).score


def chrf(predictions: Sequence[str], references: References, **options) -> float:  # noqa: ANN003
    """sacrebleu.corpus_chrf's score (0-100); `options` go to sacrebleu (char_order=, word_order=2 for chrF++, ...)."""
    return sacrebleu.corpus_chrf(list(predictions), _reference_streams(predictions, references), **options).score


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    text = "".join(character for character in text.lower() if character not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1_score(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall between the normalised strings (SQuAD v2: two empty answers
    score 1, one empty answer scores 0)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    n_common = sum((Counter(predicted) & Counter(expected)).values())
    if n_common == 0:
        return 0.0
    precision, recall = n_common / len(predicted), n_common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Mean over examples of the best exact_match_score against that example's references, in [0, 1]."""
    all_references = _reference_lists(predictions, references)
    return sum(max(exact_match_score(p, r) for r in refs) for p, refs in zip(predictions, all_references)) / len(predictions)


def token_f1(predictions: Sequence[str], references: References) -> float:
    """Mean over examples of the best token_f1_score against that example's references, in [0, 1]."""
    all_references = _reference_lists(predictions, references)
    return sum(max(token_f1_score(p, r) for r in refs) for p, refs in zip(predictions, all_references)) / len(predictions)


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """References as one non-empty list of strings per prediction, checked against the predictions."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise LlmkitError("pass lists: predictions as [str, ...] and references as [str or [str, ...], ...], one per "
                          "example (a bare string would be read as a list of characters)")
    if len(predictions) != len(references):
        raise LlmkitError(f"{len(predictions)} predictions but {len(references)} references; pass one reference "
                          "(or a list of them) per prediction")
    if not predictions:
        raise LlmkitError("no predictions to score; pass at least one example")
    lists = []
    for index, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(ref, str) for ref in refs):
            raise LlmkitError(f"example {index} has references {refs!r:.80}; give each example at least one reference "
                              "string")
        lists.append(refs)
    return lists


def _reference_streams(predictions: Sequence[str], references: References) -> list[list[str | None]]:
    """sacrebleu's layout: streams[k][i] = k-th reference of example i, None where an example has fewer."""
    lists = _reference_lists(predictions, references)
    width = max(len(refs) for refs in lists)
    return [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]
