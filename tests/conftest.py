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
