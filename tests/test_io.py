"""Atomic writes: complete files only, usual permissions, nothing left behind on failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmkit.io import TEMP_MARK, atomic_write, atomic_write_text


def test_written_file_has_the_permissions_of_a_normal_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    (tmp_path / "b.txt").write_text("hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")

    def broken(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.txt", broken)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["a.txt"]


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_temporary_names_the_writing_process(tmp_path):
    seen = []
    atomic_write(tmp_path / "model.safetensors", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    assert seen[0].startswith(f".model.safetensors{TEMP_MARK}{os.getpid()}-")


def test_a_stale_temporary_of_a_dead_llmkit_process_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".model.safetensors{TEMP_MARK}{dead_pid()}-abc123_x"
    stale.write_bytes(b"half of a killed convert")
    running = tmp_path / f".model.safetensors{TEMP_MARK}{os.getpid()}-zzz999"  # a write in progress: ours, alive
    running.write_bytes(b"in progress")
    others = [tmp_path / ".model.safetensors.tmp", tmp_path / ".x.llmkit-tmp-notapid-abc", tmp_path / "keep.txt"]
    for path in others:
        path.write_text("another program's file")
    atomic_write_text(tmp_path / "config.json", "{}")
    assert not stale.exists()
    assert running.exists() and all(path.exists() for path in others)
    assert (tmp_path / "config.json").read_text() == "{}"
