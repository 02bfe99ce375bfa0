"""Tools for the ReAct agent (llmkit.apps.react): each takes the model's input text and returns an observation
text. A tool never raises for what the model asked: a bad expression or a failing program is an observation that
says what went wrong, so the model can try again.

- `calculator`: arithmetic over Python's `ast` (never eval): numbers, parentheses, + - * / // % ** and unary
  +/-, with limits so `9**9**9` cannot hang the host.
- `python`: a program run in the sandbox (llmkit.apps.sandbox); the observation is what it printed.
- `search`: a caller's `search(query, k) -> list[str]` (e.g. an llmkit RAG index); the observation lists the hits.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmkit.apps.sandbox import run_python
from llmkit.errors import LlmkitError

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000  # |b| in a ** b
MAX_RESULT_DIGITS = 100  # integers longer than this are refused (they only come from runaway products)
PYTHON_TIMEOUT = 5.0  # seconds per python tool call
SEARCH_HITS = 3

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


@dataclass(frozen=True)
class Tool:
    """A named action the agent may take: `run(input) -> observation`; `description` goes into the prompt."""

    name: str
    description: str
    run: Callable[[str], str]


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError with a readable message for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.strip().replace(",", "").replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression (use numbers, ( ), + - * / // % **)") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        try:
            value = BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number")
        if isinstance(value, int) and abs(value) >= 10**MAX_RESULT_DIGITS:
            raise ValueError(f"the result has more than {MAX_RESULT_DIGITS} digits")
        return value
    raise ValueError(f"{ast.unparse(node)!r} is not allowed; use numbers, ( ), + - * / // % **")


def _format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 10)) if isinstance(value, float) else str(value)


def calculator_tool() -> Tool:
    def run(expression: str) -> str:
        try:
            return _format_number(calculate(expression))
        except ValueError as error:
            return f"error: {error}"

    return Tool("calculator", "evaluates one arithmetic expression, e.g. (12 + 30) * 3 / 4", run)


def python_tool(timeout: float = PYTHON_TIMEOUT) -> Tool:
    def run(code: str) -> str:
        result = run_python(code, timeout=timeout)
        if result.ok:
            return result.stdout.strip() or "(the program printed nothing; print the result)"
        return f"error ({result.status}): {result.detail}"

    return Tool("python", "runs a short Python program without network or files and returns what it prints, "
                          "e.g. print(sum(range(1, 11)))", run)


def search_tool(search: Callable[[str, int], Sequence[str]], k: int = SEARCH_HITS) -> Tool:
    def run(query: str) -> str:
        hits = list(search(query, k))
        return "\n".join(f"[{i}] {hit}" for i, hit in enumerate(hits, 1)) if hits else "no results"

    return Tool("search", "looks up short encyclopedia passages about a query, e.g. Mount Everest height", run)


TOOL_NAMES = ("calculator", "python", "search")


def make_tools(names: Sequence[str], search: Callable[[str, int], Sequence[str]] | None = None,
               python_timeout: float = PYTHON_TIMEOUT) -> list[Tool]:
    """The tools named (among TOOL_NAMES), in order; `search` must be given when "search" is named."""
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(calculator_tool())
        elif name == "python":
            tools.append(python_tool(python_timeout))
        elif name == "search":
            if search is None:
                raise LlmkitError("the search tool needs a search function (in the CLI: --index INDEX); or drop "
                                  "search from --tools")
            tools.append(search_tool(search))
        else:
            raise LlmkitError(f"unknown tool {name!r} in --tools; choose from {', '.join(TOOL_NAMES)}")
    if len({tool.name for tool in tools}) != len(tools):
        raise LlmkitError(f"--tools names a tool twice: {', '.join(names)}")
    return tools
