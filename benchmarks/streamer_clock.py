"""A transformers streamer that only notes when the first new token arrives, so a benchmark can time decoding apart
from the prompt's prefill: `model.generate(..., streamer=clock)`, then decode time = end - clock.first. Shared by
the benchmarks that run transformers side by side (multi_lora.py, speculative.py); run them from this folder's
parent as `python benchmarks/NAME.py`, which puts this folder on the import path."""

from __future__ import annotations

import time

import torch


class FirstTokenClock:
    """Its first `put` is the prompt, the second the first new token: `first` is that moment (perf_counter)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass
