"""The compiled decode step (llmkit/generate/compiled.py): the same tokens and logits as the eager step, for a float
and for a quantized model, one compilation for every later step and request, and clear errors where it cannot run."""

from __future__ import annotations

import pytest
import torch
from helpers import cli_status, tiny_decoder

import llmkit.generate.compiled as compiled
from llmkit.errors import LlmkitError
from llmkit.generate import compile_decode_step, decode_step, generate_tokens
from llmkit.quant import native, quantize
from llmkit.quant.fused import fuse_quantized_projections

PROMPTS = [[5, 17, 3, 99, 42], [7, 8]]


def greedy(model: torch.nn.Module, prompts: list[list[int]], steps: int = 12) -> list[list[int | None]]:
    return list(generate_tokens(model, prompts, max_new_tokens=steps))


def step_logits(model: torch.nn.Module, step: torch.nn.Module, n_steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n_steps, V) of the same greedy continuation stepped by `model` itself and by `step`."""
    rows = []
    for forward in (model, step):
        with torch.inference_mode():
            cache = model.new_cache(1, 32)
            logits = model(torch.tensor([PROMPTS[0]]), cache=cache, last_token_only=True)[:, -1]
            out = []
            for _ in range(n_steps):
                logits = forward(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
                out.append(logits[0])
        rows.append(torch.stack(out))
    return rows[0], rows[1]


@pytest.fixture(scope="module")
def float_model() -> torch.nn.Module:
    torch._dynamo.reset()
    return compile_decode_step(tiny_decoder())


def test_compiled_step_matches_eager_float(float_model: torch.nn.Module) -> None:
    eager, compiled_logits = step_logits(float_model, decode_step(float_model))
    torch.testing.assert_close(compiled_logits, eager, atol=1e-4, rtol=1e-4)  # fp32; inductor reorders sums


def test_one_compilation_serves_new_lengths_and_batch_sizes(float_model: torch.nn.Module) -> None:
    from torch._dynamo.utils import counters

    plain = tiny_decoder()
    long_prompt = list(range(1, 30))
    graphs = counters["stats"]["unique_graphs"]
    assert greedy(float_model, PROMPTS[:1]) == greedy(plain, PROMPTS[:1])
    # 12 steps at 12 cache lengths: at most one graph for the first step and one with the length a symbol (a length
    # the graph specialised on, e.g. the decode op's slot as a plain int, recompiles per step until dynamo gives up)
    assert counters["stats"]["unique_graphs"] - graphs <= 2
    graphs = counters["stats"]["unique_graphs"]
    assert greedy(float_model, [long_prompt], steps=20) == greedy(plain, [long_prompt], steps=20)  # a longer cache
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    # batch size 1 is always its own graph (dynamo specialises sizes 0 and 1); one more serves every larger batch
    assert greedy(float_model, PROMPTS) == greedy(plain, PROMPTS)  # left padding
    graphs = counters["stats"]["unique_graphs"]
    three = [*PROMPTS, long_prompt]
    assert greedy(float_model, three, steps=20) == greedy(plain, three, steps=20)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_step_matches_eager_int4() -> None:
    model = quantize(tiny_decoder(seed=1), "int4", group_size=32)
    compile_decode_step(model)
    eager, compiled_logits = step_logits(model, decode_step(model))
    # both sides run the same int4 kernel on bf16 activations; inductor fuses the float ops around it differently
    torch.testing.assert_close(compiled_logits, eager, atol=2e-2, rtol=2e-2)
    assert greedy(model, PROMPTS) == greedy(quantize(tiny_decoder(seed=1), "int4", group_size=32), PROMPTS)


@pytest.mark.skipif(not native.native_kernels_available(), reason="llmkit's GGUF kernels did not build here")
def test_compiled_step_traces_through_the_gguf_kernels() -> None:
    # Q4_0 on the 8-row kernel, q/k/v and gate/up fused (what load_decoder gives a Q4_0 GGUF): custom ops in the graph
    model = fuse_quantized_projections(quantize(tiny_decoder(seed=1), "q4_0"))
    compile_decode_step(model)
    eager, compiled_logits = step_logits(model, decode_step(model))
    torch.testing.assert_close(compiled_logits, eager, atol=1e-4, rtol=1e-4)  # the same kernel on float32 x
    reference = fuse_quantized_projections(quantize(tiny_decoder(seed=1), "q4_0"))
    assert greedy(model, PROMPTS) == greedy(reference, PROMPTS)


def test_eager_model_steps_itself() -> None:
    model = tiny_decoder()
    assert decode_step(model) is model


def test_without_a_cpp_compiler_compile_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(LlmkitError, match="C\\+\\+ compiler.*apt install g\\+\\+"):
        compile_decode_step(tiny_decoder())


def test_cli_compile_with_speculation_is_refused(capsys: pytest.CaptureFixture) -> None:
    code, err = cli_status(capsys, "generate", "--prompt", "hi", "--compile", "true", "--speculate", "ngram")
    assert code == 2 and "--compile" in err and "--speculate" in err
