"""What a PACS answers, object by object: refusals, warnings, a full archive.

The peer is a pynetdicom Storage SCP on a loopback port whose accepted SOP classes and
C-STORE status are set per test (dcmtk's storescp cannot refuse one class or answer with
a chosen status); the database is SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from screener.db.models import utcnow
from screener.delivery import (
    PARAMETRIC_MAP,
    deliver_pending,
    destination_health,
    list_deliveries,
    record_outputs,
)
from screener.dicom import sender
from screener.dicom.sender import OUTPUT_SOP_CLASSES, out_of_resources, stored
from screener.reports.writer import write_study_outputs
from screener.settings import Destination, Settings
from tests.dcmtk import free_port
from tests.report_results import make_job, make_result


class AnsweringScp:
    """A Storage SCP that takes ``classes`` and answers every C-STORE with ``status``."""

    def __init__(self, classes: tuple[str, ...], status: int = 0x0000, delay: float = 0.0) -> None:
        self.port = free_port()
        self.status = status
        self.delay = delay  # seconds per C-STORE: a PACS at the end of a slow link
        self.received: list[str] = []  # SOP Instance UIDs, once per C-STORE
        ae = AE(ae_title="PACS")
        for sop in classes:
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)]
        )

    def store(self, event: Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        time.sleep(self.delay)
        return self.status

    def destination(self) -> Destination:
        return Destination(ae_title="PACS", host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs_without_pmap() -> Iterator[AnsweringScp]:
    scp = AnsweringScp(tuple(c for c in OUTPUT_SOP_CLASSES if c != PARAMETRIC_MAP))
    yield scp
    sender.close_pooled_associations()
    scp.stop()


def _settings(settings: Settings, scp: AnsweringScp, **reports: object) -> Settings:
    delivery = settings.delivery.model_copy(
        update={"destinations": [scp.destination()], "backoff_jitter": 0.0}
    )
    return settings.model_copy(
        update={"delivery": delivery, "reports": settings.reports.model_copy(update=reports)}
    )


def _study(tmp_path: Path, s: Settings, tag: str) -> list[Path]:
    result, _ = make_result(tmp_path / tag, ["PA"], scores=[0.7])
    paths = write_study_outputs(result, tmp_path / f"outbox-{tag}", s)
    record_outputs(s, make_job(s, result.study_instance_uid), paths)
    return paths


def test_statuses_that_mean_stored() -> None:
    for code in (0x0000, 0x0001, 0xB000, 0xB006, 0xB007, 0xB100, 0xB1FF):
        assert stored(code), hex(code)
    for code in (0xA700, 0xA7FF, 0xA900, 0xC000, 0xC123, 0x0110, 0x0122, 0x0211):
        assert not stored(code), hex(code)
    assert out_of_resources(0xA700) and out_of_resources(0xA7C2)
    assert not out_of_resources(0xA900) and not out_of_resources(0xC000)


def test_an_object_the_pacs_refuses_fails_alone_and_the_destination_stays_up(
    tmp_path: Path, settings: Settings, pacs_without_pmap: AnsweringScp
) -> None:
    """A PACS without Parametric Map Storage: the map's row retries on its own; the SR and
    SC of that study and of a later one are delivered, the breaker never opens."""
    s = _settings(settings, pacs_without_pmap, parametric_map=True)
    first = _study(tmp_path, s, "one")
    t0 = utcnow()
    for step in (0, 2, 6, 14, 30, 62):  # past every retry of the refused row
        deliver_pending(s, now=t0 + timedelta(seconds=step))
    health = destination_health(s)[0]
    assert (health.state, health.consecutive_failures) == ("up", 0)
    second = _study(tmp_path, s, "two")
    deliver_pending(s, now=t0 + timedelta(seconds=63))
    rows = list_deliveries(s)
    assert len(rows) == len(first) + len(second)
    refused = [r for r in rows if r.kind == "pmap"]
    assert len(refused) == 2  # one map per study
    for row in refused:
        assert row.state == "retrying" and "presentation context" in (row.last_error or "")
    for row in rows:
        if row.kind != "pmap":
            assert row.state == "delivered", (row.kind, row.state, row.last_error)
    assert len(pacs_without_pmap.received) == len(rows) - 2
    assert destination_health(s)[0].state == "up"


@pytest.mark.parametrize("status", [0x0001, 0xB100, 0xB006], ids=hex)
def test_a_warning_status_is_stored_and_never_sent_again(
    tmp_path: Path, settings: Settings, status: int
) -> None:
    scp = AnsweringScp(OUTPUT_SOP_CLASSES, status)
    try:
        s = _settings(settings, scp)
        paths = _study(tmp_path, s, "warned")
        t0 = utcnow()
        first = deliver_pending(s, now=t0)
        assert first.delivered == len(paths) and first.retrying == 0
        later = deliver_pending(s, now=t0 + timedelta(hours=1))
        assert later.attempted == 0
        assert {r.state for r in list_deliveries(s)} == {"delivered"}
        assert len(scp.received) == len(paths)  # each once
    finally:
        sender.close_pooled_associations()
        scp.stop()


def test_a_full_pacs_counts_against_the_destination(tmp_path: Path, settings: Settings) -> None:
    """Refused: Out of Resources for everything is the PACS's state, not the objects':
    the breaker opens as for a PACS that is down, and the rows wait for its probe."""
    scp = AnsweringScp(OUTPUT_SOP_CLASSES, 0xA700)
    try:
        s = _settings(settings, scp)
        _study(tmp_path, s, "full")
        t0 = utcnow()
        for step in (0, 2, 6):
            deliver_pending(s, now=t0 + timedelta(seconds=step))
        health = destination_health(s)[0]
        assert health.state == "down" and health.consecutive_failures >= 3
        assert {r.state for r in list_deliveries(s)} == {"retrying"}
        scp.status = 0x0000  # space freed: the next probe closes the breaker
        summary = deliver_pending(s, now=t0 + timedelta(minutes=10))
        assert summary.probes == 1
        assert {r.state for r in list_deliveries(s)} == {"delivered"}
        assert destination_health(s)[0].state == "up"
    finally:
        sender.close_pooled_associations()
        scp.stop()


def test_a_pass_slower_than_stale_seconds_is_not_sent_again_by_another(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass at a slow PACS outlasts ``stale_seconds``: another sender's pass (the sweep, a
    deliver task) took the rows it still held for a crashed sender's and sent them again.
    The claim is renewed after every chunk: each object is sent once."""
    import screener.delivery as delivery

    monkeypatch.setattr(delivery, "SEND_CHUNK", 2)
    scp = AnsweringScp(OUTPUT_SOP_CLASSES, delay=0.25)
    try:
        s = _settings(settings, scp)
        s = s.model_copy(
            update={"reconciler": s.reconciler.model_copy(update={"stale_seconds": 3.0})}
        )
        paths = [p for tag in "abcdefghijkl" for p in _study(tmp_path, s, tag)]  # 24: 6 s
        first = threading.Thread(target=deliver_pending, args=(s,))
        started = time.monotonic()
        first.start()
        # the rows not yet sent were claimed more than stale_seconds ago, and the first
        # pass has renewed its claim at least once (a third object is on its way); polled,
        # not slept: the first chunk alone took more than a second on a loaded machine
        deadline = started + 60
        while (len(scp.received) < 3 or time.monotonic() - started < 3.4) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert first.is_alive(), "the first pass ended before stale_seconds: nothing tested"
        deliver_pending(s)
        first.join(timeout=60)
        assert sorted(scp.received) == sorted(set(scp.received))  # nothing sent twice
        assert len(scp.received) == len(paths)
        assert {r.state for r in list_deliveries(s)} == {"delivered"}
    finally:
        sender.close_pooled_associations()
        scp.stop()
