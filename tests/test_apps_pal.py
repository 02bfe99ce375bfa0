"""PAL (llmkit.apps.pal): program extraction, the sandboxed run and the number parsed from it, on a scripted model
(deterministic replies, malformed ones included) and on the real SmolLM2."""

from __future__ import annotations

from fractions import Fraction

import pytest

from llmkit.apps.pal import (
    EXAMPLES,
    PROGRAM_START,
    PROMPT_END,
    extract_program,
    pal_prompt,
    printed_number,
    solve_with_program,
)
from llmkit.apps.sandbox import run_python
from llmkit.errors import LlmkitError
from tests.helpers import ScriptedModel, cli_status, run_cli

PROBLEM = "Tom has 3 boxes of 12 pens and gives away 5. How many pens are left?"


def test_the_prompt_examples_compute_their_gsm8k_answers() -> None:
    answers = []
    for _, body in EXAMPLES:
        result = run_python(PROGRAM_START + body + "\nprint(solution())\n", timeout=2)
        answers.append(printed_number(result.stdout))
    assert answers == [5, 16, 5]  # the GSM8K train answers of the problems they were written from


class BaseModel(ScriptedModel):
    """A scripted model without a chat template (a base model)."""

    def chat_prompt(self, messages):
        raise LlmkitError("this model's tokenizer has no chat template")


@pytest.mark.parametrize("newline", ["\n", ""])  # a real model writes the newline itself (one "\n   " token)
def test_body_continuation_is_run_and_answered(newline) -> None:
    model = ScriptedModel([newline + "    boxes = 3\n    pens = boxes * 12\n    answer = pens - 5\n    return answer\n"])
    result = solve_with_program(model, PROBLEM, timeout=2)
    assert (result.answer, result.reason) == (31, None)
    prompt = model.prompts[0]  # a chat model: each example is a user turn and the assistant's program
    assert prompt == pal_prompt(PROBLEM, model)
    assert prompt.endswith(f"Question: {PROBLEM}\nAssistant:```python\n{PROMPT_END}")
    assert prompt.count("Assistant: ```python\ndef solution():\n") == len(EXAMPLES)
    assert result.code.startswith(PROGRAM_START) and result.sandbox.stdout == "31\n"


def test_a_base_model_gets_one_plain_prompt() -> None:
    model = BaseModel(["\n    return 7 * 6\n"])
    assert solve_with_program(model, PROBLEM, timeout=2).answer == 42
    assert model.prompts[0] == pal_prompt(PROBLEM) and model.prompts[0].endswith(f"{PROBLEM}\n```python\n{PROMPT_END}")
    assert "Assistant:" not in model.prompts[0] and model.prompts[0].count("```python\ndef solution():\n") == 3


def test_fenced_program_with_trailing_chatter_is_extracted() -> None:
    text = ("Sure! Here is the code:\n```python\nimport math\ndef solution():\n    return 0.5 * 7\n```\n"
            "This returns 3.5.\n```python\ndef other():\n    pass\n```")
    assert extract_program(text) == "def solution():\n    return 0.5 * 7\n"


def test_trailing_chatter_after_the_body_is_dropped() -> None:
    reply = "    total = 0.5 * 7\n    return total\nThis returns 3.5. Hope it helps!\ndef other(): pass"
    result = solve_with_program(ScriptedModel([reply]), PROBLEM, timeout=2)
    assert result.answer == 3.5 and "Hope" not in result.code and "other" not in result.code


def test_a_whole_function_in_the_reply_is_used_as_is() -> None:
    reply = "def solution():\n    return 12 * 3 - 5\n"
    assert solve_with_program(ScriptedModel([reply]), PROBLEM, timeout=2).answer == 31


def test_bare_program_is_cut_at_the_first_unindented_line() -> None:
    text = "def solution():\n    x = 2\n\n    return x * 21\nThe answer is 42.\nprint('not code')"
    assert extract_program(text) == "def solution():\n    x = 2\n\n    return x * 21\n"
    assert extract_program("The answer is 42.") is None


@pytest.mark.parametrize(("reply", "reason"), [
    ("I think the answer is 31.", "does not parse"),  # continuation of `def solution():` with no body
    ("    return (3 * \n", "does not parse"),
    ("    return 1 / 0\n", "ZeroDivisionError"),
    ("    while True:\n        pass\n", "timeout"),
    ("    return 'thirty-one'\n", "not a number"),
    ("    print('hi')\n", "'None', not a number"),
])
def test_malformed_programs_give_no_answer_and_a_reason(reply: str, reason: str) -> None:
    result = solve_with_program(ScriptedModel([reply]), PROBLEM, timeout=1)
    assert result.answer is None and reason in result.reason


def test_reply_that_stops_at_once_has_no_body() -> None:
    result = solve_with_program(ScriptedModel(["```\nThe answer is 31."]), PROBLEM, timeout=1)  # cut at the fence
    assert result.answer is None and result.sandbox is None and "does not parse" in result.reason


def test_printed_number() -> None:
    texts = ("31", "31.0", "$1,200", "12.50", "7%", "0.30000000000000004", "-2.5", "abc", "nan", "1 2", "x 3")
    assert [printed_number(text) for text in texts] == \
        [31, 31, 1200, Fraction(25, 2), 7, Fraction("0.30000000000000004"), Fraction(-5, 2),
         None, None, None, None]
    assert printed_number("17.999999999999996") == 18  # float rounding of the program's arithmetic


def test_pal_cli_solves_a_gsm8k_test_problem_and_shows_the_reference(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    model = ScriptedModel(["    eggs = 16 - 3 - 4\n    return eggs * 2\n"])
    monkeypatch.setattr("llmkit.commands.common.local_model", lambda *args: model)
    code, out, err = run_cli(capsys, "pal", "--timeout", "2")
    assert code == 0, err
    assert "Janet" in out and "return eggs * 2" in out and "Answer: 18" in out and "Reference answer: 18" in out


def test_pal_cli_rejects_a_gsm8k_index_out_of_range(capsys: pytest.CaptureFixture) -> None:
    code, err = cli_status(capsys, "pal", "--gsm8k_index", "5000")
    assert code == 2 and "--gsm8k_index 5000 is out of range" in err


@pytest.mark.slow
def test_pal_on_smollm2_runs_the_extracted_program(smollm2_local) -> None:
    problem = "A baker makes 24 muffins and sells 9 of them. How many muffins are left?"
    result = solve_with_program(smollm2_local, problem, max_new_tokens=96, timeout=3)
    assert result.code is not None and result.code.startswith(PROGRAM_START), result.reply
    if result.sandbox is not None:  # it parsed, so it ran: the sandbox's output is what was parsed
        assert result.sandbox.protections and (result.answer is not None) == (result.reason is None)
        if result.answer is not None:
            assert printed_number(result.sandbox.stdout.strip().splitlines()[-1]) == result.answer
    else:
        assert "does not parse" in result.reason
