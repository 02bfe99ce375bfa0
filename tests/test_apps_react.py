"""The ReAct agent (llmkit.apps.react) and its tools (llmkit.apps.tools): a scripted model reaches the right answer,
malformed steps are counted and answered, the step budget and the context window hold; the calculator against
Python's own arithmetic; the loop on the real SmolLM2 with constrained steps."""

from __future__ import annotations

import json
import math

import pytest

from llmkit.apps.react import ELIDED, FINISH, action_schema, run_agent
from llmkit.apps.tools import calculate, make_tools
from llmkit.errors import LlmkitError
from llmkit.generate.json_schema import compile_schema
from tests.helpers import ScriptedModel, cli_status, run_cli


def step(thought: str, action: str, text: str) -> str:
    return json.dumps({"thought": thought, "action": action, "input": text})


@pytest.mark.parametrize("expression", ["1 + 2 * 3", "(12 + 30) * 3 / 4", "2 ** 10 - 7 // 2", "-(5 % 3) + 0.5",
                                        "17 * 2350 / 100 + 12", "2 ** -2", "10 / 4"])
def test_calculator_matches_python_arithmetic(expression: str) -> None:
    assert calculate(expression) == pytest.approx(eval(expression), rel=1e-12)  # the reference: Python itself


def test_calculator_accepts_thousands_separators_and_caret() -> None:
    assert calculate("2,350 * 2") == 4700 and calculate("3^2") == 9


@pytest.mark.parametrize(("expression", "message"), [
    ("__import__('os').system('true')", "is not allowed"), ("9 ** 9 ** 9", "exponent"), ("1 / 0", "division by zero"),
    ("x + 1", "'x' is not allowed"), ("2 +", "not an arithmetic expression"), ("1" * 300, "longer than"),
    ("(-8) ** 0.5", "not a real number"), ("10.0 ** 999", "too large"), ("(10 ** 90) * (10 ** 90)", "digits")])
def test_calculator_refuses_with_a_clear_message(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=re_escape(message)):
        calculate(expression)
    assert make_tools(["calculator"])[0].run(expression).startswith("error: ")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_make_tools_checks_names() -> None:
    with pytest.raises(LlmkitError, match="unknown tool 'web'"):
        make_tools(["calculator", "web"])
    with pytest.raises(LlmkitError, match="--index"):
        make_tools(["search"])
    hits = make_tools(["search"], search=lambda query, k: [f"{query} fact {i}" for i in range(k)])[0].run("Everest")
    assert hits.splitlines() == ["[1] Everest fact 0", "[2] Everest fact 1", "[3] Everest fact 2"]


def test_scripted_agent_uses_the_tools_and_finishes() -> None:
    model = ScriptedModel([step("Multiply first.", "calculator", "17 * 2350 / 100"),
                           step("Now add 12 in Python.", "python", "print(399.5 + 12)"),
                           step("Done.", FINISH, "411.5")])
    transcript = run_agent(model, "What is 17% of 2,350 plus 12?", make_tools(["calculator", "python"]))
    assert (transcript.answer, transcript.stop_reason, transcript.parse_failures) == ("411.5", "finished", 0)
    assert [s.observation for s in transcript.steps] == ["399.5", "411.5", ""]
    assert 'Step: {"thought": "Multiply first.", "action": "calculator", "input": "17 * 2350 / 100"}\n' \
           "Observation: 399.5\nStep: " in model.prompts[1]
    assert "- calculator: " in model.prompts[0] and "- python: " in model.prompts[0]
    text = transcript.render()
    assert "Action: calculator[17 * 2350 / 100]\nObservation: 399.5" in text and "Answer: 411.5" in text


def test_malformed_json_and_unknown_tool_are_counted_and_answered() -> None:
    model = ScriptedModel(['{"thought": "oops", "action": ', step("Try the web.", "web", "x"),
                           step("Use the calculator.", "calculator", "6 * 7"), step("Done.", FINISH, "42")])
    transcript = run_agent(model, "What is 6 times 7?", make_tools(["calculator"]))
    assert (transcript.answer, transcript.stop_reason, transcript.parse_failures) == ("42", "finished", 2)
    assert [s.action for s in transcript.steps] == [None, None, "calculator", FINISH]
    assert "not valid JSON" in transcript.steps[0].observation and "not valid JSON" in model.prompts[1]
    assert "unknown action 'web'" in model.prompts[2]


def test_parse_failures_in_a_row_stop_the_run() -> None:
    model = ScriptedModel(["not json", "[1, 2]", '{"thought": 1, "action": "finish", "input": "x"}'])
    transcript = run_agent(model, "What is 6 times 7?", make_tools(["calculator"]), max_parse_failures=3)
    assert (transcript.stop_reason, transcript.parse_failures, transcript.answer) == ("parse_failures", 3, None)


def test_step_budget_stops_the_run() -> None:
    model = ScriptedModel(lambda prompt: step("Again.", "calculator", "1 + 1"))
    transcript = run_agent(model, "Loop forever?", make_tools(["calculator"]), max_steps=4)
    assert (transcript.stop_reason, len(transcript.steps), transcript.answer) == ("step_budget", 4, None)


def test_tool_errors_become_observations() -> None:
    model = ScriptedModel([step("Divide.", "calculator", "1 / 0"), step("Run it.", "python", "raise ValueError('no')"),
                           step("Give up.", FINISH, "unknown")])
    transcript = run_agent(model, "What is 1 / 0?", make_tools(["calculator", "python"]))
    assert transcript.steps[0].observation == "error: division by zero"
    python_observation = transcript.steps[1].observation
    assert python_observation.startswith("error (error):") and "ValueError: no" in python_observation


def test_prompt_stays_inside_the_context_window_by_eliding_old_observations() -> None:
    long_fact = " ".join(["word"] * 60)
    model = ScriptedModel([step("Look.", "search", "a"), step("Look again.", "search", "b"),
                           step("And again.", "search", "c"), step("Done.", FINISH, "x")], context_window=360)
    tools = make_tools(["search"], search=lambda query, k: [long_fact])
    transcript = run_agent(model, "Q?", tools, max_new_tokens=100)
    assert transcript.stop_reason == "finished"
    assert all(model.count_tokens(prompt) + 100 <= 360 for prompt in model.prompts)
    assert ELIDED in model.prompts[-1] and long_fact in model.prompts[-1]  # oldest elided, newest kept
    assert transcript.max_prompt_tokens == max(model.count_tokens(prompt) for prompt in model.prompts)


def test_context_full_stops_instead_of_overflowing() -> None:
    model = ScriptedModel(lambda prompt: step(" ".join(["long"] * 40), "calculator", "1 + 1"), context_window=330)
    transcript = run_agent(model, "Q?", make_tools(["calculator"]), max_steps=20, max_new_tokens=100)
    assert transcript.stop_reason == "context_full"
    assert all(model.count_tokens(prompt) + 100 <= 330 for prompt in model.prompts)


def test_free_text_format_is_parsed_or_counted() -> None:
    model = ScriptedModel([" I multiply.\nAction: calculator[6 * 7]", " I am not sure what to do.",
                           " It is 42.\nAction: finish[42]"])
    transcript = run_agent(model, "What is 6 times 7?", make_tools(["calculator"]), constrained=False)
    assert (transcript.answer, transcript.parse_failures) == ("42", 1)
    assert transcript.steps[0].observation == "42" and model.prompts[0].endswith("Question: What is 6 times 7?\nThought:")
    assert "Action: calculator[6 * 7]\nObservation: 42\n" in model.prompts[1]


def test_action_schema_compiles_with_the_tool_enum() -> None:
    node = compile_schema(action_schema(make_tools(["calculator", "python"])))
    assert node.properties["action"].literals == (b'"calculator"', b'"python"', b'"finish"')
    assert node.required == {"thought", "action", "input"} and not node.additional


def test_bad_arguments_raise() -> None:
    with pytest.raises(LlmkitError, match="question is empty"):
        run_agent(ScriptedModel([]), " ", make_tools(["calculator"]))
    with pytest.raises(LlmkitError, match="shorten the question"):
        run_agent(ScriptedModel([], context_window=50), "Q?", make_tools(["calculator"]))


def test_agent_cli_rejects_an_unknown_tool(capsys: pytest.CaptureFixture) -> None:
    code, err = cli_status(capsys, "agent", "--tools", "calculator,web", "--question", "What is 2 + 2?")
    assert code == 2 and "unknown tool 'web'" in err and "Traceback" not in err


@pytest.mark.slow
def test_constrained_agent_on_smollm2_parses_every_step(smollm2_local) -> None:
    tools = make_tools(["calculator"])
    transcript = run_agent(smollm2_local, "What is 37 times 12?", tools, max_steps=2)
    assert transcript.parse_failures == 0 and transcript.steps
    assert all(s.action in ("calculator", FINISH) for s in transcript.steps)
    assert transcript.max_prompt_tokens + 112 <= smollm2_local.context_window
    for s in transcript.steps:
        if s.action == "calculator":  # the observation is the calculator's own answer to the model's input
            assert s.observation == tools[0].run(s.input)
    assert transcript.stop_reason in ("finished", "step_budget")
    assert (transcript.answer is not None) == (transcript.stop_reason == "finished")


def test_agent_cli_prints_the_transcript_and_writes_json(capsys: pytest.CaptureFixture, tmp_path, monkeypatch) -> None:
    model = ScriptedModel([step("Multiply.", "calculator", "84 * 3.5 + 60 * 2"), step("Done.", FINISH, "414")])
    monkeypatch.setattr("llmkit.commands.common.local_model", lambda *args: model)
    output = tmp_path / "run.json"
    code, out, err = run_cli(capsys, "agent", "--tools", "calculator", "--max_steps", "3", "--output", str(output))
    assert code == 0, err
    assert "Question: A train travels" in out and "Observation: 414\n" in out and "Answer: 414" in out
    saved = json.loads(output.read_text())
    assert (saved["answer"], saved["stop_reason"], len(saved["steps"])) == ("414", "finished", 2)


@pytest.mark.slow
def test_agent_cli_on_smollm2_writes_the_transcript(smollm2_local, capsys: pytest.CaptureFixture, tmp_path,
                                                    monkeypatch) -> None:
    monkeypatch.setattr("llmkit.commands.common.local_model", lambda *args: smollm2_local)  # the shared fixture's model
    output = tmp_path / "run.json"
    code, out, err = run_cli(capsys, "agent", "--tools", "calculator,python", "--question", "What is 9 + 10?",
                             "--max_steps", "1", "--output", str(output))
    assert code == 0, err
    saved = json.loads(output.read_text())
    assert saved["question"] == "What is 9 + 10?" and saved["parse_failures"] == 0 and "Question: What is 9 + 10?" in out
    assert all(s["action"] in ("calculator", "python", "finish") for s in saved["steps"])
    assert math.isfinite(saved["max_prompt_tokens"]) and saved["max_prompt_tokens"] + 112 <= smollm2_local.context_window


def test_agent_cli_searches_an_index(capsys: pytest.CaptureFixture, tmp_path, monkeypatch) -> None:
    """--tools search reads a `llmkit rag index` folder: the observation holds the indexed passage (BM25 half of the
    hybrid ranking finds the exact words even with a tiny random encoder)."""
    from llmkit.checkpoints import save_model
    from tests.test_apps_index import tiny_embedder

    embedder = tiny_embedder()
    save_model(embedder.model, tmp_path / "encoder", embedder.tokenizer)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "everest.txt").write_text("Mount Everest was first climbed in 1953 by Hillary and Norgay.", encoding="utf-8")
    (docs / "paris.txt").write_text("Paris is the capital of France.", encoding="utf-8")
    index = tmp_path / "index"
    code, _, err = run_cli(capsys, "rag", "index", "--docs", str(docs), "--output", str(index), "--model",
                           str(tmp_path / "encoder"))
    assert code == 0, err
    model = ScriptedModel([step("Look it up.", "search", "Everest first climbed"), step("Found it.", FINISH, "1953")])
    monkeypatch.setattr("llmkit.commands.common.local_model", lambda *args: model)
    code, out, err = run_cli(capsys, "agent", "--tools", "search", "--index", str(index), "--question",
                             "When was Everest first climbed?")
    assert code == 0, err
    assert "Observation: [1] everest: Mount Everest was first climbed in 1953" in out and "Answer: 1953" in out
    code, err = cli_status(capsys, "agent", "--tools", "calculator", "--index", str(index))
    assert code == 2 and "--index is read by the search tool only" in err
