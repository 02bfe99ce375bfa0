"""Cascades and routers (llmkit.serve.cascade, router, cascade_stages): fitted thresholds, exact costs, APGR.

The synthetic record below is small enough to work out by hand. Weak model: cost 1 per query, right on examples
0-5, scores 0.9 0.8 0.7 0.6 0.5 0.4 (right) and 0.45 0.3 0.2 0.1 (wrong, examples 6-9). Strong model: cost 10,
right on every example but 0. A threshold t keeps the weak answers scoring >= t and pays 10 more for the others:

    t     kept   escalated   right        mean cost
    0.1   all    none        6            1
    0.2   9      9           7            2
    0.3   8      8, 9        8            3
    0.4   7      7, 8, 9     9            4
    0.45  6      5, 7-9      9            5
    0.5   0-4    5-9         10           6
    inf   none   all         9            11
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.serve.cascade import (
    Outcomes,
    Price,
    all_points,
    apgr,
    area_under_curve,
    best_within_budget,
    cost_to_recover,
    evaluate_cascade,
    fit_cascade,
    pareto_frontier,
    single_model_point,
)
from llmkit.serve.cascade_stages import (
    Answer,
    Cascade,
    Stage,
    generation_answerer,
    mean_logprob,
    sample_agreement,
)
from llmkit.serve.router import fit_logistic, route, router_points
from tests.helpers import byte_tokenizer, cli_status, tiny_decoder

WEAK_SCORES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.45, 0.3, 0.2, 0.1)


def weak() -> Outcomes:
    return Outcomes("weak", (True,) * 6 + (False,) * 4, WEAK_SCORES, (Fraction(1),) * 10)


def strong() -> Outcomes:
    return Outcomes("strong", (False,) + (True,) * 9, (0.0,) * 10, (Fraction(10),) * 10)


def test_evaluate_cascade_matches_the_table_worked_by_hand():
    expected = {0.1: (6, 1), 0.2: (7, 2), 0.3: (8, 3), 0.4: (9, 4), 0.45: (9, 5), 0.5: (10, 6), math.inf: (9, 11)}
    for threshold, (right, cost) in expected.items():
        point = evaluate_cascade([weak(), strong()], [threshold])
        assert (point.accuracy, point.cost) == (Fraction(right, 10), Fraction(cost)), threshold
    assert evaluate_cascade([weak(), strong()], [0.45]).answered == (6, 4)


def test_frontier_and_fit_under_a_budget():
    frontier = pareto_frontier(all_points([weak(), strong()]))
    assert [(p.cost, p.accuracy) for p in frontier] == [(1, Fraction(6, 10)), (2, Fraction(7, 10)), (3, Fraction(8, 10)),
                                                         (4, Fraction(9, 10)), (6, Fraction(1))]
    fitted = fit_cascade([weak(), strong()], "5")  # 9/10 at cost 4 beats 9/10 at cost 5 (t = 0.45)
    assert fitted.thresholds == (0.4,) and fitted.accuracy == Fraction(9, 10) and fitted.cost == 4
    assert fit_cascade([weak(), strong()], 6.5).thresholds == (0.5,)


def test_fitted_thresholds_give_the_stated_accuracy_and_cost_on_a_held_out_split():
    fitted = fit_cascade([weak(), strong()], 5)
    # held out: weak right on 0 and 2; strong wrong on 2. t = 0.4 keeps 0 (right) and 1 (wrong), escalates 2 (strong
    # wrong) and 3 (strong right): 2 of 4 right, cost 1 + 10 * 2/4 = 6.
    held_weak = Outcomes("weak", (True, False, True, False), (0.95, 0.42, 0.35, 0.05), (Fraction(1),) * 4)
    held_strong = Outcomes("strong", (True, True, False, True), (0.0,) * 4, (Fraction(10),) * 4)
    point = evaluate_cascade([held_weak, held_strong], fitted.thresholds)
    assert (point.accuracy, point.cost, point.answered) == (Fraction(1, 2), Fraction(6), (2, 2))


def test_subset_is_a_split():
    assert weak().subset([0, 6]).correct == (True, False)
    assert weak().subset([0, 6]).score == (0.9, 0.45)


def test_a_cascade_of_one_model_is_that_model():
    point = evaluate_cascade([strong()], [])
    assert (point.accuracy, point.cost) == (strong().accuracy, strong().mean_cost) == (Fraction(9, 10), 10)
    answer = Answer("yes", 7, 2, (-0.5, -0.25))
    price = Price.of("1/3", "2/7", "1/100")
    result = Cascade((Stage("only", lambda prompt: answer, price, threshold=math.inf),))("q")
    assert (result.text, result.stage, result.cost) == ("yes", "only", Fraction(7, 3) + Fraction(4, 7) + Fraction(1, 100))


def test_live_cascade_escalates_below_threshold_and_costs_add_up_exactly():
    cheap = Answer("maybe", 11, 3, (-2.0, -1.0, -3.0))  # mean log-prob -2
    sure = Answer("no", 11, 1, (-0.1,))
    price_cheap, price_strong = Price.of("0.1", "0.3", "1/3"), Price.of("1/7", "1/11", 0)
    stages = (Stage("cheap", lambda prompt: cheap, price_cheap, threshold=-1.5),
              Stage("strong", lambda prompt: sure, price_strong))
    result = Cascade(stages, mean_logprob)("q")
    cheap_cost = Fraction(11, 10) + Fraction(9, 10) + Fraction(1, 3)
    strong_cost = Fraction(11, 7) + Fraction(1, 11)
    assert (result.text, result.stage, result.stage_index) == ("no", "strong", 1)
    assert result.cost == cheap_cost + strong_cost and [step.cost for step in result.steps] == [cheap_cost, strong_cost]
    assert [step.score for step in result.steps] == [-2.0, pytest.approx(-0.1)]
    kept = Cascade((Stage("cheap", lambda prompt: cheap, price_cheap, threshold=-2.0), stages[1]))("q")
    assert (kept.text, kept.cost) == ("maybe", cheap_cost)  # score -2 >= threshold -2: the cheap answer is final


def test_apgr_is_one_for_the_strong_model_zero_for_the_weak_and_worked_out_for_the_cascade():
    assert apgr([single_model_point(strong())], weak(), strong()) == 1.0
    assert apgr([single_model_point(weak())], weak(), strong()) == 0.0
    # budgets 1, 1.9, ..., 10: acc(c) = .6 .6 .7 .8 .9 .9 1 1 1 1 1 -> PGR 0 0 1/3 2/3 1 1 4/3 x5; trapezoid mean 0.9
    points = all_points([weak(), strong()])
    assert apgr(points, weak(), strong()) == pytest.approx(0.9, abs=1e-12)
    assert area_under_curve(points, weak(), strong()) == pytest.approx(0.6 + 0.9 * 0.3, abs=1e-12)
    assert cost_to_recover(points, weak(), strong(), 0.5) == 3  # 0.75 needed: 0.8 at cost 3
    assert cost_to_recover(points, weak(), strong(), 1.0) == 4
    assert cost_to_recover([single_model_point(weak())], weak(), strong(), 0.5) is None


def test_router_sends_each_query_to_one_model():
    easiness = WEAK_SCORES
    point = route(weak(), strong(), easiness, 0.5)  # 0-4 to weak (right), 5-9 to strong (right)
    assert (point.accuracy, point.cost, point.answered) == (Fraction(1), Fraction(55, 10), (5, 5))
    # the cascade at the same threshold also paid the weak model for the 5 queries it escalated
    assert evaluate_cascade([weak(), strong()], [0.5]).cost - point.cost == Fraction(1, 2)
    priced = route(weak(), strong(), easiness, 0.5, [Fraction(1, 4)] * 10)
    assert priced.cost == Fraction(55, 10) + Fraction(1, 4)
    everything = router_points(weak(), strong(), easiness)
    assert min(p.cost for p in everything) == 1 and max(p.cost for p in everything) == 10  # all weak ... all strong
    assert route(weak(), strong(), easiness, math.inf).accuracy == strong().accuracy


def test_logistic_scorer_learns_a_separable_rule_and_matches_a_closed_check():
    torch.manual_seed(0)
    x = torch.randn(200, 2, dtype=torch.float64)
    labels = (x[:, 0] - 0.5 * x[:, 1] > 0).tolist()
    scorer = fit_logistic(x, labels, ["a", "b"], l2=1e-3)
    predicted = (scorer.probability(x) > 0.5).tolist()
    assert sum(p == y for p, y in zip(predicted, labels)) >= 196
    weight = torch.tensor(scorer.weight) / torch.tensor(scorer.std)
    assert weight[1] / weight[0] == pytest.approx(-0.5, abs=0.1)  # the direction of the true boundary
    with pytest.raises(LlmkitError, match="every training label is the same"):
        fit_logistic(x, [True] * 200, ["a", "b"])


def test_sample_agreement_on_a_tiny_model_with_a_fixed_seed(one_thread):
    from llmkit.generate import SamplingSettings, generate

    model, tokenizer = tiny_decoder(vocab_size=256), byte_tokenizer()
    prompt = "abc"
    answer = generation_answerer(model, tokenizer, max_new_tokens=3, n_samples=6, temperature=1.0, seed=5)(prompt)
    redrawn = [generate(model, tokenizer, prompt, 3, SamplingSettings(temperature=1.0, seed=5 + s)) for s in range(6)]
    assert list(answer.samples) == redrawn  # the seeds make the samples reproducible
    assert answer.text == generate(model, tokenizer, prompt, 3)
    assert sample_agreement(answer) == sum(s.strip() == answer.text.strip() for s in redrawn) / 6
    assert answer.input_tokens == 3 * 7 and answer.output_tokens == len(tokenizer.encode(answer.text)) + sum(
        len(tokenizer.encode(s)) for s in redrawn)
    cold = generation_answerer(model, tokenizer, max_new_tokens=3, n_samples=4, temperature=1e-4, seed=0)(prompt)
    assert sample_agreement(cold) == 1.0  # a near-zero temperature samples the greedy answer every time
    assert len(cold.token_logprobs) == len(tokenizer.encode(cold.text)) and max(cold.token_logprobs) <= 0


# ----------------------------------------------------------------------------- errors


def test_negative_or_unreadable_price_names_the_part():
    with pytest.raises(LlmkitError, match="per output token is -1; a price cannot be negative"):
        Price.of(0, -1, 0)
    with pytest.raises(LlmkitError, match="fee is 'x', not a number"):
        Price.of(0, 0, "x")


def test_budget_below_the_cheapest_point_is_one_clear_line():
    frontier = pareto_frontier(all_points([weak(), strong()]))
    with pytest.raises(LlmkitError, match=r"--budget 0.5 is below the cheapest operating point \(mean cost 1 per query\)"):
        best_within_budget(frontier, "0.5")


def test_stages_on_different_examples_or_wrong_threshold_count():
    with pytest.raises(LlmkitError, match="different numbers of examples"):
        evaluate_cascade([weak(), strong().subset([0, 1])], [0.5])
    with pytest.raises(LlmkitError, match="2 stages take 1 thresholds"):
        evaluate_cascade([weak(), strong()], [])
    with pytest.raises(LlmkitError, match="no gap to recover"):
        apgr([single_model_point(weak())], strong(), Outcomes("s", (False,) * 10, (0.0,) * 10, (Fraction(20),) * 10))


# ----------------------------------------------------------------------------- the CLI


def test_cli_rejects_bad_costs_and_budget_before_loading_a_model(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")  # never loaded: the checks come first
    code, err = cli_status(capsys, "cascade", "--models", f"[{a}, {b}]", "--costs", "[1/1/0]")
    assert code == 2 and err.strip().splitlines() == [
        'error: --costs has 1 prices for 2 models (--models); give one "IN/OUT/FEE" per model, in the same order']
    code, err = cli_status(capsys, "cascade", "--models", f"[{a}, {b}]", "--costs", "[1/1/0, 2/-3/0]")
    assert code == 2 and "--costs entry 2 per output token is -3; a price cannot be negative" in err
    code, err = cli_status(capsys, "cascade", "--models", f"[{a}, {b}]", "--budget", "cheap")
    assert code == 2 and "--budget is 'cheap', not a number" in err and "Traceback" not in err


MODEL_COSTS = "[1/2/0, 3/5/0.25]"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):  # noqa: ANN201
    """Two tiny random decoders saved as llmkit directories, and one `llmkit cascade` over 16 SST-2 rows with them:
    (model paths, output folder, exit code, stdout, stderr)."""
    from llmkit.checkpoints import save_model

    root = tmp_path_factory.mktemp("cascade")
    models = []
    for seed in (0, 1):
        models.append(root / f"tiny{seed}")
        save_model(tiny_decoder(vocab_size=256, seed=seed), models[-1], tokenizer=byte_tokenizer())
    out = root / "out"
    import contextlib  # run_cli reads capsys, which a module fixture cannot use: capture by hand
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            from llmkit.cli import main

            main(["cascade", "--models", f"[{models[0]}, {models[1]}]", "--costs", MODEL_COSTS, "--limit", "16",
                  "--num_fewshot", "0", "--budget", "500", "--output", str(out), "--progress", "false"])
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
    return models, out, code, stdout.getvalue(), stderr.getvalue()


def test_cli_end_to_end_on_tiny_models_and_its_accounting(tiny_run):
    import json

    from llmkit.serve.cascade_task import answer_from_json

    models, out, code, stdout, err = tiny_run
    assert code == 0, err
    fitted = json.loads((out / "cascade.json").read_text())
    assert [stage["model"] for stage in fitted["stages"]] == [str(m) for m in models]
    assert fitted["stages"][1]["price"] == ["3", "5", "1/4"] and fitted["options"] == [" negative", " positive"]
    report = json.loads((out / "report.json").read_text())
    assert report["n_fit"] + report["n_held_out"] == 16 and (out / "cascade.png").stat().st_size > 1000
    # the held-out figures follow from the cached answers and the prices
    caches = sorted((out / "answers").glob("*.json"))
    assert len(caches) == 2
    held = sorted(set(range(16)) - set(_fit_rows(16)))
    by_method = {p["method"]: p for p in report["held_out"]}
    for name, cache, price in zip(("tiny0", "tiny1"), caches, (Price.of(1, 2, 0), Price.of(3, 5, "0.25"))):
        answers = [answer_from_json(a) for a in json.loads(cache.read_text()).values()]
        assert all(a.output_tokens == len(a.text.encode()) for a in answers)  # byte tokens: one per byte
        expected = sum(price.cost(answers[i].input_tokens, answers[i].output_tokens) for i in held) / len(held)
        assert by_method[name]["cost"] == pytest.approx(float(expected), rel=1e-12)
    assert "| cascade (fitted) |" in stdout


def test_cli_budget_below_the_cheapest_model_exits_2(tiny_run, capsys):
    models, out, *_ = tiny_run  # its answers are cached: no model runs again
    code, err = cli_status(capsys, "cascade", "--models", f"[{models[0]}, {models[1]}]", "--costs", MODEL_COSTS,
                           "--limit", "16", "--num_fewshot", "0", "--output", str(out), "--budget", "1",
                           "--progress", "false")
    assert code == 2 and "--budget 1 is below the cheapest operating point" in err


def _fit_rows(n: int) -> list[int]:
    from llmkit.serve.cascade_task import split_indices

    return split_indices(n, 0.5, 0)[0]


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def smollm2_pair():  # noqa: ANN201
    """SmolLM2-135M-Instruct twice: the GGUF's Q4_1 blocks kept (cheap) and dequantized to fp32 (strong)."""
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder

    path = default_model_path()
    return load_decoder(path), load_decoder(path, weights="float"), load_tokenizer(path)


@pytest.mark.slow
def test_two_stage_cascade_on_smollm2_accounts_for_every_token(smollm2_pair):
    from llmkit.eval.builtin import load_builtin
    from llmkit.eval.scoring import continuation_logprobs
    from llmkit.serve.cascade_stages import choice_answers
    from llmkit.serve.cascade_task import choice_task

    cheap, strong, tokenizer = smollm2_pair
    task = choice_task(load_builtin("sst2"), limit=5, num_fewshot=0)
    answers = {model: dict(zip(task.prompts, choice_answers(model, tokenizer, task.prompts, task.options)))
               for model in (cheap, strong)}
    # the reference: lm-eval-style log-likelihood of each option, from llmkit.eval.scoring
    requests = [(prompt, option) for prompt in task.prompts for option in task.options]
    reference = {model: [s.logprob for s in continuation_logprobs(model, tokenizer, requests)] for model in (cheap, strong)}
    prices = (Price.of("1/10", "1/5", "1/100"), Price.of(1, 2, "1/10"))
    median = sorted(mean_logprob(a) for a in answers[cheap].values())[len(task.prompts) // 2]
    cascade = Cascade((Stage("q4_1", answers[cheap].__getitem__, prices[0], threshold=median),
                       Stage("fp32", answers[strong].__getitem__, prices[1])))
    escalated = 0
    for row, prompt in enumerate(task.prompts):
        result = cascade(prompt)
        n_prompt = len(tokenizer.encode(prompt))  # "...Sentiment:" has no trailing space: its tokens are the context
        n_option = {option: len(tokenizer.encode(prompt + option)) - n_prompt for option in task.options}
        for step, model, price in zip(result.steps, (cheap, strong), prices):
            answer = answers[model][prompt]
            assert answer.input_tokens == n_prompt and answer.output_tokens == n_option[answer.text]
            assert step.cost == price.cost(n_prompt, n_option[answer.text])
            logprobs = reference[model][row * 2: row * 2 + 2]
            best = task.options[logprobs.index(max(logprobs))]
            assert answer.text == best and step.score == pytest.approx(max(logprobs) / n_option[best], abs=1e-9)
        assert result.cost == sum(step.cost for step in result.steps)
        escalated += result.stage == "fp32"
        assert (result.stage == "q4_1") == (result.steps[0].score >= median)
    assert 0 < escalated < len(task.prompts)


def test_serve_refuses_a_file_that_is_not_a_fitted_cascade(tiny_run, tmp_path, capsys):
    import json
    import socket

    models, *_ = tiny_run
    (tmp_path / "wrong.json").write_text(json.dumps({"format": "something else"}))
    with socket.socket() as probe:  # a port free right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = cli_status(capsys, "serve", "--model", str(models[0]), "--port", str(port), "--cascade",
                           str(tmp_path / "wrong.json"))
    assert code == 2 and "is not a fitted cascade (format 'something else'" in err and "Traceback" not in err


def test_serve_answers_the_cascade_model_and_passes_other_requests_through(tiny_run):
    from fastapi.testclient import TestClient

    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.serve.cascade_http import load_cascade, with_cascade
    from llmkit.serve.http import create_app, start_engine

    models, out, code, *_ = tiny_run
    assert code == 0
    cascade = load_cascade(out / "cascade.json", lambda path: (load_decoder(path), load_tokenizer(path)))
    app = create_app(api_key="k")
    served = start_engine(load_decoder(models[0]), load_tokenizer(models[0]), "tiny0")
    app.state.llmkit.attach(served)
    prompt = "Is the sentiment of each movie review positive or negative?\n\nReview: a gem of a film .\nSentiment:"
    expected = cascade(prompt)
    try:
        with TestClient(with_cascade(app, cascade, api_key="k")) as client:
            auth = {"Authorization": "Bearer k"}
            reply = client.post("/v1/chat/completions", headers=auth,
                                json={"model": "cascade", "messages": [{"role": "user", "content": prompt}]})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["choices"][0]["message"]["content"] == expected.text
            assert body["cascade"]["stage"] == expected.stage and Fraction(body["cascade"]["cost"]) == expected.cost
            assert [Fraction(step["cost"]) for step in body["cascade"]["steps"]] == [s.cost for s in expected.steps]
            completion = client.post("/v1/completions", headers=auth, json={"model": "cascade", "prompt": prompt})
            assert completion.json()["choices"][0]["text"] == expected.text
            assert client.post("/v1/completions", json={"model": "cascade", "prompt": prompt}).status_code == 401
            # another model's request reaches the server's own route, body intact
            other = client.post("/v1/completions", headers=auth, json={"model": "tiny0", "prompt": "ab", "max_tokens": 2})
            assert other.status_code == 200 and other.json()["model"] == "tiny0"
    finally:
        served.engine.shutdown()
