"""Model cascades: ask the cheapest model first, escalate while its answer scores low (FrugalGPT).

FrugalGPT (Chen, Zaharia, Zou 2023, "FrugalGPT: How to Use Large Language Models While Reducing Cost and Improving
Performance") orders models from cheap to strong. Stage k answers the query; a scorer g(query, answer) in R judges
the answer; if g >= t_k the answer is final, else the query goes to stage k + 1; the last stage's answer is always
final. A query that stage k answers costs the sum of stages 1..k's costs, each

    cost = price_in * input_tokens + price_out * output_tokens + fee            (per call, exact Fractions)

The thresholds t_1..t_{K-1} are fitted on a labelled set: from each stage's recorded (correct, score, cost) per
example, every threshold vector's accuracy and mean cost follow by arithmetic, with no model call; the fitted
cascade is the most accurate one whose mean cost is within the budget, and sweeping budgets gives the whole
cost-accuracy frontier (its Pareto-optimal points).

Evaluation against a weak (cheap) and a strong model follows RouteLLM (Ong et al. 2024, "RouteLLM: Learning to Route
LLMs with Preference Data"): the performance gap recovered at cost c is PGR(c) = (acc(c) - acc_weak) / (acc_strong -
acc_weak); APGR is its mean over budgets equally spaced from the weak model's cost to the strong model's (the paper
integrates PGR over cost and evaluates it at 10 equal cost intervals; llmkit uses those 11 points, trapezoid rule).
acc(c) is the best accuracy among a method's operating points that cost at most c (its cheapest point when none
does: a single model runs whatever the budget), so the strong model alone has APGR 1 and the weak alone 0.

Accuracies and costs are Fractions: they add up exactly, and a test can state them by hand.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from llmkit.errors import LlmkitError

APGR_POINTS = 11  # RouteLLM evaluates PGR at 10 equal cost intervals: their 11 end points
MAX_THRESHOLD_CANDIDATES = 64  # per stage, when a cascade has 3 or more stages (the search is their product)


def as_fraction(value: Fraction | int | float | str, name: str) -> Fraction:
    """An exact non-negative Fraction from "1/3", "0.002", 2 or 0.5 (a float is taken by its decimal text)."""
    try:
        number = Fraction(str(value)) if isinstance(value, float) else Fraction(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise LlmkitError(f"{name} is {value!r}, not a number; write e.g. 0.002 or 1/500") from None
    if number < 0:
        raise LlmkitError(f"{name} is {value}; a price cannot be negative: pass 0 or more")
    return number


@dataclass(frozen=True)
class Price:
    """What one call to a model costs: per input (prompt) token, per output token, and a fixed fee per call."""

    per_input_token: Fraction = Fraction(0)
    per_output_token: Fraction = Fraction(0)
    per_call: Fraction = Fraction(0)

    @classmethod
    def of(cls, per_input_token: Fraction | float | str = 0, per_output_token: Fraction | float | str = 0,
           per_call: Fraction | float | str = 0, name: str = "price") -> Price:
        """A checked Price from numbers or strings ("1/1000"); a negative or non-numeric part raises LlmkitError."""
        return cls(as_fraction(per_input_token, f"{name} per input token"),
                   as_fraction(per_output_token, f"{name} per output token"), as_fraction(per_call, f"{name} fee"))

    def cost(self, input_tokens: int, output_tokens: int) -> Fraction:
        return self.per_input_token * input_tokens + self.per_output_token * output_tokens + self.per_call

    def to_json(self) -> list[str]:
        return [str(self.per_input_token), str(self.per_output_token), str(self.per_call)]


@dataclass(frozen=True)
class Outcomes:
    """One model's record on a labelled set, example by example: was it right, its answer's score, its call's cost."""

    name: str
    correct: tuple[bool, ...]
    score: tuple[float, ...]
    cost: tuple[Fraction, ...]

    def __post_init__(self) -> None:
        if not (len(self.correct) == len(self.score) == len(self.cost)) or not self.correct:
            raise LlmkitError(f"outcomes of {self.name}: {len(self.correct)} correct flags, {len(self.score)} scores and "
                              f"{len(self.cost)} costs; give one of each per example (at least one example)")

    def __len__(self) -> int:
        return len(self.correct)

    def subset(self, indices: Sequence[int]) -> Outcomes:
        """These outcomes on the examples `indices` (a split)."""
        return Outcomes(self.name, tuple(self.correct[i] for i in indices), tuple(self.score[i] for i in indices),
                        tuple(self.cost[i] for i in indices))

    @property
    def accuracy(self) -> Fraction:
        return Fraction(sum(self.correct), len(self))

    @property
    def mean_cost(self) -> Fraction:
        return sum(self.cost, Fraction(0)) / len(self)


@dataclass(frozen=True)
class Point:
    """One operating point of a cascade or router: its thresholds, accuracy, mean cost per query, and how many
    queries each stage answered."""

    thresholds: tuple[float, ...]
    accuracy: Fraction
    cost: Fraction
    answered: tuple[int, ...]


def _check_stages(stages: Sequence[Outcomes]) -> None:
    if not stages:
        raise LlmkitError("a cascade needs at least one stage; give one Outcomes per model, cheapest first")
    sizes = {len(stage) for stage in stages}
    if len(sizes) != 1:
        raise LlmkitError(f"stages were recorded on different numbers of examples ({sorted(sizes)}); record every "
                          "stage on the same labelled set")


def evaluate_cascade(stages: Sequence[Outcomes], thresholds: Sequence[float]) -> Point:
    """Accuracy and mean cost of the cascade `stages` with per-stage `thresholds` (one per stage but the last): an
    example stops at the first stage whose score is >= its threshold, having paid every stage up to that one."""
    _check_stages(stages)
    if len(thresholds) != len(stages) - 1:
        raise LlmkitError(f"{len(stages)} stages take {len(stages) - 1} thresholds (none for the last stage); got "
                          f"{len(thresholds)}")
    n = len(stages[0])
    right, total_cost, answered = 0, Fraction(0), [0] * len(stages)
    for i in range(n):
        for k, stage in enumerate(stages):
            total_cost += stage.cost[i]
            if k == len(stages) - 1 or stage.score[i] >= thresholds[k]:
                right += stage.correct[i]
                answered[k] += 1
                break
    return Point(tuple(thresholds), Fraction(right, n), total_cost / n, tuple(answered))


def threshold_candidates(outcomes: Outcomes, limit: int | None = None) -> list[float]:
    """Thresholds that give every distinct split of these scores: each distinct score (accept it and above), and
    +inf (accept none). With `limit`, that many spread evenly over the sorted list (always keeping +inf)."""
    values = sorted(set(outcomes.score)) + [math.inf]
    if limit is None or len(values) <= limit:
        return values
    picks = {round(j * (len(values) - 1) / (limit - 1)) for j in range(limit)}
    return [values[j] for j in sorted(picks)]


def all_points(stages: Sequence[Outcomes]) -> list[Point]:
    """Every operating point of the cascade: all threshold vectors over the candidates (exhaustive for 2 stages;
    MAX_THRESHOLD_CANDIDATES per stage beyond)."""
    _check_stages(stages)
    limit = None if len(stages) <= 2 else MAX_THRESHOLD_CANDIDATES
    grids = [threshold_candidates(stage, limit) for stage in stages[:-1]]
    return [evaluate_cascade(stages, list(thresholds)) for thresholds in itertools.product(*grids)]


def pareto_frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats: sorted by cost, each strictly more accurate than every cheaper one (of
    points with equal cost and accuracy, the first found)."""
    best: list[Point] = []
    for point in sorted(points, key=lambda p: (p.cost, -p.accuracy)):
        if not best or point.accuracy > best[-1].accuracy:
            best.append(point)
    return best


def best_within_budget(frontier: Sequence[Point], budget: Fraction | float | str) -> Point:
    """The most accurate frontier point whose mean cost is <= budget; raises when even the cheapest costs more."""
    limit = as_fraction(budget, "--budget")
    affordable = [point for point in frontier if point.cost <= limit]
    if not affordable:
        cheapest = min(point.cost for point in frontier)
        raise LlmkitError(f"--budget {float(limit):.6g} is below the cheapest operating point (mean cost "
                          f"{float(cheapest):.6g} per query); raise --budget to at least that")
    return max(affordable, key=lambda point: (point.accuracy, -point.cost))


def fit_cascade(stages: Sequence[Outcomes], budget: Fraction | float | str) -> Point:
    """FrugalGPT's threshold fit: the thresholds that maximise accuracy on these labelled outcomes with mean cost
    per query <= budget."""
    return best_within_budget(pareto_frontier(all_points(stages)), budget)


# ----------------------------------------------------------------------------- evaluation against weak / strong

def accuracy_at(points: Sequence[Point], budget: Fraction) -> Fraction:
    """acc(c): the best accuracy among `points` costing <= budget; the cheapest point's when none does."""
    affordable = [point.accuracy for point in points if point.cost <= budget]
    return max(affordable) if affordable else min(points, key=lambda p: (p.cost, -p.accuracy)).accuracy


def budget_grid(weak: Outcomes, strong: Outcomes, n_points: int = APGR_POINTS) -> list[Fraction]:
    """n_points budgets equally spaced from the weak model's mean cost to the strong model's."""
    low, high = weak.mean_cost, strong.mean_cost
    if high <= low:
        raise LlmkitError(f"the strong model ({strong.name}) costs {float(high):.6g} per query, no more than the weak "
                          f"one ({weak.name}, {float(low):.6g}); give the cheaper model first and check --costs")
    return [low + (high - low) * Fraction(j, n_points - 1) for j in range(n_points)]


def apgr(points: Sequence[Point], weak: Outcomes, strong: Outcomes, n_points: int = APGR_POINTS) -> float:
    """Average performance gap recovered (RouteLLM): mean of (acc(c) - acc_weak) / (acc_strong - acc_weak) over
    budgets c equally spaced between the two models' costs (trapezoid rule over the n_points)."""
    gap = strong.accuracy - weak.accuracy
    if gap <= 0:
        raise LlmkitError(f"the strong model ({strong.name}, accuracy {float(strong.accuracy):.3f}) is no more accurate "
                          f"than the weak one ({weak.name}, {float(weak.accuracy):.3f}): there is no gap to recover")
    recovered = [(accuracy_at(points, c) - weak.accuracy) / gap for c in budget_grid(weak, strong, n_points)]
    return float((sum(recovered) - (recovered[0] + recovered[-1]) / 2) / (n_points - 1))


def single_model_point(outcomes: Outcomes) -> Point:
    """A model alone as an operating point (it answers every query)."""
    return Point((), outcomes.accuracy, outcomes.mean_cost, (len(outcomes),))


def cost_to_recover(points: Sequence[Point], weak: Outcomes, strong: Outcomes, fraction: float) -> Fraction | None:
    """The least mean cost at which `points` reach acc_weak + fraction * (acc_strong - acc_weak) (RouteLLM's "50%
    qual"; fraction 1 = the strong model's accuracy); None when no point does."""
    target = weak.accuracy + Fraction(str(fraction)) * (strong.accuracy - weak.accuracy)
    reaching = [point.cost for point in points if point.accuracy >= target]
    return min(reaching) if reaching else None


def area_under_curve(points: Sequence[Point], weak: Outcomes, strong: Outcomes, n_points: int = APGR_POINTS) -> float:
    """Area under acc(c) over the budgets between the two models' costs, with cost normalised to [0, 1]."""
    values = [accuracy_at(points, c) for c in budget_grid(weak, strong, n_points)]
    return float((sum(values) - (values[0] + values[-1]) / 2) / (n_points - 1))
