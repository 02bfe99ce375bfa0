"""GSM8K methods (llmkit.apps.gsm8k) on a scripted model: each returns the scripted answer, examples come from the
pool and never show the problem, accuracy is exact match; `llmkit reason` errors; one slow run on SmolLM2."""

import re
from fractions import Fraction
from functools import partial

import pytest

from llmkit.apps.answers import NUMBER_PATTERN
from llmkit.apps.gsm8k import (
    METHODS,
    Prediction,
    Setup,
    accuracy,
    direct,
    fewshot_cot,
    load_gsm8k,
    method_table,
    program_aided,
    rationale,
    run_method,
    self_consistency_cot,
    zero_shot_cot,
)
from llmkit.apps.pal import printed_number
from llmkit.apps.prompting import ANSWER_TRIGGER, COT_TRIGGER
from llmkit.errors import LlmkitError
from tests.helpers import ScriptedModel, cli_status


@pytest.fixture(scope="module")
def problems():
    return load_gsm8k("test", limit=4)


@pytest.fixture(scope="module")
def pool():
    return load_gsm8k("train", limit=30)


def answer_key(problems, wrong=()):
    """A reply function that answers each problem (found by its question, the last one in the prompt) right,
    except those in `wrong`, which it answers with reference + 1."""
    def reply(prompt):
        problem = next(p for p in problems if prompt.rfind(p.question) >= 0 and not any(
            prompt.rfind(q.question) > prompt.rfind(p.question) for q in problems))
        return f" She has 3 + 4 = 7 left. The answer is {problem.answer + (problem.index in wrong)}."
    return reply


def test_load_gsm8k_and_rationale():
    test = load_gsm8k("test")
    assert len(test) == 1319 and test[0].index == 0 and test[-1].index == 1318
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert load_gsm8k("train", limit=1)[0].solution == solution
    assert rationale(solution) == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether "
                                   "in April and May.\nThe answer is 72.")
    with pytest.raises(LlmkitError, match="split 'dev'"):
        load_gsm8k("dev")


def test_direct_answers_and_accuracy(problems, pool):
    model = ScriptedModel(answer_key(problems, wrong={1}))
    setup = Setup(shots=3, pool=pool)
    predictions = direct(model, problems, setup)
    assert [p.answer for p in predictions] == [p.answer + (p.index == 1) for p in problems]
    assert accuracy(predictions, problems) == pytest.approx(3 / 4)
    prompt = predictions[0].prompt
    assert predictions[0].n_examples == 3 and prompt.count("User: ") == 4  # 3 examples and the question, chat turns
    assert "The answer is" in prompt and "<<" not in prompt and "####" not in prompt  # answer-only examples


def test_fewshot_cot_prompt_holds_the_rationales_of_the_chosen_examples(problems, pool):
    model = ScriptedModel(answer_key(problems))
    setup = Setup(shots=2, pool=pool, chat=False)
    predictions = fewshot_cot(model, problems, setup)
    assert accuracy(predictions, problems) == 1.0
    for problem, prediction in zip(problems, predictions):
        shown = [p for p in pool if p.question in prediction.prompt]
        assert len(shown) == 2 and all(rationale(p.solution) in prediction.prompt for p in shown)
        assert prediction.prompt.endswith(f"Q: {problem.question}\nA:")
    assert model.prompts[0] == predictions[0].prompt


def test_examples_never_include_the_problem_itself(pool):
    setup = Setup(shots=5, pool=pool, chat=False)
    for selection in ("random", "fixed"):
        setup = Setup(shots=5, pool=pool, chat=False, selection=selection)
        for problem in pool[:6]:
            examples = setup.examples(problem, with_rationale=True)
            assert len(examples) == 5 and problem.question not in [e.question for e in examples]


def test_zero_shot_cot_reads_the_first_number_after_the_answer_trigger(problems):
    def reply(prompt):
        if prompt.endswith(ANSWER_TRIGGER):
            return " 18. Because 9 + 9 = 18, not 4"
        return " First 2 + 2 = 4. Then 4 * 9 = 36."
    model = ScriptedModel(reply)
    predictions = zero_shot_cot(model, problems[:2], Setup(chat=False))
    assert [p.answer for p in predictions] == [18, 18]  # the trigger's first number, not the chain's last (36)
    assert model.prompts[0] == f"Q: {problems[0].question}\nA: {COT_TRIGGER}"
    assert model.prompts[2].startswith(model.prompts[0] + " First 2 + 2 = 4") and model.prompts[2].endswith(ANSWER_TRIGGER)


def test_self_consistency_votes_and_records_every_chain(problems, pool):
    chains = ["The answer is 5.", "so 7", "The answer is 7.", "no number here", "The answer is 5."]
    model = ScriptedModel(chains * 2)
    predictions = self_consistency_cot(model, problems[:2], Setup(shots=1, pool=pool, samples=5))
    assert [p.answer for p in predictions] == [5, 5]  # 5 and 7 tie at 2 votes; 5 came first
    assert predictions[0].vote_share == pytest.approx(2 / 5) and predictions[0].replies == tuple(chains)
    assert predictions[0].reply == "The answer is 5."
    assert model.prompts[:5] == [predictions[0].prompt] * 5


def test_run_method_counts_missing_answers_and_tabulates(problems, pool):
    def reply(prompt):
        return "I cannot tell." if problems[0].question in prompt else answer_key(problems)(prompt)
    result = run_method("direct", partial(direct, setup=Setup(shots=1, pool=pool)), ScriptedModel(reply), problems,
                        batch_size=3, budget="24 tokens")
    assert (result.n_correct, result.n_missing, result.accuracy) == (3, 1, 0.75)
    assert len(result.predictions) == 4 and result.predictions[0].answer is None
    row = method_table([result]).splitlines()[2]
    assert re.match(r"\| direct \| 75\.0% \| 3/4 \| 1 \| 24 tokens \| \d+\.\d \|", row)
    with pytest.raises(LlmkitError, match="3 predictions for 4 problems"):
        accuracy([Prediction(Fraction(1), "", "")] * 3, problems)


def test_pal_method_runs_each_program_and_scores_its_printed_number(problems):
    """Programs that return the reference (problem 0), a wrong number (1), raise (2) and print text (3)."""
    bodies = [f"    return {problems[0].answer}\n", f"    return {problems[1].answer} + 1\n",
              "    return 1 / 0\n", "    return 'many'\n"]
    model = ScriptedModel(lambda prompt: next(body for p, body in zip(problems, bodies) if p.question in prompt))
    predictions = program_aided(model, problems, Setup(cot_tokens=64))
    assert [p.answer for p in predictions] == [problems[0].answer, problems[1].answer + 1, None, None]
    assert accuracy(predictions, problems) == pytest.approx(1 / 4)
    assert "# no answer: " in predictions[2].reply and "ZeroDivisionError" in predictions[2].reply
    assert "# printed: many" in predictions[3].reply and "not a number" in predictions[3].reply
    assert "pal" in METHODS and predictions[0].prompt.endswith("```python\ndef solution():")


def test_reason_cli_rejects_unknown_methods(capsys):
    code, err = cli_status(capsys, "reason", "--methods", "direct,pal_magic", "--limit", "1")
    assert code == 2 and "error: --methods 'direct,pal_magic': pal_magic is not a method" in err


@pytest.mark.slow
def test_methods_on_smollm2(smollm2_local, pool):
    """Each method on 3 real problems: replies come back, answers are extracted or marked missing, the CoT prompt
    holds the rationales, self-consistency draws n different chains."""
    problems = load_gsm8k("test", limit=3)
    setup = Setup(shots=1, pool=pool, cot_tokens=32, answer_tokens=6, samples=2)  # SC: 6 chains, one batch
    for name, method in METHODS.items():
        predictions = method(smollm2_local, problems, setup)
        assert len(predictions) == 3 and all(p.reply.strip() for p in predictions), name
        for p in predictions:
            if name == "pal":  # the answer is the program's last printed line, read as one number
                printed = p.reply.split("\n# printed: ")[-1].split("\n")[0]
                assert p.answer == printed_number(printed) and (p.answer is None) == ("# no answer: " in p.reply)
                continue
            has_number = NUMBER_PATTERN.search(p.reply.split(ANSWER_TRIGGER)[-1]) is not None
            assert (p.answer is None) == (not has_number), (name, p.reply)
        if name == "fewshot_cot":
            for p in predictions:
                shown = [e for e in pool if e.question in p.prompt]
                assert p.n_examples == len(shown) == 1 and all(rationale(e.solution) in p.prompt for e in shown)
        if name == "self_consistency":
            assert all(len(p.replies) == len(set(p.replies)) == 2 for p in predictions)  # sampled: 2 different chains


def test_reason_cli_end_to_end_on_a_tiny_model(tmp_path, capsys, one_thread):
    """`llmkit reason` on a tiny random model: the table, results.json and per-method samples agree with each other
    and with GSM8K's references; plain prompts (no chat template), examples dropped to fit a 1,024-token window."""
    import json

    from llmkit.checkpoints import save_model
    from tests.helpers import byte_tokenizer, run_cli, tiny_decoder

    save_model(tiny_decoder(max_seq_len=1024), tmp_path / "model", byte_tokenizer())
    code, out, err = run_cli(capsys, "reason", "--model", str(tmp_path / "model"), "--methods",
                             "direct,self_consistency", "--limit", "2", "--shots", "2", "--samples", "2",
                             "--cot_tokens", "8", "--batch_size", "2", "--output", str(tmp_path / "out"),
                             "--progress", "false")
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [m["method"] for m in results["methods"]] == ["direct", "self_consistency"]
    for method in results["methods"]:
        records = [json.loads(line) for line in (tmp_path / "out" / "samples" / f"{method['method']}.jsonl").open()]
        assert [r["reference"] for r in records] == ["18", "3"]  # the first two test problems
        assert method["n_correct"] == sum(r["correct"] for r in records) and method["n_problems"] == 2
        budget = 24 if method["method"] == "direct" else 8  # new tokens; byte tokens: one per UTF-8 byte
        for r in records:
            assert r["prompt"].endswith(f"Q: {r['question']}\nA:") and r["prompt"].count("Q: ") == r["n_examples"] + 1
            assert len(r["prompt"].encode()) + budget <= 1024, (method["method"], r["n_examples"])
        if method["method"] == "self_consistency":  # two rationales do not fit beside the question: one is dropped
            assert [r["n_examples"] for r in records] == [1, 1]
    assert all(len(r["replies"]) == 2 for r in map(json.loads, (tmp_path / "out/samples/self_consistency.jsonl").open()))
    assert "| direct |" in out and (tmp_path / "out" / "table.md").read_text().strip() in out
