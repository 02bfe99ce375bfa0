"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (a scheduler's or torchrun's stop) ask the loop to
finish its step, save a checkpoint and end with `TrainingInterrupted`, whose exit status is the one a shell gives a
process that signal ended. The one training loop (llmkit/train/loop.py) and PPO's rollout loop both use them."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from llmkit.train.distributed import Cluster


class StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's or torchrun's stop) ask the loop to stop after the
    current step and save a checkpoint, instead of killing the process mid-step with nothing saved.

    A second Ctrl-C more than REPEAT_SECONDS after the first quits at once (KeyboardInterrupt, nothing saved). A
    repeat sooner is the same request: torchrun forwards the terminal's Ctrl-C to workers that got it already.
    Handlers are installed only in the main thread (Python allows no other) and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 1.0

    def __init__(self) -> None:
        self.requested: int | None = None  # the first signal's number
        self.at = 0.0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def handle(self, number: int, frame: object) -> None:
        """A signal handler: remember the first request; a late second Ctrl-C quits now."""
        now = time.monotonic()
        if self.requested is None:
            self.requested, self.at = number, now
        elif number == signal.SIGINT and self.requested == signal.SIGINT and now - self.at > self.REPEAT_SECONDS:
            self.__exit__()
            raise KeyboardInterrupt


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; `exit_status` is 128 + the signal's number
    (130 for Ctrl-C, 143 for SIGTERM), the status a shell gives a process that signal ended."""

    def __init__(self, message: str, signal_number: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.exit_status = 128 + signal_number
        self.checkpoint = checkpoint


def interrupted(signal_number: int, step: int, checkpoint: Path, cluster: Cluster) -> TrainingInterrupted:
    """The exception that ends an interrupted run; the main process prints where the checkpoint is and how to go on."""
    name = signal.Signals(signal_number).name
    message = (f"{name}: stopped after step {step} and saved it to {checkpoint}; to continue, rerun the same command; "
               f"it resumes from {checkpoint}")
    if cluster.is_main:
        print(message, file=sys.stderr, flush=True)
    return TrainingInterrupted(message, signal_number, checkpoint)
