"""PAL, program-aided language models (Gao et al. 2022, "PAL: Program-aided Language Models"): instead of reasoning
to an answer in text, the model writes a program whose result is the answer, and an interpreter does the arithmetic.

    result = solve_with_program(model, "Tom has 3 boxes of 12 pens and gives away 5. How many pens are left?")
    result.answer   # 31, computed by running the model's `solution()` in the sandbox

Steps: a few-shot prompt of word problems, each followed by a `def solution():` ... `return answer` program (the
examples below are written for llmkit from GSM8K *train* problems); the prompt ends with the new problem and the
first line of its program, so the model only writes the body (as chat turns for a chat model). llmkit extracts the
program (a fenced block or bare code, cut at the first line after the function that is not code), checks that it
parses, appends `print(solution())`, runs it in the sandbox (llmkit.apps.sandbox) and reads the last printed line as
a number.
Every way this can fail (no body, a syntax error, an exception, a timeout, a non-number) gives answer None and a
reason, never an exception.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

from llmkit.apps.answers import NUMBER_PATTERN, parse_number
from llmkit.apps.pipeline import TextModel, has_chat_template
from llmkit.apps.sandbox import DEFAULT_TIMEOUT, SandboxResult, run_python
from llmkit.errors import LlmkitError

PROGRAM_START = "def solution():\n"  # every example program's first line
# The prompt ends before the newline: byte-level BPE vocabularies write a newline and the next line's indentation as
# one token ("\n   " then " x"), so a prompt ending in "\n" would ask for a continuation the model never saw (SmolLM2
# then closed the code block at once on 20 of 20 GSM8K problems; with this ending its programs run).
PROMPT_END = PROGRAM_START.rstrip("\n")
CALL = "\n\nprint(solution())\n"  # appended to the extracted program before it runs
STOP = ("```", "\nQuestion:", "\n\n\n")
DEFAULT_MAX_NEW_TOKENS = 256

EXAMPLES = (
    ("A wallet costs $100. Betty has saved half of that. Her parents give her $15 and her grandparents give her "
     "twice what her parents gave. How many more dollars does Betty need?",
     '    """How much Betty still needs for the $100 wallet."""\n'
     "    price = 100\n"
     "    saved = price / 2\n"
     "    from_parents = 15\n"
     "    from_grandparents = 2 * from_parents\n"
     "    answer = price - saved - from_parents - from_grandparents\n"
     "    return answer\n"),
    ("Ken fills a box with jelly beans until it weighs 2 pounds, adds brownies until the weight triples, adds 2 "
     "more pounds of jelly beans, then adds gummy worms until the weight doubles. What does the box weigh now, in "
     "pounds?",
     "    weight = 2\n"
     "    weight = weight * 3  # brownies triple it\n"
     "    weight = weight + 2  # more jelly beans\n"
     "    weight = weight * 2  # gummy worms double it\n"
     "    answer = weight\n"
     "    return answer\n"),
    ("Joy reads 8 pages every 20 minutes. How many hours does she need to read 120 pages?",
     "    pages_per_minute = 8 / 20\n"
     "    minutes = 120 / pages_per_minute\n"
     "    answer = minutes / 60\n"
     "    return answer\n"),
)
INSTRUCTION = ("Solve each math word problem by writing a Python function solution() that computes the answer step "
               "by step with named variables and returns it as a number.\n\n")


@dataclass(frozen=True)
class PalResult:
    """One PAL attempt: the model's reply, the program extracted from it and run, what the sandbox reported, and the
    numeric answer, or None with the reason."""

    problem: str
    reply: str
    code: str
    sandbox: SandboxResult | None
    answer: Fraction | None
    reason: str | None = None  # why answer is None


def pal_prompt(problem: str, model: TextModel | None = None) -> str:
    """The few-shot prompt for `problem`, ending with PROMPT_END (the model continues with the body). With a chat
    model, the examples are earlier turns (question; program) and the reply is begun for it; otherwise one plain
    text holds them."""
    question = problem.strip()
    if model is not None and has_chat_template(model):
        messages = []
        for example, body in EXAMPLES:
            messages += [{"role": "user", "content": f"{INSTRUCTION}Question: {example}"},
                         {"role": "assistant", "content": f"```python\n{PROGRAM_START}{body}```"}]
        messages.append({"role": "user", "content": f"{INSTRUCTION}Question: {question}"})
        return f"{model.chat_prompt(messages)}```python\n{PROMPT_END}"
    shots = "".join(f"Question: {example}\n```python\n{PROGRAM_START}{body}```\n\n" for example, body in EXAMPLES)
    return f"{INSTRUCTION}{shots}Question: {question}\n```python\n{PROMPT_END}"


def extract_program(text: str) -> str | None:
    """The `solution` function in a model's text: the first ```python block that defines it, else the bare code from
    `def solution` on, cut before the first line after it that is neither indented nor blank (trailing chatter).
    None when the text has no `def solution`."""
    for block in re.findall(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", text, flags=re.DOTALL):
        if "def solution" in block:
            text = block
            break
    start = text.find("def solution")
    if start < 0:
        return None
    lines = text[start:].splitlines()
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def printed_number(line: str) -> Fraction | None:
    """The value of a printed result line that is one number ("31", "31.0", "$1,200", "12.50", "7%"), exact as
    llmkit.apps.answers reads numbers; a float within 1e-9 of a whole number (0.1 + 0.2 style rounding of the
    program's arithmetic) counts as that whole number. None if the line is not one number."""
    text = line.strip().rstrip("%").strip()
    if NUMBER_PATTERN.fullmatch(text) is None:
        return None
    value = parse_number(text)
    nearest = round(value)
    return Fraction(nearest) if abs(value - nearest) <= Fraction(1, 10**9) else value


def solve_with_program(model: TextModel, problem: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       timeout: float = DEFAULT_TIMEOUT) -> PalResult:
    """Ask `model` for a program that solves `problem`, run it in the sandbox, and return the number it prints."""
    if not problem.strip():
        raise LlmkitError("problem is empty; pass the word problem to solve")
    reply = model.complete([pal_prompt(problem, model)], max_new_tokens, stop=STOP)[0]
    text = reply if "def solution" in reply else PROMPT_END + ("" if reply.startswith("\n") else "\n") + reply
    code = extract_program(text) or text  # text holds `def solution`, so a program is always found
    try:
        ast.parse(code)
    except SyntaxError as error:
        return PalResult(problem, reply, code, None, None, f"the program does not parse: {error.msg} (line {error.lineno})")
    result = run_python(code + CALL, timeout=timeout)
    if not result.ok:
        return PalResult(problem, reply, code, result, None, f"the program did not finish: {result.status}, {result.detail}")
    lines = result.stdout.strip().splitlines()
    answer = printed_number(lines[-1]) if lines else None
    if answer is None:
        printed = lines[-1][:80] if lines else ""
        return PalResult(problem, reply, code, result, None, f"the program printed {printed!r}, not a number")
    return PalResult(problem, reply, code, result, answer)
