"""Atomic writes: complete files only, usual permissions, nothing left behind on failure."""

from __future__ import annotations

import os

import pytest

from llmkit.io import atomic_write, atomic_write_text


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
