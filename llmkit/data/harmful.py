"""Harmful-content rules for training data: C4's block list, and a learned classifier trained on human judgements.

Block list (C4; Raffel et al. 2020, section 2.2): a page is dropped when it holds any word or phrase of the
"List of Dirty, Naughty, Obscene, and Otherwise Bad Words" (llmkit/data/builtin/blocklist_en.txt, CC BY 4.0; see
builtin/SOURCE.md). Matching is on lowercased whole words, so "Scunthorpe" does not hit "cunt"; a phrase matches
its words in sequence.

Classifier: a fastText-style linear text classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification"), the kind Dolma (Soldaini et al. 2024) runs over its whole corpus to score toxicity because it
processes megabytes per second on a CPU. A document's lowercased word unigrams and bigrams are hashed into B buckets
(CRC-32 mod B, stable across processes); the score is

    p(harmful | doc) = sigmoid(w . mean_{f in features(doc)} E[f] + b),     E: (B, d) bucket embeddings

trained with binary cross-entropy. The built-in one learns from Anthropic's HH-RLHF harmless-base (Bai et al. 2022;
../shared/data/hh_rlhf): for each dialogue, crowdworkers marked which of two assistant replies was more harmful.
The rejected reply is the harmful example, the chosen one the harmless one (pairs split 80/20 by a seed, so a
reply's twin is never on the other side), and 1,000 passages of Wikipedia summaries are harmless examples too (see
`builtin_classifier`). These labels are relative (a rejected reply is *more* harmful than its twin, not always
harmful), so the held-out precision/recall it reports is modest (about 55%), and honest.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from llmkit.errors import LlmkitError

HH_RLHF_FILE = "hh_rlhf/harmless-base/test.jsonl.gz"
WIKI_VITAL_FILE = "wiki_vital/summaries_en.jsonl.gz"
WIKIPEDIA_PASSAGES = 1000
ASSISTANT_TURN = "\n\nAssistant:"
_WORD = re.compile(r"[a-z0-9']+")


# ---- block list ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def builtin_blocklist() -> tuple[str, ...]:
    """The English LDNOOBW list that C4 used: one lowercased word or phrase per entry."""
    text = resources.files("llmkit.data").joinpath("builtin/blocklist_en.txt").read_text(encoding="utf-8")
    return tuple(line.strip().lower() for line in text.splitlines() if line.strip())


class Blocklist:
    """Finds block-listed words and phrases in text (whole lowercased words; a phrase is its words in order)."""

    def __init__(self, entries: Iterable[str] | None = None) -> None:
        entries = builtin_blocklist() if entries is None else tuple(entry.strip().lower() for entry in entries)
        words = [entry for entry in entries if entry and " " not in entry]
        phrases = [entry for entry in entries if " " in entry]
        alternatives = sorted(map(re.escape, words + phrases), key=len, reverse=True)
        self.pattern = re.compile(r"(?<![\w])(?:" + "|".join(alternatives) + r")(?![\w])") if alternatives else None

    def hits(self, text: str) -> list[str]:
        """Every block-listed word or phrase in `text`, in order (lowercased)."""
        return self.pattern.findall(text.lower()) if self.pattern is not None else []


# ---- classifier ------------------------------------------------------------------------------------------------------


def text_features(text: str, buckets: int) -> list[int]:
    """Hashed lowercased word unigrams and bigrams of `text` (at least one feature: the empty text hashes too)."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{first} {second}" for first, second in zip(words, words[1:])]
    return [zlib.crc32(gram.encode()) % buckets for gram in grams] or [0]


class HarmfulClassifier(nn.Module):
    """fastText-style: mean of hashed n-gram embeddings -> linear -> logit of "harmful"."""

    def __init__(self, buckets: int = 1 << 16, dim: int = 16) -> None:
        super().__init__()
        self.buckets, self.dim = buckets, dim
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.out = nn.Linear(dim, 1)

    def forward(self, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """features: flat (F,) bucket ids of all documents; offsets: (N,) start of each document -> (N,) logits."""
        return self.out(self.embed(features, offsets)).squeeze(-1)

    def _batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        per_text = [text_features(text, self.buckets) for text in texts]
        offsets = torch.tensor([0] + [len(features) for features in per_text[:-1]]).cumsum(0)
        return torch.tensor([f for features in per_text for f in features]), offsets

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> list[float]:
        """p(harmful) of each text."""
        if not texts:
            return []
        return torch.sigmoid(self(*self._batch(texts))).tolist()


def train_classifier(texts: Sequence[str], labels: Sequence[int], epochs: int = 30, lr: float = 0.05,
                     weight_decay: float = 1e-5, seed: int = 0) -> HarmfulClassifier:
    """Fit a HarmfulClassifier on (text, 1 = harmful / 0 = not) with full-batch Adam on the binary cross-entropy."""
    if len(texts) != len(labels) or not texts or set(labels) - {0, 1}:
        raise LlmkitError("train_classifier needs as many 0/1 labels as texts, and at least one text")
    torch.manual_seed(seed)
    model = HarmfulClassifier()
    features, offsets = model._batch(texts)
    targets = torch.tensor(labels, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = nn.functional.binary_cross_entropy_with_logits(model(features, offsets), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def final_reply(transcript: str) -> str:
    """The last assistant turn of an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    return transcript.rpartition(ASSISTANT_TURN)[2].strip()


def hh_rlhf_split(path: Path, held_out: float = 0.2, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) lists of (reply, label) from HH-RLHF harmless-base: rejected replies 1, chosen ones 0.
    Pairs are shuffled with `seed` and split whole; pairs whose replies are equal are skipped."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        pairs = [(final_reply(row["chosen"]), final_reply(row["rejected"])) for row in map(json.loads, file)]
    pairs = [(chosen, rejected) for chosen, rejected in pairs if chosen != rejected]
    random.Random(seed).shuffle(pairs)
    cut = int(len(pairs) * (1 - held_out))

    def examples(part: list[tuple[str, str]]) -> list[tuple[str, int]]:
        return [example for chosen, rejected in part for example in ((chosen, 0), (rejected, 1))]

    return examples(pairs[:cut]), examples(pairs[cut:])


@dataclass
class ClassifierReport:
    """Held-out quality of a classifier at one threshold."""

    threshold: float
    precision: float
    recall: float
    accuracy: float
    pairwise_accuracy: float  # how often a pair's rejected reply scores above its chosen one
    examples: int


def evaluate_classifier(model: HarmfulClassifier, examples: Sequence[tuple[str, int]],
                        threshold: float = 0.5) -> ClassifierReport:
    """Precision, recall and accuracy of `score >= threshold` on (text, label) examples given as (chosen, rejected)
    pairs in order, and the pairwise accuracy over those pairs."""
    scores = model.scores([text for text, _ in examples])
    labels = [label for _, label in examples]
    predicted = [score >= threshold for score in scores]
    true_positive = sum(p and y == 1 for p, y in zip(predicted, labels))
    flagged, positives = sum(predicted), sum(labels)
    pairs = list(zip(scores[0::2], scores[1::2]))
    return ClassifierReport(
        threshold=threshold,
        precision=true_positive / flagged if flagged else 0.0,
        recall=true_positive / positives if positives else 0.0,
        accuracy=sum(p == (y == 1) for p, y in zip(predicted, labels)) / len(labels),
        pairwise_accuracy=sum(rejected > chosen for chosen, rejected in pairs) / len(pairs),
        examples=len(labels),
    )


def wikipedia_passages(path: Path, count: int, sentences: int = 3) -> list[str]:
    """`count` passages of `sentences` sentences cut from the LAST summaries of wiki_vital (benchmarks read the
    first ones): clean encyclopedic text, the harmless examples that keep the classifier from flagging all prose."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        summaries = [json.loads(line)["text"] for line in file]
    passages: list[str] = []
    for summary in reversed(summaries):
        pieces = re.split(r"(?<=[.!?]) ", summary)
        passages += [" ".join(pieces[i:i + sentences]) for i in range(0, len(pieces), sentences)]
        if len(passages) >= count:
            break
    return passages[:count]


@lru_cache(maxsize=1)
def builtin_classifier(seed: int = 0) -> tuple[HarmfulClassifier, ClassifierReport]:
    """The classifier trained on HH-RLHF harmless-base's 80% split plus WIKIPEDIA_PASSAGES harmless passages, and its
    report on the other 20% of HH-RLHF (trained in a few seconds on first use in a process).

    Why the Wikipedia passages: every HH-RLHF text is a chat reply, and the harmless ones are often refusals, so a
    classifier trained on HH-RLHF alone learns "not a refusal = harmful" and flags 83% of Wikipedia summaries at 0.5
    (benchmarks/harmful.py); with 1,000 encyclopedic passages as harmless examples it flags under 1%, at the same
    held-out accuracy on HH-RLHF."""
    from llmkit.data.shared import shared_data_file

    train, held_out = hh_rlhf_split(shared_data_file(HH_RLHF_FILE), seed=seed)
    texts = [text for text, _ in train] + wikipedia_passages(shared_data_file(WIKI_VITAL_FILE), WIKIPEDIA_PASSAGES)
    labels = [label for _, label in train] + [0] * (len(texts) - len(train))
    model = train_classifier(texts, labels, seed=seed)
    return model, evaluate_classifier(model, held_out)
