"""One-shot routers and a small trained scorer.

A router (RouteLLM, Ong et al. 2024) sends each query to exactly one model: a cheap predictor s(query) estimates
how easy the query is for the weak model; s >= t goes to the weak model, anything else to the strong one. Unlike a
cascade it never pays for two answers, only for the predictor (`router_cost`, zero for a free feature). Sweeping t
over the predictor's values gives the router's cost-accuracy curve (`router_points`), which `llmkit.serve.cascade`
evaluates like a cascade's (APGR, cost to recover a share of the gap).

`LogisticScorer` is the trained predictor: logistic regression p(y = 1 | x) = sigmoid(w . z + b) on standardised
features z = (x - mean) / std, fitted by L-BFGS on the mean binary cross-entropy plus (l2 / 2) |w|^2. As a cascade
scorer (FrugalGPT's "generation scoring function", there a DistilBERT) x are features of a stage's answer (mean and
min token log-probability, length, option margin) and y "the answer was right"; as a router, x are features of the
query alone (e.g. a sentence embedding) and y "the weak model was right".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from llmkit.errors import LlmkitError
from llmkit.serve.cascade import Outcomes, Point, threshold_candidates


def route(weak: Outcomes, strong: Outcomes, easiness: Sequence[float], threshold: float,
          router_cost: Sequence[Fraction] | None = None) -> Point:
    """Accuracy and mean cost when each query with easiness >= threshold goes to the weak model, the rest to the
    strong one; `router_cost` (per query) is what computing the easiness cost."""
    n = len(weak)
    if len(strong) != n or len(easiness) != n or (router_cost is not None and len(router_cost) != n):
        raise LlmkitError(f"router inputs have different lengths (weak {n}, strong {len(strong)}, easiness "
                          f"{len(easiness)}); record all of them on the same examples")
    right, cost, to_weak = 0, Fraction(0), 0
    for i in range(n):
        chosen = weak if easiness[i] >= threshold else strong
        to_weak += chosen is weak
        right += chosen.correct[i]
        cost += chosen.cost[i] + (router_cost[i] if router_cost is not None else 0)
    return Point((threshold,), Fraction(right, n), cost / n, (to_weak, n - to_weak))


def router_points(weak: Outcomes, strong: Outcomes, easiness: Sequence[float],
                  router_cost: Sequence[Fraction] | None = None) -> list[Point]:
    """The router at every threshold that splits the easiness values differently (all to strong ... all to weak)."""
    scores = Outcomes("router", weak.correct, tuple(easiness), weak.cost)
    return [route(weak, strong, easiness, t, router_cost) for t in threshold_candidates(scores)]


@dataclass(frozen=True)
class LogisticScorer:
    """p(y = 1 | x) = sigmoid(weight . (x - mean) / std + bias); `names` says what each feature is."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weight: tuple[float, ...]
    bias: float

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """(N, d) features -> (N,) probabilities."""
        z = (features.double() - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)
        return torch.sigmoid(z @ torch.tensor(self.weight, dtype=torch.float64) + self.bias)

    def to_json(self) -> dict:
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std),
                "weight": list(self.weight), "bias": self.bias}

    @classmethod
    def from_json(cls, data: dict) -> LogisticScorer:
        return cls(tuple(data["names"]), tuple(data["mean"]), tuple(data["std"]), tuple(data["weight"]),
                   float(data["bias"]))


def fit_logistic(features: torch.Tensor, labels: Sequence[bool], names: Sequence[str], l2: float = 1e-2,
                 steps: int = 100) -> LogisticScorer:
    """Logistic regression by L-BFGS on mean BCE + (l2/2)|w|^2, features standardised (a constant one gets std 1)."""
    x = features.double()
    if x.ndim != 2 or x.shape[0] != len(labels) or x.shape[1] != len(names):
        raise LlmkitError(f"features have shape {tuple(x.shape)}; expected ({len(labels)} examples, {len(names)} "
                          "features)")
    y = torch.tensor([float(label) for label in labels], dtype=torch.float64)
    if y.min() == y.max():
        raise LlmkitError("every training label is the same; a scorer needs right and wrong answers to learn from")
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std  # (N, d)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LogisticScorer(tuple(names), tuple(mean.tolist()), tuple(std.tolist()), tuple(weight.detach().tolist()),
                          float(bias.detach()))
