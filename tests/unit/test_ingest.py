"""Ingest on SQLite and PostgreSQL: studies/series rows, duplicates, versions, own output."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import replace

from sqlmodel import select

from screener.db.models import AuditLog, Instance, OutputObject, ScreeningJob, Series, Study
from screener.db.session import session_scope
from screener.dicom.dataset_check import InstanceHeader
from screener.identity import PRODUCT_NAME
from screener.ingest import IngestOutcome, ReceivedFile, content_digest, record_instance, warm_up
from screener.settings import Settings

STUDY = "1.2.826.0.1.3680043.10.1"


def header(sop: str, series: str = f"{STUDY}.1", **kw: object) -> InstanceHeader:
    base = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        sop_instance_uid=sop,
        study_instance_uid=STUDY,
        series_instance_uid=series,
        modality="CR",
        view_position="PA",
        image_laterality=None,
        body_part_examined="CHEST",
        photometric_interpretation="MONOCHROME2",
        patient_id="PID1",
        accession_number="ACC1",
        study_date="20260101",
        series_description="CHEST PA",
        manufacturer_model_name="CXR-Sim 1",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def received(
    digest: str, path: str = "/spool/x.dcm", rehash: Callable[[str], str] | None = None
) -> ReceivedFile:
    """``digest``: one hex character (repeated), a bare hex digest or ``algorithm:hex``."""
    if len(digest) == 1:
        digest *= 64
    return ReceivedFile(
        file_path=path,
        size_bytes=100,
        content_digest=digest if ":" in digest else f"blake3:{digest}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae_title="MODALITY",
        source_address="127.0.0.1:40000",
        rehash=rehash,
    )


calls: list[str] = []  # the algorithms the last as_received's rehash was asked for


def as_received(data: bytes, path: str = "/spool/x.dcm") -> ReceivedFile:
    """What the listener hands over for ``data``: its BLAKE3 digest, and a rehash of it."""
    calls.clear()

    def rehash(algorithm: str) -> str:
        calls.append(algorithm)
        return content_digest(data, algorithm)

    return received(content_digest(data), path, rehash)


def test_first_instance_creates_study_series_instance(settings: Settings) -> None:
    result = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    assert result.outcome is IngestOutcome.STORED and result.version == 1
    with session_scope(settings.database_url) as s:
        study = s.exec(select(Study)).one()
        assert study.study_instance_uid == STUDY and study.instance_count == 1
        assert not study.is_complete and not study.own_output_only
        series = s.exec(select(Series)).one()
        assert series.modality == "CR" and series.study_id == study.id
        inst = s.exec(select(Instance)).one()
        assert (inst.calling_ae_title, inst.source_address) == ("MODALITY", "127.0.0.1:40000")
        assert inst.view_position == "PA" and inst.content_digest == "blake3:" + "a" * 64


def test_warm_up_reads_and_writes_nothing(settings: Settings) -> None:
    record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    with session_scope(settings.database_url) as s:
        before = [(r.id, r.instance_count, r.last_received_at) for r in s.exec(select(Study))]
        audits = len(s.exec(select(AuditLog)).all())
    warm_up(settings.database_url)
    with session_scope(settings.database_url) as s:
        after = [(r.id, r.instance_count, r.last_received_at) for r in s.exec(select(Study))]
        assert after == before and len(s.exec(select(AuditLog)).all()) == audits
        assert len(s.exec(select(Instance)).all()) == 1


def test_identical_resend_is_stored_once(settings: Settings) -> None:
    first = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    again = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    assert again.outcome is IngestOutcome.DUPLICATE and again.instance_id == first.instance_id
    with session_scope(settings.database_url) as s:
        assert len(s.exec(select(Instance)).all()) == 1
        assert s.exec(select(Study)).one().instance_count == 1


def test_different_content_is_a_new_version_and_audited(settings: Settings) -> None:
    record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    second = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("b"))
    assert second.outcome is IngestOutcome.NEW_VERSION and second.version == 2
    third = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("b"))
    assert third.outcome is IngestOutcome.DUPLICATE and third.version == 2
    with session_scope(settings.database_url) as s:
        versions = s.exec(select(Instance.version, Instance.content_digest)).all()
        assert sorted(versions) == [(1, "blake3:" + "a" * 64), (2, "blake3:" + "b" * 64)]
        audit = s.exec(select(AuditLog).where(AuditLog.action == "instance.new_version")).one()
        assert audit.detail is not None
        assert audit.detail["previous_content_digest"] == "blake3:" + "a" * 64
        assert audit.detail["content_digest"] == "blake3:" + "b" * 64


def test_content_digest_is_blake3_and_rehash_gives_sha256() -> None:
    data = b"\x08\x00\x16\x00" + bytes(range(200))
    digest = content_digest(data)
    assert digest.startswith("blake3:") and len(digest) == len("blake3:") + 64
    assert content_digest(memoryview(data)) == digest
    assert content_digest(data, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()


def test_same_algorithm_never_rehashes(settings: Settings) -> None:
    """The common cases (a new instance, a BLAKE3 duplicate) do not hash a second time."""
    sop = f"{STUDY}.1.1"
    record_instance(settings.database_url, header(sop), as_received(b"content"))
    again = record_instance(settings.database_url, header(sop), as_received(b"content"))
    assert again.outcome is IngestOutcome.DUPLICATE and calls == []


def legacy_row(settings: Settings, sop: str, data: bytes, path: str = "/spool/old.dcm") -> int:
    """A version recorded before BLAKE3: its digest is ``sha256:<hex>`` (as migration 0005
    leaves it)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return record_instance(settings.database_url, header(sop), received(digest, path)).instance_id


def test_identical_resend_of_a_version_recorded_with_sha256_is_a_duplicate(
    settings: Settings,
) -> None:
    sop = f"{STUDY}.1.1"
    first = legacy_row(settings, sop, b"the data set")
    again = record_instance(settings.database_url, header(sop), as_received(b"the data set"))
    assert again.outcome is IngestOutcome.DUPLICATE and again.instance_id == first
    assert again.file_path == "/spool/old.dcm" and calls == ["sha256"]
    with session_scope(settings.database_url) as s:
        assert len(s.exec(select(Instance)).all()) == 1
        assert s.exec(select(AuditLog).where(AuditLog.action == "instance.new_version")).all() == []


def test_changed_content_after_a_sha256_version_is_a_new_version_naming_both_digests(
    settings: Settings,
) -> None:
    sop = f"{STUDY}.1.1"
    legacy_row(settings, sop, b"version one")
    legacy_row(settings, sop, b"version two")  # two legacy versions: still one rehash
    third = record_instance(settings.database_url, header(sop), as_received(b"version three"))
    assert third.outcome is IngestOutcome.NEW_VERSION and third.version == 3
    assert calls == ["sha256"]
    with session_scope(settings.database_url) as s:
        digests = dict(s.exec(select(Instance.version, Instance.content_digest)).all())
        assert digests[3] == content_digest(b"version three")
        audits = s.exec(select(AuditLog).where(AuditLog.action == "instance.new_version")).all()
        detail = max(audits, key=lambda a: a.id or 0).detail
        assert detail is not None and detail["version"] == 3
        assert detail["content_digest"] == content_digest(b"version three")
        assert detail["previous_content_digest"] == (
            "sha256:" + hashlib.sha256(b"version two").hexdigest()
        )
    # and the original first version, re-sent, is a duplicate of version 1
    again = record_instance(settings.database_url, header(sop), as_received(b"version one"))
    assert again.outcome is IngestOutcome.DUPLICATE and again.version == 1


def test_without_rehash_a_sha256_version_is_never_the_same_content(settings: Settings) -> None:
    sop = f"{STUDY}.1.1"
    legacy_row(settings, sop, b"the data set")
    plain = received(content_digest(b"the data set"))
    assert record_instance(settings.database_url, header(sop), plain).outcome is (
        IngestOutcome.NEW_VERSION
    )


def test_unknown_recorded_algorithm_is_not_the_same_content(settings: Settings) -> None:
    sop = f"{STUDY}.1.1"
    record_instance(settings.database_url, header(sop), received("md5:" + "0" * 32))
    result = record_instance(settings.database_url, header(sop), as_received(b"x"))
    assert result.outcome is IngestOutcome.NEW_VERSION and calls == ["md5"]


def test_own_output_by_model_name_is_never_screened(settings: Settings) -> None:
    own = header(f"{STUDY}.9.1", series=f"{STUDY}.9", manufacturer_model_name=PRODUCT_NAME)
    result = record_instance(settings.database_url, own, received("c"))
    assert result.is_own_output
    with session_scope(settings.database_url) as s:
        study = s.exec(select(Study)).one()
        assert study.own_output_only


def test_own_output_does_not_reopen_a_completed_study(settings: Settings) -> None:
    from screener.study_assembler import assemble_due_studies

    settings.study_quiet_seconds = 0
    record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    jobs = assemble_due_studies(settings)
    assert len(jobs) == 1
    # the screener's SR comes back from the PACS, recognised by its SOP Instance UID only
    sr_uid = f"{STUDY}.77.1"
    with session_scope(settings.database_url) as s:
        s.add(
            OutputObject(
                job_id=jobs[0],
                study_instance_uid=STUDY,
                sop_instance_uid=sr_uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                kind="sr",
                file_path="/outbox/sr.dcm",
            )
        )
    back = header(sr_uid, series=f"{STUDY}.77", modality="SR")
    assert record_instance(settings.database_url, back, received("d")).is_own_output
    assert assemble_due_studies(settings) == []
    with session_scope(settings.database_url) as s:
        study = s.exec(select(Study)).one()
        assert study.is_complete and study.instance_count == 2
        assert len(s.exec(select(ScreeningJob)).all()) == 1


def test_concurrent_instances_of_one_study(settings: Settings) -> None:
    """Eight threads, 40 instances of one study, some identical re-sends: no loss, no dup."""
    errors: list[BaseException] = []

    def send(worker: int) -> None:
        try:
            for i in range(5):
                sop = f"{STUDY}.{1 + i % 2}.{worker}{i}"
                series = f"{STUDY}.{1 + i % 2}"
                digest = content_digest(sop.encode())
                for _ in range(2):  # the second call is an identical re-send
                    record_instance(
                        settings.database_url, header(sop, series=series), received(digest)
                    )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with session_scope(settings.database_url) as s:
        assert len(s.exec(select(Study)).all()) == 1
        assert len(s.exec(select(Series)).all()) == 2
        assert len(s.exec(select(Instance)).all()) == 40
        assert s.exec(select(Study)).one().instance_count == 40


def test_the_callers_gate_decision_is_recorded_without_reading_the_file(
    settings: Settings,
) -> None:
    """The listener decides the gate from memory: record_instance then never opens the file
    (here it does not even exist); only Gate.READ_FILE (the default) reads its header."""
    from screener.ingest import Gate

    refused = record_instance(
        settings.database_url,
        header(f"{STUDY}.1.1"),
        received("a", path="/nonexistent/x.dcm"),
        skip_reason="not an image (X-Ray Radiation Dose SR Storage)",
    )
    screenable = record_instance(
        settings.database_url, header(f"{STUDY}.1.2"), received("b"), skip_reason=None
    )
    unreadable = record_instance(
        settings.database_url,
        header(f"{STUDY}.1.3"),
        received("c", path="/nonexistent/y.dcm"),
        skip_reason=Gate.READ_FILE,
    )
    with session_scope(settings.database_url) as s:
        reasons = {i.id: i.skip_reason for i in s.exec(select(Instance)).all()}
    assert reasons == {
        refused.instance_id: "not an image (X-Ray Radiation Dose SR Storage)",
        screenable.instance_id: None,
        unreadable.instance_id: None,  # unreadable here: the prepare stage reports it
    }


def study_state(settings: Settings) -> tuple[object, ...]:
    """(instance_count, last_received_at, is_complete, completed_at, own_output_only)."""
    from screener.timeutil import aware

    with session_scope(settings.database_url) as s:
        study = s.exec(select(Study)).one()
        return (
            study.instance_count,
            aware(study.last_received_at),
            study.is_complete,
            aware(study.completed_at),
            study.own_output_only,
        )


def audit_actions(settings: Settings) -> list[str]:
    with session_scope(settings.database_url) as s:
        return [a.action for a in s.exec(select(AuditLog).order_by(AuditLog.id)).all()]  # type: ignore[arg-type]


def test_study_row_after_each_kind_of_instance(settings: Settings) -> None:
    """Counters, quiet period, completion and own-output flag, one kind of instance at a
    time: refused objects restart the quiet period only while the study is arriving, own
    output changes nothing but the count, a new version is not counted but re-opens."""
    from datetime import timedelta

    from screener.db.models import utcnow
    from screener.study_assembler import complete_study

    url = settings.database_url
    t = [utcnow().replace(microsecond=0) + timedelta(seconds=10 * i) for i in range(8)]
    dose = "not an image (X-Ray Radiation Dose SR Storage)"
    own = header(f"{STUDY}.9.1", series=f"{STUDY}.9", manufacturer_model_name=PRODUCT_NAME)

    record_instance(url, own, received("9"), now=t[0], skip_reason=None)
    assert study_state(settings) == (1, t[0], False, None, True)
    record_instance(url, header(f"{STUDY}.1.1"), received("a"), now=t[1], skip_reason=None)
    assert study_state(settings) == (2, t[1], False, None, False)
    refused = header(f"{STUDY}.2.1", series=f"{STUDY}.2")
    record_instance(url, refused, received("b"), now=t[2], skip_reason=dose)
    assert study_state(settings) == (3, t[2], False, None, False)  # quiet period restarted
    with session_scope(url) as s:
        assert complete_study(s, s.exec(select(Study.id)).one() or 0, t[3]) is not None
    record_instance(
        url, header(f"{STUDY}.2.2", series=f"{STUDY}.2"), received("c"), now=t[4], skip_reason=dose
    )
    assert study_state(settings) == (4, t[2], True, t[3], False)  # late: stays closed
    record_instance(url, replace(own, sop_instance_uid=f"{STUDY}.9.2"), received("d"), now=t[5])
    assert study_state(settings) == (5, t[2], True, t[3], False)  # own output: counted only
    changed = record_instance(url, header(f"{STUDY}.1.1"), received("e"), now=t[6])
    assert changed.outcome is IngestOutcome.NEW_VERSION
    assert study_state(settings) == (5, t[6], False, None, False)  # re-opened, not counted
    own_again = record_instance(url, own, received("f"), now=t[7])
    assert own_again.outcome is IngestOutcome.NEW_VERSION and own_again.is_own_output
    assert study_state(settings) == (5, t[6], False, None, False)
    assert audit_actions(settings) == [
        "job.queued",
        "instance.late_not_screenable",
        "instance.new_version",
        "study.reopened",
        "instance.new_version",
    ]


def test_refused_first_instance_of_a_new_study(settings: Settings) -> None:
    dose = "not an image (X-Ray Radiation Dose SR Storage)"
    from screener.db.models import utcnow

    now = utcnow().replace(microsecond=0)
    result = record_instance(
        settings.database_url, header(f"{STUDY}.2.1"), received("a"), now=now, skip_reason=dose
    )
    assert result.outcome is IngestOutcome.STORED and not result.is_own_output
    assert study_state(settings) == (1, now, False, None, False)


def test_own_output_recognised_by_uid_in_a_new_study(settings: Settings) -> None:
    """An output object of the screener (by SOP Instance UID) that opens a study: the study
    holds only own output; the duplicate is recognised with its flag."""
    with session_scope(settings.database_url) as s:
        job_study = Study(study_instance_uid=f"{STUDY}.0")
        s.add(job_study)
        s.flush()
        job = ScreeningJob(study_id=job_study.id or 0)
        s.add(job)
        s.flush()
        s.add(
            OutputObject(
                job_id=job.id or 0,
                study_instance_uid=STUDY,
                sop_instance_uid=f"{STUDY}.77.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                kind="sr",
                file_path="/outbox/sr.dcm",
            )
        )
    back = header(f"{STUDY}.77.1", series=f"{STUDY}.77", modality="SR")
    first = record_instance(settings.database_url, back, received("d"), skip_reason=None)
    again = record_instance(settings.database_url, back, received("d"), skip_reason=None)
    assert first.is_own_output and again.is_own_output
    assert again.outcome is IngestOutcome.DUPLICATE and again.instance_id == first.instance_id
    with session_scope(settings.database_url) as s:
        study = s.exec(select(Study).where(Study.study_instance_uid == STUDY)).one()
        assert study.own_output_only and study.instance_count == 1


def test_series_uid_already_recorded_in_another_study(settings: Settings) -> None:
    """A Series Instance UID seen before under another study (a misconfigured modality): the
    instance joins that series row but is counted in its own, new study."""
    first = record_instance(settings.database_url, header(f"{STUDY}.1.1"), received("a"))
    other = header(f"{STUDY}.1.2", study_instance_uid=f"{STUDY}.5")
    second = record_instance(settings.database_url, other, received("b"), skip_reason=None)
    assert second.outcome is IngestOutcome.STORED and second.study_id != first.study_id
    with session_scope(settings.database_url) as s:
        rows = {i.id: (i.study_id, i.series_id) for i in s.exec(select(Instance)).all()}
        assert rows[second.instance_id] == (second.study_id, rows[first.instance_id][1])
        counts = {st.id: st.instance_count for st in s.exec(select(Study)).all()}
        assert counts == {first.study_id: 1, second.study_id: 1}
        assert len(s.exec(select(Series)).all()) == 1
