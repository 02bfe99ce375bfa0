"""ReAct (Yao et al. 2023, "ReAct: Synergizing Reasoning and Acting in Language Models"): the model alternates a
thought, an action (a tool call) and the tool's observation, until it acts `finish` with the answer.

    transcript = run_agent(model, "What is 17% of 2,350 plus 12?", make_tools(["calculator"]))
    print(transcript.render())          # Thought / Action / Observation lines, then the answer

Each step the model writes ONE JSON object, {"thought": ..., "action": ..., "input": ...}, generated under a JSON
schema (TextModel.complete_json; the action an enum of the tool names and "finish", thought and input capped by
maxLength), so even a 135M model never writes an action llmkit cannot parse. `constrained=False` is the classic
free-text format (`Thought: ...` / `Action: tool[input]`) parsed with a regular expression, kept to measure what
the constraint buys (benchmarks/react_tools.py).

The prompt holds the tool descriptions, a short worked example, the question and the steps so far; before each
step it is fitted into the model's context window (prompt tokens + max_new_tokens <= context_window, counted with
the model's tokenizer): the oldest observations are elided first, and if it still does not fit the run stops
("context_full") rather than overflow. A reply that is not a valid step (bad JSON, a missing field, an unknown
tool) is counted as a parse failure and answered with an observation saying so; `max_parse_failures` in a row stop
the run. Stop reasons: finished, step_budget, parse_failures, context_full.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llmkit.apps.pipeline import TextModel
from llmkit.apps.tools import Tool
from llmkit.errors import LlmkitError

FINISH = "finish"
THOUGHT_CHARS = 120  # maxLength of a thought
INPUT_CHARS = 100  # maxLength of an action's input
MAX_NEW_TOKENS = 112  # enough for a whole step at the caps above
OBSERVATION_CHARS = 400  # an observation longer than this is cut
ELIDED = "(elided to fit the context window)"
STOP_REASONS = ("finished", "step_budget", "parse_failures", "context_full")
FREE_TEXT_ACTION = re.compile(r"Action:\s*([A-Za-z_]+)\s*\[(.*)\]", re.DOTALL)


@dataclass
class Step:
    """One Thought / Action / Observation. `action` is None when the reply was not a valid step (`raw` keeps it)."""

    thought: str
    action: str | None
    input: str
    observation: str
    raw: str


@dataclass
class Transcript:
    """A whole run: the steps, the final answer (None unless finished), why it stopped, the parse failures, and the
    largest prompt (in tokens) the model was given."""

    question: str
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stop_reason: str = "step_budget"
    parse_failures: int = 0
    max_prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """The run as Thought / Action / Observation lines, then the answer and the stop reason."""
        lines = [f"Question: {self.question}"]
        for step in self.steps:
            lines.append(f"Thought: {step.thought}")
            lines.append(f"Action: {step.action}[{step.input}]" if step.action else f"Action (unparsed): {step.raw!r}")
            if step.action != FINISH:
                lines.append(f"Observation: {step.observation}")
        lines.append(f"Answer: {self.answer if self.answer is not None else '(none)'}  [stop: {self.stop_reason}, "
                     f"{len(self.steps)} steps, {self.parse_failures} parse failures]")
        return "\n".join(lines)


def action_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON schema of one step: a thought, an action among the tools and finish, and its input."""
    return {"type": "object", "additionalProperties": False, "required": ["thought", "action", "input"],
            "properties": {"thought": {"type": "string", "maxLength": THOUGHT_CHARS},
                           "action": {"enum": [tool.name for tool in tools] + [FINISH]},
                           "input": {"type": "string", "maxLength": INPUT_CHARS}}}


def run_agent(model: TextModel, question: str, tools: Sequence[Tool], max_steps: int = 6, constrained: bool = True,
              max_new_tokens: int = MAX_NEW_TOKENS, max_parse_failures: int = 3) -> Transcript:
    """Answer `question` with the ReAct loop (module docstring) and return the transcript."""
    if not question.strip():
        raise LlmkitError("question is empty; pass the question for the agent")
    if not tools:
        raise LlmkitError("the agent needs at least one tool (--tools calculator,python)")
    if max_steps < 1 or max_parse_failures < 1:
        raise LlmkitError(f"max_steps={max_steps} and max_parse_failures={max_parse_failures} must be >= 1")
    by_name = {tool.name: tool for tool in tools}
    transcript = Transcript(question.strip())
    failures_in_a_row = 0
    for _ in range(max_steps):
        prompt = _fitted_prompt(model, transcript, tools, constrained, max_new_tokens)
        if prompt is None:
            transcript.stop_reason = "context_full"
            return transcript
        transcript.max_prompt_tokens = max(transcript.max_prompt_tokens, model.count_tokens(prompt))
        if constrained:
            reply = model.complete_json(prompt, action_schema(tools), max_new_tokens)
        else:
            reply = model.complete([prompt], max_new_tokens, stop=("\nObservation", "\nQuestion:"))[0]
        step = _parse_step(reply, by_name, constrained)
        transcript.steps.append(step)
        if step.action is None:
            transcript.parse_failures += 1
            failures_in_a_row += 1
            if failures_in_a_row >= max_parse_failures:
                transcript.stop_reason = "parse_failures"
                return transcript
            continue
        failures_in_a_row = 0
        if step.action == FINISH:
            transcript.answer, transcript.stop_reason = step.input, "finished"
            return transcript
        step.observation = _truncate(by_name[step.action].run(step.input))
    transcript.stop_reason = "step_budget"
    return transcript


def _parse_step(reply: str, tools: dict[str, Tool], constrained: bool) -> Step:
    """A Step from the model's reply; action None (and the observation says why) when it is not a valid step."""
    names = ", ".join([*tools, FINISH])
    if constrained:
        try:
            data = json.loads(reply)
        except ValueError:
            return Step("", None, "", f"error: that was not valid JSON; write one object like "
                                      f'{{"thought": "...", "action": "<one of {names}>", "input": "..."}}', reply)
        if not isinstance(data, dict) or not all(isinstance(data.get(key), str) for key in ("thought", "action", "input")):
            return Step("", None, "", "error: the step needs string fields thought, action and input", reply)
        thought, action, text = data["thought"], data["action"], data["input"]
    else:
        match = FREE_TEXT_ACTION.search(reply)
        if match is None:
            return Step(reply.strip()[:THOUGHT_CHARS], None, "",
                        f"error: no action found; end with a line Action: <one of {names}>[input]", reply)
        thought = reply[:match.start()].strip().removeprefix("Thought:").strip()
        action, text = match.group(1), match.group(2).strip()
    if action != FINISH and action not in tools:
        return Step(thought, None, text, f"error: unknown action {action!r}; use one of {names}", reply)
    return Step(thought, action, text, "", reply)


def _truncate(observation: str) -> str:
    observation = observation.strip()
    return observation if len(observation) <= OBSERVATION_CHARS else observation[:OBSERVATION_CHARS] + " ...(cut)"


def _fitted_prompt(model: TextModel, transcript: Transcript, tools: Sequence[Tool], constrained: bool,
                   max_new_tokens: int) -> str | None:
    """The prompt for the next step, within the context window: oldest observations elided first; None when even
    that does not fit."""
    head = _header(tools, constrained) + f"Question: {transcript.question}\n"
    budget = model.context_window - max_new_tokens
    if model.count_tokens(head) > budget:
        raise LlmkitError(f"the question and tool descriptions take {model.count_tokens(head)} tokens; the model's "
                          f"context holds {model.context_window} with {max_new_tokens} new: shorten the question")
    steps = [_render_step(step, step.observation, constrained) for step in transcript.steps]
    cue = "Step: " if constrained else "Thought:"
    for elided in range(len(steps) + 1):
        if elided:
            step = transcript.steps[elided - 1]
            steps[elided - 1] = _render_step(step, ELIDED, constrained)
        prompt = head + "".join(steps) + cue
        if model.count_tokens(prompt) <= budget:
            return prompt
    return None


def _render_step(step: Step, observation: str, constrained: bool) -> str:
    if constrained:
        text = step.raw.strip() if step.action is None else json.dumps(
            {"thought": step.thought, "action": step.action, "input": step.input})
        return f"Step: {text}\nObservation: {observation}\n"
    action = f"Action: {step.action}[{step.input}]" if step.action else step.raw.strip()
    return f"Thought: {step.thought}\n{action}\nObservation: {observation}\n"


def _header(tools: Sequence[Tool], constrained: bool) -> str:
    """Instructions, the tools and one worked example (with the calculator, or the first tool that computes)."""
    lines = ["Answer the question by thinking step by step and using tools. Tools:"]
    lines += [f"- {tool.name}: {tool.description}" for tool in tools]
    lines.append(f"- {FINISH}: give the final answer as input, when you know it")
    if constrained:
        lines.append('Each step is one JSON object: {"thought": ..., "action": ..., "input": ...}.')
    else:
        lines.append("Each step is a line Thought: ... and a line Action: tool[input].")
    lines.append("")
    lines += _example(tools, constrained)
    return "\n".join(lines) + "\n\n"


# a short worked example per tool (question, steps of (thought, action, input, observation)); the prompt shows the
# first whose tool the agent has
EXAMPLES = {
    "calculator": ("What is 15% of 240, plus 12?", [("15% of 240 is 240 * 0.15; then add 12.", "calculator",
                                                     "240 * 0.15 + 12", "48"), ("The result is 48.", FINISH, "48", None)]),
    "python": ("What is 15% of 240, plus 12?", [("15% of 240 is 240 * 0.15; then add 12.", "python",
                                                 "print(240 * 0.15 + 12)", "48.0"),
                                                ("The result is 48.", FINISH, "48", None)]),
    "search": ("In which city is the Eiffel Tower?", [("I should look up the Eiffel Tower.", "search", "Eiffel Tower",
                                                       "[1] The Eiffel Tower is a wrought-iron lattice tower in Paris, "
                                                       "France."), ("It is in Paris.", FINISH, "Paris", None)]),
}


def _example(tools: Sequence[Tool], constrained: bool) -> list[str]:
    names = [tool.name for tool in tools]
    example = next((EXAMPLES[name] for name in EXAMPLES if name in names), None)
    if example is None:  # tools of the caller's own: no example
        return []
    question, steps = example
    lines = ["Example:", f"Question: {question}"]
    for thought, action, value, observation in steps:
        if constrained:
            lines.append("Step: " + json.dumps({"thought": thought, "action": action, "input": value}))
        else:
            lines += [f"Thought: {thought}", f"Action: {action}[{value}]"]
        if observation is not None:
            lines.append(f"Observation: {observation}")
    return lines
