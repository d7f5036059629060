"""Atomic, durable writes: the reader sees the old file or the new one, never a torn one,
and no temporary file is left behind, also when the write fails half-way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from screener import atomic_files


def test_write_replaces_creates_parents_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "results.bin"
    atomic_files.write_bytes(target, b"first")
    atomic_files.write_parts(target, [b"sec", memoryview(b"ond")])
    assert target.read_bytes() == b"second"
    atomic_files.write_text(target, "third")
    assert target.read_text() == "third"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "results.bin"
    atomic_files.write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_files.write_parts(target, [b"half of the new", 42])  # type: ignore[list-item]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["results.bin"]


def test_fsync_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    atomic_files.fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        atomic_files.fsync_dir(tmp_path / "f")
