"""llmkit.memory: the peak resident set follows what the process touches, and restarts on reset (Linux /proc,
where CI runs). Measured in a fresh interpreter: in the test process, memory freed by earlier tests may still be
resident and serve a new block without the resident set growing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmkit.errors import LlmkitError
from llmkit.memory import proc_status_kib

PROBE = """
import json, torch
from llmkit.memory import peak_rss_mb, proc_status_kib, reset_peak_rss
figures = {"reset": reset_peak_rss(), "before": peak_rss_mb()}
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
figures.update(grown=peak_rss_mb(), rss=proc_status_kib("VmRSS") / 1024)
del block  # above glibc's largest mmap threshold (32 MiB): freeing it unmaps it
figures.update(reset_again=reset_peak_rss(), after=peak_rss_mb())
print(json.dumps(figures))
"""


def test_peak_rises_with_touched_memory_and_restarts_after_a_reset():
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    figures = json.loads(output.splitlines()[-1])
    assert figures["reset"] and figures["reset_again"]
    assert figures["grown"] >= figures["before"] + 60  # MiB: the block's pages became resident
    assert figures["rss"] <= figures["grown"] + 1
    assert figures["after"] < figures["grown"] - 60  # after the reset, the freed block no longer counts


def test_an_unknown_status_field_is_named():
    with pytest.raises(LlmkitError, match="/proc/self/status has no VmNothing line"):
        proc_status_kib("VmNothing")
