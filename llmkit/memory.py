"""This process's resident memory, read from Linux's /proc: the current and peak resident set, and a reset of
the peak, so a measurement can count only what one piece of work holds (the planner, benchmarks, shoot-outs)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from llmkit.errors import LlmkitError

PROC_STATUS = "/proc/self/status"
PROC_CLEAR_REFS = "/proc/self/clear_refs"
RESET_PEAK_RSS = "5"  # writing this to clear_refs resets VmHWM to the current RSS (Linux 4.0+)


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...), in KiB."""
    with open(PROC_STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LlmkitError(f"{PROC_STATUS} has no {field} line; this kernel does not report peak memory")


def peak_rss_mb() -> float:
    """Peak resident memory in MiB: VmHWM (fresh at exec, and resettable) where /proc exists, else ru_maxrss
    (which a spawned child inherits from its parent)."""
    if Path(PROC_STATUS).is_file():
        return proc_status_kib("VmHWM") / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Restart the peak at the current resident set (Linux); False where that is not possible, so the peak
    still counts everything since the process started."""
    try:
        with open(PROC_CLEAR_REFS, "w") as handle:
            handle.write(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def release_freed_memory() -> bool:
    """Hand the heap pages freed so far back to the OS (glibc's malloc_trim); False where that is not available.
    Parsing a GGUF header creates about a million short-lived objects (the vocabulary's strings and arrays) between
    the long-lived weights, and without a trim their freed pages would stay in the process's resident set."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return False
    return bool(trim is not None and trim(0) >= 0)
