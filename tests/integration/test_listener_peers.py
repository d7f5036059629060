"""The listener with real peers: dcmtk storescu, Orthanc, and a listener killed mid-transfer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from blake3 import blake3
from pydicom.uid import JPEGLSLossless, RLELossless
from sqlmodel import select

from screener.db.models import Instance, ScreeningJob, Study
from screener.db.session import session_scope
from screener.dicom.listener import start_listener
from screener.settings import Settings
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_instance,
    pick_images,
    write_datasets,
)
from tests.dcmtk import dcmtk_available, free_port, storescu_parallel, wait_for_port
from tests.listener_support import scu, small_instance
from tests.orthanc import OrthancServer, orthanc_available

SCREENER = str(Path(sys.executable).parent / "screener")


def _rows(settings: Settings) -> list[Instance]:
    with session_scope(settings.database_url) as s:
        return list(s.exec(select(Instance)).all())


def _wait(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not dcmtk_available(), reason="dcmtk storescu not installed")
def test_storescu_200_instances_over_4_associations(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    """Two listener processes share the port; 4 storescu associations: none lost, none twice."""
    s = sqlite_settings
    s.listener.port = 0
    s.listener.processes = 2
    s.study_quiet_seconds = 1
    studies = [StudyIdentity.new() for _ in range(10)]
    datasets = [
        small_instance(studies[i % 10], seed=i, size=16, instance_number=i + 1) for i in range(200)
    ]
    files = write_datasets(datasets, tmp_path / "send")
    with start_listener(s, migrate=False) as handle:
        results = storescu_parallel(handle.port, files, associations=4)
        for res in results:
            assert res.returncode == 0, res.stderr[-2000:]
        assert _wait(lambda: _count_jobs(s) == 10, 20)
    rows = _rows(s)
    counts = Counter(r.sop_instance_uid for r in rows)
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in datasets}  # zero lost
    assert max(counts.values()) == 1  # zero duplicated
    assert len(list(s.spool_dir.rglob("*.dcm"))) == 200
    assert {r.calling_ae_title for r in rows} == {"STORESCU"}
    with session_scope(s.database_url) as session:
        assert sum(st.instance_count for st in session.exec(select(Study)).all()) == 200


def _count_jobs(settings: Settings) -> int:
    with session_scope(settings.database_url) as s:
        return len(s.exec(select(ScreeningJob)).all())


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_orthanc_pushes_a_study_to_the_listener(
    sqlite_settings: Settings, tmp_path: Path, cxr_dir: Path
) -> None:
    s = sqlite_settings
    s.listener.port = 0
    s.study_quiet_seconds = 1
    rows = pick_images(cxr_dir, 2)
    study = StudyIdentity.new()
    datasets = [
        make_instance(
            corpus_image(cxr_dir, row["id"]),
            study=study,
            view_position=view,
            series_number=n,
            transfer_syntax=syntax,
            target_size=(256, 256),
        )
        for n, (row, view, syntax) in enumerate(
            zip(rows, ["PA", "LATERAL"], [JPEGLSLossless, RLELossless], strict=True), start=1
        )
    ]
    paths = write_datasets(datasets, tmp_path / "upload")
    with start_listener(s, migrate=False) as handle:
        modalities = {"SCREENER": ("SCREENER", "127.0.0.1", handle.port)}
        with OrthancServer(tmp_path, modalities=modalities) as pacs:
            ids = [pacs.upload(p) for p in paths]
            pacs.send_to_modality("SCREENER", ids)
            from_pacs = [pydicom.dcmread(BytesIO(pacs.instance_file(i))) for i in ids]
            originals = {str(ds.SOPInstanceUID): ds for ds in from_pacs}
        assert _wait(lambda: _count_jobs(s) == 1, 15), "study did not complete"
    stored = _rows(s)
    assert {r.sop_instance_uid for r in stored} == set(originals)
    for row in stored:
        assert row.calling_ae_title == "ORTHANC"
        got = pydicom.dcmread(row.file_path)
        want = originals[row.sop_instance_uid]
        assert got.PixelData == want.PixelData  # identical pixel data in the spool
        assert np.array_equal(got.pixel_array, want.pixel_array)
    with session_scope(s.database_url) as session:
        st = session.exec(select(Study)).one()
        assert st.is_complete and st.instance_count == 2


# --------------------------------------------------------------- listener as a process
def _listen_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    env.update(
        SCREENER_DATA_DIR=str(tmp_path / "data"),
        SCREENER_LISTENER__PORT=str(port),
        SCREENER_STUDY_QUIET_SECONDS="1",
    )
    return env


def _spawn_listener(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    log = (tmp_path / "listener.log").open("ab")
    proc = subprocess.Popen(
        [SCREENER, "listen"], env=_listen_env(tmp_path, port), stdout=log, stderr=log
    )
    wait_for_port(port, timeout=30)
    return proc


@pytest.fixture
def listener_process(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    yield port, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_mid_transfer_loses_nothing_acknowledged(
    tmp_path: Path, listener_process: tuple[int, list[subprocess.Popen[bytes]]]
) -> None:
    port, procs = listener_process
    procs.append(_spawn_listener(tmp_path, port))
    study = StudyIdentity.new()
    # ~2 MB each, so the kill lands inside a data set more often than between two
    datasets = [
        small_instance(study, seed=i, size=1024, instance_number=i + 1, bits_stored=16)
        for i in range(24)
    ]
    acknowledged: list[str] = []
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120  # never outlives a failed test
        while len(acknowledged) < 6:
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        killed.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    # the kill ends the association at once (the kernel closes the socket): the timeout only
    # bounds one store by a freshly started listener on a loaded machine (3 s was tight)
    with scu(port, datasets, timeout=20) as assoc:
        for ds in datasets:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                acknowledged.append(str(ds.SOPInstanceUID))
    t.join(timeout=30)
    assert killed.is_set() and procs[0].wait(timeout=10) == -signal.SIGKILL
    assert 6 <= len(acknowledged) < len(datasets)

    procs.append(_spawn_listener(tmp_path, port))
    settings = Settings(data_dir=tmp_path / "data")
    rows = {r.sop_instance_uid: r for r in _rows(settings)}
    for uid in acknowledged:  # every Success is in the DB and intact in the spool
        row = rows[uid]
        data = Path(row.file_path).read_bytes()
        assert len(data) == row.size_bytes
        meta = pydicom.filereader.read_file_meta_info(row.file_path)
        body = data[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
        assert "blake3:" + blake3(body).hexdigest() == row.content_digest
    assert not list((tmp_path / "data" / "spool").rglob(".incoming-*"))  # crash debris gone

    rest = [ds for ds in datasets if str(ds.SOPInstanceUID) not in acknowledged]
    with scu(port, rest) as assoc:
        assert [assoc.send_c_store(ds).Status for ds in rest] == [0] * len(rest)
    counts = Counter(r.sop_instance_uid for r in _rows(settings))
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in datasets}
    assert set(counts.values()) == {1}  # stored once, including any unacknowledged-but-kept
    assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == len(datasets)


def test_sigterm_finishes_open_association_then_exits(
    tmp_path: Path, listener_process: tuple[int, list[subprocess.Popen[bytes]]]
) -> None:
    port, procs = listener_process
    procs.append(_spawn_listener(tmp_path, port))
    study = StudyIdentity.new()
    first, second = (small_instance(study, seed=i) for i in range(2))
    with scu(port, [first, second]) as assoc:
        assert assoc.send_c_store(first).Status == 0
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert procs[0].poll() is None  # still draining the open association
        assert assoc.send_c_store(second).Status == 0
    assert procs[0].wait(timeout=20) == 0
    log = (tmp_path / "listener.log").read_text()
    assert "finishing open associations" in log and "listener stopped" in log
    assert "ANY calling AE title is accepted" in log
    settings = Settings(data_dir=tmp_path / "data")
    assert len(_rows(settings)) == 2
