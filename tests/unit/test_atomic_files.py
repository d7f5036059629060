"""Atomic, durable writes: the reader sees the old file or the new one, never a torn one,
and no temporary file is left behind, also when the write fails half-way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

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


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths fsynced from now on, in order."""
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    return paths


def test_write_with_hands_a_file_to_the_writer_and_fsyncs_file_and_folder(
    tmp_path: Path, synced: list[str]
) -> None:
    """For serialisers that want a file (np.savez, torch.save): same guarantees as bytes."""
    target = tmp_path / "sub" / "arrays.bin"
    atomic_files.write_with(target, lambda fh: fh.write(b"streamed"))
    assert target.read_bytes() == b"streamed"
    assert os.listdir(target.parent) == ["arrays.bin"]
    # the temporary file's data (before its rename), then the folder holding the new name
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(target.parent)


def test_write_with_a_writer_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "arrays.bin"

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_files.write_with(target, half_then_fail)
    assert os.listdir(tmp_path) == []  # no target, no temporary litter
    atomic_files.write_bytes(target, b"old")
    with pytest.raises(OSError, match="disk full"):
        atomic_files.write_with(target, half_then_fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["arrays.bin"]


def test_write_by_path_for_writers_that_take_a_name(tmp_path: Path, synced: list[str]) -> None:
    """torch.onnx.export writes a file name: it gets the temporary name, the target appears
    whole and fsynced, and a writer that fails leaves the old file and no temporary."""
    target = tmp_path / "model.onnx"
    seen: list[Path] = []

    def produce(path: Path) -> None:
        seen.append(path)
        path.write_bytes(b"network")

    atomic_files.write_by_path(target, produce)
    assert target.read_bytes() == b"network" and seen[0] != target
    assert synced == [str(seen[0]), str(tmp_path)]

    def half(path: Path) -> None:
        path.write_bytes(b"torn")
        raise RuntimeError("exporter died")

    with pytest.raises(RuntimeError):
        atomic_files.write_by_path(target, half)
    assert target.read_bytes() == b"network"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_copy_file_replaces_the_target_whole(tmp_path: Path) -> None:
    source = tmp_path / "export" / "c.onnx"
    source.parent.mkdir()
    source.write_bytes(os.urandom(3 << 20))  # more than one copy chunk
    target = tmp_path / "weights" / "c.onnx"
    atomic_files.copy_file(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert os.listdir(target.parent) == ["c.onnx"]
