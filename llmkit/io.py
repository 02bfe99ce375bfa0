"""Atomic file writes: write to a temporary file beside the target, then rename over it.

The temporary file is named `.NAME.llmkit-tmp-PID-RANDOM`, so it is recognisably llmkit's and names the process
that writes it. A process killed mid-write (Ctrl-C during a 538 MB `convert`, an out-of-memory kill) leaves its
temporary behind; the next atomic write into that directory removes such leftovers whose process is gone. Files of
other programs, and temporaries of llmkit processes still running, are never touched."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmkit.errors import LlmkitError

TEMP_MARK = ".llmkit-tmp-"  # .NAME.llmkit-tmp-PID-RANDOM
_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-[A-Za-z0-9_]+$")
_swept: set[Path] = set()  # directories this process already cleaned (a stale file cannot appear there later)


def temp_prefix(path: Path) -> str:
    """The start of an atomic write's temporary name for `path`: `.NAME.llmkit-tmp-PID-` (mkstemp adds RANDOM)."""
    return f".{Path(path).name}{TEMP_MARK}{os.getpid()}-"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and rename the result to `path`, so readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix="", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete llmkit temporaries in `directory` whose writing process no longer runs; return what was removed.
    Only names of the form `.NAME.llmkit-tmp-PID-RANDOM` are considered; each directory is swept once a process."""
    directory = Path(directory)
    key = directory.resolve()
    if key in _swept:
        return []
    _swept.add(key)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False) or _process_alive(int(match.group(1))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:  # removed meanwhile, or not ours to remove: leave it
            continue
        removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json_object(path: Path) -> dict:
    """The JSON object stored in `path`; a readable error names the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmkitError(f"{path} does not exist; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LlmkitError(f"{path} is not valid JSON ({error}): fix it, or re-download or re-export the model") from None
    if not isinstance(data, dict):
        raise LlmkitError(f"{path} should hold a JSON object, not a {type(data).__name__}: fix it, or re-download or "
                          "re-export the model")
    return data
