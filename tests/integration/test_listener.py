"""The listener in-process against a real pynetdicom SCU: what it keeps and what it refuses."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from blake3 import blake3
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import _config
from sqlmodel import col, select

from screener.db.models import AuditLog, Instance, JobState, ScreeningJob, Study
from screener.db.session import get_engine, session_scope
from screener.dicom.association_answer import Rejection
from screener.dicom.dataset_buffers import spool_prefix
from screener.dicom.listener import ListenerHandle, log_startup, start_listener
from screener.ingest import content_digest
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity
from tests.listener_support import (
    EXPLICIT_VR_LE,
    RawSCU,
    encode_body,
    rejection,
    scu,
    small_instance,
    spool_files,
)


@pytest.fixture
def running(sqlite_settings: Settings) -> Iterator[tuple[Settings, ListenerHandle]]:
    sqlite_settings.listener.port = 0
    sqlite_settings.study_quiet_seconds = 0.5
    handle = start_listener(sqlite_settings, migrate=False)
    try:
        yield sqlite_settings, handle
    finally:
        handle.stop(drain_seconds=5)


def instances(settings: Settings) -> list[Instance]:
    with session_scope(settings.database_url) as s:
        return list(s.exec(select(Instance).order_by(col(Instance.id))).all())


def test_store_is_durable_and_recorded_then_study_completes(
    settings: Settings, tmp_path: Path
) -> None:
    """Both DB backends: spool file, DB rows, and a queued job after the quiet period."""
    settings.listener.port = 0
    settings.study_quiet_seconds = 0.3
    study = StudyIdentity.new()
    sent = [small_instance(study, seed=i, instance_number=i + 1) for i in range(3)]
    with start_listener(settings, migrate=False) as handle:
        with scu(handle.port, sent) as assoc:
            assert [assoc.send_c_store(ds).Status for ds in sent] == [0, 0, 0]
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with session_scope(settings.database_url) as s:
                if s.exec(select(ScreeningJob)).first():
                    break
            time.sleep(0.1)
    rows = instances(settings)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(ds.SOPInstanceUID for ds in sent)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sent}
    for row in rows:
        path = Path(row.file_path)
        assert path.is_relative_to(settings.spool_dir)
        assert row.size_bytes == path.stat().st_size and row.calling_ae_title == "TESTSCU"
        meta = pydicom.filereader.read_file_meta_info(path)
        assert meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        body = path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
        assert "blake3:" + blake3(body).hexdigest() == row.content_digest
        assert body == encode_body(by_uid[row.sop_instance_uid])[3]  # bit-exact
    with session_scope(settings.database_url) as s:
        study_row = s.exec(select(Study)).one()
        assert study_row.is_complete and study_row.instance_count == 3
        job = s.exec(select(ScreeningJob)).one()
        assert job.state == JobState.QUEUED.value


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1],
    ids=["explicit", "rle", "j2k", "jpegls", "jpeg-lossless"],
)
def test_compressed_syntaxes_are_kept_bit_exact(
    running: tuple[Settings, ListenerHandle], syntax: str
) -> None:
    settings, handle = running
    ds = small_instance(transfer_syntax=syntax, size=64, seed=3)  # type: ignore[arg-type]
    with scu(handle.port, [ds]) as assoc:
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
    [row] = instances(settings)
    stored = pydicom.dcmread(row.file_path)
    assert stored.file_meta.TransferSyntaxUID == syntax and row.transfer_syntax_uid == syntax
    assert stored.PixelData == ds.PixelData  # the bytes as sent, not re-encoded
    assert (stored.pixel_array == ds.pixel_array).all()
    sop_class, sop_instance, _, body = encode_body(ds)
    assert Path(row.file_path).read_bytes() == spool_prefix(sop_class, sop_instance, syntax) + body


@pytest.mark.parametrize("max_pdu", [16384, 0], ids=["many-pdus", "one-pdu"])
def test_large_instances_are_spooled_byte_for_byte(sqlite_settings: Settings, max_pdu: int) -> None:
    """Multi-megabyte data sets, several on one association (the pooled receive memory is
    reused), in many small PDUs or one large one: each spool file is exactly the preamble,
    the File Meta Information and the data set as sent."""
    settings = sqlite_settings
    settings.listener.port = 0
    settings.listener.max_pdu = max_pdu  # what the listener announces: the sender's PDU size
    study = StudyIdentity.new()
    sent = [small_instance(study, seed=s, size=1500, instance_number=s + 1) for s in range(3)]
    handle = start_listener(settings, migrate=False)
    try:
        with scu(handle.port, sent) as assoc:
            for ds in sent:
                assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        handle.stop(drain_seconds=5)
    rows = {row.sop_instance_uid: row for row in instances(settings)}
    assert len(rows) == 3
    for ds in sent:
        sop_class, sop_instance, syntax, body = encode_body(ds)
        assert len(body) > 2_000_000
        stored = Path(rows[sop_instance].file_path).read_bytes()
        assert stored == spool_prefix(sop_class, sop_instance, syntax) + body
        assert rows[sop_instance].content_digest == content_digest(body)


def test_duplicate_and_new_version_over_the_network(
    running: tuple[Settings, ListenerHandle],
) -> None:
    settings, handle = running
    ds = small_instance(seed=1)
    changed = small_instance(seed=2, sop_instance_uid=ds.SOPInstanceUID, study=None)
    changed.StudyInstanceUID = ds.StudyInstanceUID
    changed.SeriesInstanceUID = ds.SeriesInstanceUID
    with scu(handle.port, [ds]) as assoc:
        statuses = [assoc.send_c_store(x).Status for x in (ds, ds, changed, changed)]
    assert statuses == [0, 0, 0, 0]
    rows = instances(settings)
    assert [r.version for r in rows] == [1, 2]
    assert len(spool_files(settings.spool_dir)) == 2  # one file per distinct content


def test_resend_of_an_instance_received_before_blake3_is_a_duplicate(
    running: tuple[Settings, ListenerHandle],
) -> None:
    """An instance spooled and recorded under its SHA-256 (before migration 0005), re-sent
    unchanged: a duplicate; the recorded file is kept, no second copy stays in the spool."""
    settings, handle = running
    ds = small_instance(seed=1)
    with scu(handle.port, [ds]) as assoc:
        assert assoc.send_c_store(ds).Status == 0
    (row,) = instances(settings)
    body = encode_body(ds)[3]
    sha = hashlib.sha256(body).hexdigest()
    legacy = Path(row.file_path).with_name(f"{row.sop_instance_uid}.{sha[:16]}.dcm")
    Path(row.file_path).rename(legacy)  # as the listener named it before BLAKE3
    with session_scope(settings.database_url) as s:
        s.execute(
            sa.update(Instance)
            .where(col(Instance.id) == row.id)
            .values(content_digest=f"sha256:{sha}", file_path=str(legacy))
        )
    changed = small_instance(seed=2, sop_instance_uid=ds.SOPInstanceUID, study=None)
    changed.StudyInstanceUID = ds.StudyInstanceUID
    changed.SeriesInstanceUID = ds.SeriesInstanceUID
    with scu(handle.port, [ds]) as assoc:
        assert assoc.send_c_store(ds).Status == 0
        assert [r.version for r in instances(settings)] == [1]
        assert spool_files(settings.spool_dir) == [legacy]
        assert assoc.send_c_store(changed).Status == 0
    rows = instances(settings)
    assert [r.version for r in rows] == [1, 2]
    assert rows[1].content_digest == "blake3:" + blake3(encode_body(changed)[3]).hexdigest()
    with session_scope(settings.database_url) as s:
        audit = s.exec(select(AuditLog).where(AuditLog.action == "instance.new_version")).one()
    assert audit.detail is not None
    assert audit.detail["previous_content_digest"] == f"sha256:{sha}"
    assert audit.detail["content_digest"] == rows[1].content_digest
    assert len(spool_files(settings.spool_dir)) == 2


def test_rejected_calling_ae_is_logged_with_source(
    sqlite_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    sqlite_settings.listener.port = 0
    sqlite_settings.listener.allowed_calling_ae_titles = ["MODALITY1"]
    with start_listener(sqlite_settings, migrate=False) as handle:
        with caplog.at_level(logging.WARNING, logger="screener.dicom.listener"):
            # rejected-permanent by the service user: calling AE title not recognised
            assert rejection(handle.port, calling_aet="INTRUDER") == Rejection(1, 1, 3)
            with scu(handle.port, calling_aet="MODALITY1") as assoc:
                assert assoc.is_established
                assert assoc.send_c_echo().Status == 0
        echo_cmd = [str(Path(sys.executable).parent / "screener"), "echo", "127.0.0.1"]
        refused = subprocess.run(
            [*echo_cmd, str(handle.port), "--aet", "SCREENER", "--calling-aet", "INTRUDER"],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2
        assert refused.stdout.endswith(": calling AE title not recognised\n"), refused.stdout
    text = caplog.text
    assert "INTRUDER" in text and "calling AE title not recognised" in text
    assert "127.0.0.1:" in text
    with session_scope(sqlite_settings.database_url) as s:
        entries = s.exec(select(AuditLog).where(AuditLog.action == "association.rejected")).all()
        assert len(entries) == 2  # the raw SCU and `screener echo`
        assert all(e.detail and e.detail["calling_ae_title"] == "INTRUDER" for e in entries)


def _send_raw_file(port: int, path: Path, sop_class: str, syntax: str) -> int:
    """Send a file's bytes as they are (no decode/re-encode): how a broken peer behaves."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with scu(port, contexts=[(sop_class, syntax)]) as assoc:
            status = assoc.send_c_store(path)
            return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _valid_file(tmp_path: Path) -> tuple[Path, bytes]:
    ds = small_instance(seed=5)
    path = tmp_path / "valid.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, path.read_bytes()


def test_malformed_datasets_fail_and_listener_keeps_serving(
    running: tuple[Settings, ListenerHandle], tmp_path: Path
) -> None:
    settings, handle = running
    path, data = _valid_file(tmp_path)
    cr, evle = "1.2.840.10008.5.1.4.1.1.1", str(ExplicitVRLittleEndian)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-100])
    bad_vr = tmp_path / "badvr.dcm"
    pn_tag = b"\x10\x00\x10\x00PN"  # (0010,0010) PatientName, explicit VR
    assert data.count(pn_tag) == 1
    bad_vr.write_bytes(data.replace(pn_tag, b"\x10\x00\x10\x00\x01\x02"))
    assert _send_raw_file(handle.port, truncated, cr, evle) == 0xC210
    assert _send_raw_file(handle.port, bad_vr, cr, evle) == 0xC210
    assert instances(settings) == [] and spool_files(settings.spool_dir) == []
    assert _send_raw_file(handle.port, path, cr, evle) == 0x0000  # still serving
    assert len(instances(settings)) == 1
    with session_scope(settings.database_url) as s:
        actions = s.exec(select(AuditLog.action)).all()
    assert actions.count("instance.malformed") == 2


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_non_uid_values_never_reach_the_filesystem(
    running: tuple[Settings, ListenerHandle], tmp_path: Path, keyword: str
) -> None:
    settings, handle = running
    ds = small_instance(seed=6)
    hostile = "../../etc" if keyword == "SOPInstanceUID" else "../../../../tmp/owned"
    setattr(ds, keyword, hostile)
    if keyword == "SOPInstanceUID":
        setattr(ds.file_meta, "MediaStorageSOPInstanceUID", hostile)  # noqa: B010
    path = tmp_path / "hostile.dcm"
    ds.save_as(path, enforce_file_format=True)
    status = _send_raw_file(handle.port, path, str(ds.SOPClassUID), str(ExplicitVRLittleEndian))
    assert status == 0xC211
    assert instances(settings) == [] and spool_files(settings.spool_dir) == []
    assert not Path("/tmp/owned").exists()
    assert not any(settings.data_dir.parent.rglob("etc*"))


def test_full_disk_answers_out_of_resources(sqlite_settings: Settings) -> None:
    sqlite_settings.listener.port = 0
    sqlite_settings.listener.max_spool_fill = 0.0001  # any real filesystem is fuller
    ds = small_instance()
    with start_listener(sqlite_settings, migrate=False) as handle, scu(handle.port, [ds]) as a:
        assert a.send_c_store(ds).Status == 0xA700
    assert instances(sqlite_settings) == []


def test_disk_failure_answers_out_of_resources_then_recovers(
    running: tuple[Settings, ListenerHandle],
) -> None:
    settings, handle = running
    ds = small_instance()
    spool = settings.spool_dir
    spool.rmdir()
    spool.write_bytes(b"not a directory")  # every write under it fails with an OSError
    with scu(handle.port, [ds]) as assoc:
        assert assoc.send_c_store(ds).Status == 0xA701
        assert instances(settings) == []
        spool.unlink()
        spool.mkdir()
        assert assoc.send_c_store(ds).Status == 0x0000  # the PACS retry succeeds
    assert len(instances(settings)) == 1


def test_database_failure_answers_out_of_resources(
    running: tuple[Settings, ListenerHandle],
) -> None:
    settings, handle = running
    ds = small_instance()
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(sa.text("ALTER TABLE instances RENAME TO instances_gone"))
    try:
        with scu(handle.port, [ds]) as assoc:
            assert assoc.send_c_store(ds).Status == 0xA702
    finally:
        with get_engine(settings.database_url).begin() as conn:
            conn.execute(sa.text("ALTER TABLE instances_gone RENAME TO instances"))
    assert instances(settings) == []
    with scu(handle.port, [ds]) as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000  # resend after recovery: stored once
    assert len(instances(settings)) == 1 and len(spool_files(settings.spool_dir)) == 1


def test_startup_log_lines(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql+psycopg://screener:s3cret@127.0.0.1:5432/prod",
    )
    with caplog.at_level(logging.INFO, logger="screener.dicom.listener"):
        log_startup(settings, 11112)
    text = caplog.text
    assert "AE title SCREENER" in text and "11112" in text
    assert "ANY calling AE title is accepted" in text and "TLS off" in text
    assert str(settings.data_dir) in text
    assert "s3cret" not in text and "screener:***@127.0.0.1" in text


def test_echo_command_exit_codes(running: tuple[Settings, ListenerHandle]) -> None:
    _, handle = running
    cmd = [str(Path(sys.executable).parent / "screener"), "echo", "127.0.0.1"]
    ok = subprocess.run([*cmd, str(handle.port), "--aet", "SCREENER"], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    from tests.dcmtk import free_port

    closed = subprocess.run(
        [*cmd, str(free_port()), "--aet", "SCREENER", "--timeout", "3"], capture_output=True
    )
    assert closed.returncode == 2


def test_lean_receive_path_splits_pdus_like_pynetdicom() -> None:
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    from screener.dicom.fast_receive import split_pdv_items, supported

    assert supported(), "fast_receive is off for this pynetdicom version: re-check it"
    primitive = P_DATA()
    pdvs: Any = [[1, b"\x03command"], [3, b"\x02" + b"x" * 1000]]  # pynetdicom wants lists
    primitive.presentation_data_value_list = pdvs
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    encoded = pdu.encode()
    items = split_pdv_items(bytearray(encoded[6:]))
    assert [(cid, bytes(data)) for cid, data in items] == [
        (cid, bytes(data)) for cid, data in pdu.to_primitive().presentation_data_value_list
    ]
    with pytest.raises(ValueError):
        split_pdv_items(bytearray(encoded[6:-10]))  # truncated item


@pytest.mark.parametrize("packing", ["item-per-pdu", "pairs", "command-with-data", "empty-items"])
def test_any_pdv_packing_is_spooled_byte_for_byte(
    running: tuple[Settings, ListenerHandle], packing: str
) -> None:
    """Data set PDUs are read straight into the data set when they are one data set item of
    the message's context; any other layout a sender may choose (several items per PDU, the
    command with data, empty fragments) takes the whole-PDU path: each file is still exactly
    what was sent, also for the next message on the association."""
    settings, handle = running
    study = StudyIdentity.new()
    sent = [small_instance(study, seed=s, size=300, instance_number=s + 1) for s in range(2)]
    bodies = [encode_body(ds) for ds in sent]
    scu_ = RawSCU(handle.port, [(bodies[0][0], [EXPLICIT_VR_LE])])
    try:
        for sop_class, sop_instance, syntax, body in bodies:
            assert len(body) > 5 * 16384
            status = scu_.store(
                sop_class, sop_instance, syntax, body, fragment=16384, packing=packing
            )
            assert status == 0x0000
    finally:
        scu_.release()
    rows = {row.sop_instance_uid: row for row in instances(settings)}
    assert len(rows) == 2
    for sop_class, sop_instance, syntax, body in bodies:
        stored = Path(rows[sop_instance].file_path).read_bytes()
        assert stored == spool_prefix(sop_class, sop_instance, syntax) + body
        assert rows[sop_instance].content_digest == content_digest(body)
