"""Spool files written and read past the page cache (``screener.direct_io``).

On this machine's filesystems (ext4, tmpfs) ``O_DIRECT`` works, so the direct path runs for
real; a filesystem that refuses it is simulated by making ``open`` answer ``EINVAL`` for
``O_DIRECT``, as such a filesystem does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pydicom
import pytest

from screener import direct_io
from screener.dicom import spool
from screener.direct_io import ViewReader
from screener.screening.prepare import prepare_instance
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity, make_instance

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")

SIZES = [
    0,
    1,
    direct_io.ALIGN - 1,
    direct_io.ALIGN,
    direct_io.ALIGN + 1,
    direct_io.STAGING_BYTES - 1,
    direct_io.STAGING_BYTES,
    direct_io.STAGING_BYTES + 5,
    2 * direct_io.STAGING_BYTES + 4097,
]


@pytest.fixture(autouse=True)
def _forget_refusals() -> Iterator[None]:
    yield
    direct_io._refused_devices.clear()


def _chunks(data: bytes) -> tuple[bytes | memoryview, ...]:
    """Three chunks whose boundaries fall anywhere against the staging buffer's."""
    first = min(7, len(data))
    middle = max(first, len(data) // 2)
    return data[:first], memoryview(data)[first:middle], data[middle:]


@pytest.mark.parametrize("size", SIZES)
def test_written_and_read_back_exactly(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    written = direct_io.write_new_file(path, _chunks(data))
    if written is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    assert written == size
    assert path.stat().st_size == size  # the last block's padding is truncated away
    assert path.read_bytes() == data
    view = direct_io.read_file(path)
    assert view is not None and bytes(view) == data


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        direct_io.write_new_file(path, [b"second"])
    assert path.read_bytes() == b"first"


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield os.urandom(direct_io.STAGING_BYTES + 10)  # one block already on disk
        raise RuntimeError("the sender went away")

    path = tmp_path / "f"
    with pytest.raises(RuntimeError):
        direct_io.write_new_file(path, chunks())
    assert not path.exists()


def test_a_refusing_filesystem_falls_back_to_the_page_cache(
    tmp_path: Path, refuse_o_direct: Callable[[], None]
) -> None:
    refuse_o_direct()
    data = os.urandom(3 * direct_io.ALIGN + 17)
    assert direct_io.write_new_file(tmp_path / "a", [data]) is None
    assert not (tmp_path / "a").exists()
    assert tmp_path.stat().st_dev in direct_io._refused_devices  # asked once per filesystem
    # the spool still writes the file, through the page cache, and it reads back
    target = tmp_path / "b.dcm"
    assert spool.write_atomic(target, _chunks(data), direct=True) == len(data)
    assert target.read_bytes() == data
    assert direct_io.read_file(target) is None


def test_a_filesystem_refusing_the_first_direct_write_falls_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing_write(fd: int, data: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "write", refusing_write)
    assert direct_io.write_new_file(tmp_path / "a", [b"x" * 5000]) is None
    assert not (tmp_path / "a").exists()
    assert tmp_path.stat().st_dev in direct_io._refused_devices


def test_staging_memory_is_bounded(tmp_path: Path) -> None:
    taken = []
    try:
        while (buffer := direct_io._take_staging()) is not None:
            taken.append(buffer)
        assert len(taken) <= direct_io.POOL_SIZE
        # every buffer busy: the writer is told to use the page cache, and nothing is created
        assert direct_io.write_new_file(tmp_path / "f", [b"x"]) is None
        assert not (tmp_path / "f").exists()
    finally:
        for buffer in taken:
            direct_io._pool.put(buffer)
    assert direct_io.write_new_file(tmp_path / "f", [b"x"]) == 1


def test_spool_store_writes_the_same_bytes_either_way(tmp_path: Path) -> None:
    data = os.urandom(direct_io.STAGING_BYTES + 1234)
    paths = []
    for direct in (True, False):
        digest: Future[str] = Future()
        digest.set_result(f"blake3:{'ab' * 32}")
        root = tmp_path / str(direct)
        root.mkdir()
        path, size, _ = spool.store_while_hashing(
            root, "1.2.3", "1.2.3.4", "1.2.3.4.5", _chunks(data), digest, direct=direct
        )
        assert size == len(data)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes() == data
    assert not list(tmp_path.rglob(f"{spool.TEMP_PREFIX}*"))


def test_view_reader_reads_like_a_file() -> None:
    reader = ViewReader(memoryview(b"0123456789"))
    assert reader.read(3) == b"012" and reader.tell() == 3
    assert reader.seek(-2, os.SEEK_END) == 8 and reader.read(5) == b"89"
    assert reader.read(1) == b""  # at the end, as a file
    assert reader.seek(1, os.SEEK_SET) == 1 and reader.seek(2, os.SEEK_CUR) == 3
    assert reader.read() == b"3456789"
    with pytest.raises(ValueError):
        reader.seek(-1)


def test_prepare_reads_the_same_film_either_way(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ds = make_instance(
        rng.integers(0, 4096, size=(600, 500), dtype=np.uint16), study=StudyIdentity.new()
    )
    path = tmp_path / "film.dcm"
    ds.save_as(path, enforce_file_format=True)
    view = direct_io.read_file(path)
    if view is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    assert pydicom.dcmread(ViewReader(view)).SOPInstanceUID == ds.SOPInstanceUID
    on = prepare_instance(path, Settings(listener={"direct_io": True}))
    off = prepare_instance(path, Settings(listener={"direct_io": False}))
    assert on.skip_reason is None and off.skip_reason is None
    assert on.source == off.source and on.meta == off.meta
    for a, b in [
        (on.network_input, off.network_input),
        (on.display_image, off.display_image),
        (on.work_image, off.work_image),
    ]:
        assert a is not None and b is not None
        np.testing.assert_array_equal(a, b)


def test_prepare_never_reads_the_pixels_of_a_refused_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[Path] = []
    real_read = direct_io.read_file

    def counting_read(path: Path) -> memoryview | None:
        read.append(path)
        return real_read(path)

    monkeypatch.setattr(direct_io, "read_file", counting_read)
    settings = Settings(listener={"direct_io": True})
    for modality, refused in (("CT", True), ("CR", False)):
        ds = make_instance(np.zeros((300, 300), dtype=np.uint16), study=StudyIdentity.new())
        ds.Modality = modality  # a CT slice that came with the study: refused by its header
        path = tmp_path / f"{modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        prepared = prepare_instance(path, settings)
        assert prepared.refused is refused
        assert (path in read) is not refused  # the header decided; the film was read once


def test_a_forked_child_reading_files_never_changes_what_the_parent_read(tmp_path: Path) -> None:
    """Workers fork: a read buffer shared with the child would be overwritten under the
    parent's view (an anonymous mmap is shared by default)."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"A" * 10_000)
    second.write_bytes(b"B" * 10_000)
    view = direct_io.read_file(first)
    if view is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    pid = os.fork()
    if pid == 0:  # the child reads another file into its (inherited) buffer, then leaves
        child_view = direct_io.read_file(second)
        os._exit(0 if child_view is not None and bytes(child_view) == b"B" * 10_000 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(view) == b"A" * 10_000
