"""Delivery over associations kept open per destination, and its database round trips.

The peer is a real dcmtk ``storescp`` (one association at a time, ``-v``), whose log says
how many associations it was given; the database is SQLite and PostgreSQL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import event

from screener.db.session import get_engine
from screener.delivery import deliver_pending, list_deliveries, record_outputs
from screener.dicom import sender
from screener.reports.writer import write_study_outputs
from screener.settings import Destination, Settings
from tests.dcmtk import free_port, wait_for_port
from tests.report_results import make_job, make_result

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk not installed")


class CountingScp:
    """``storescp -v`` (no fork): it logs each association it accepts and each release."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.directory = directory
        self.extra = extra
        self.port = port or free_port()
        self.log = directory.parent / f"storescp-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CountingScp:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["storescp", "-v", "-aet", "STORESCP", "-od", str(self.directory), "+xa"]
                + [*self.extra, str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, timeout=10)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def _count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    @property
    def associations(self) -> int:
        # "Received" is logged for any TCP connection (wait_for_port's probe too)
        return self._count("Association Acknowledged")

    @property
    def releases(self) -> int:
        return self._count("Association Release")

    def received(self) -> list[str]:
        return sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.directory.iterdir()
            if p.is_file()
        )

    def destination(self) -> Destination:
        return Destination(ae_title="STORESCP", host="127.0.0.1", port=self.port)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[CountingScp]:
    peer = CountingScp(tmp_path / "received").start()
    yield peer
    sender.close_pooled_associations()
    peer.stop()


def _with(settings: Settings, destination: Destination, **delivery: object) -> Settings:
    update = {"destinations": [destination], "backoff_jitter": 0.0, **delivery}
    return settings.model_copy(update={"delivery": settings.delivery.model_copy(update=update)})


def _studies(tmp_path: Path, s: Settings, n: int, tag: str = "") -> list[str]:
    """``n`` reported single-image studies (SR + SC each), recorded for delivery."""
    uids: list[str] = []
    for i in range(n):
        result, _ = make_result(tmp_path / f"study{tag}{i}", ["PA"], scores=[0.7])
        paths = write_study_outputs(result, tmp_path / f"outbox{tag}{i}", s)
        record_outputs(s, make_job(s, result.study_instance_uid), paths)
        uids += [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    return uids


def _wait(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@dataclass
class RoundTrips:
    """What one piece of code cost the database: statements, transactions, connections."""

    statements: int = 0  # cursor executions (an executemany counts once)
    commits: int = 0
    checkouts: int = 0  # connections taken from the pool (PostgreSQL pings each one)

    @property
    def total(self) -> int:
        return self.statements + self.commits + self.checkouts


@contextmanager
def count_round_trips(url: str) -> Iterator[RoundTrips]:
    engine = get_engine(url)
    counts = RoundTrips()

    def on_execute(*_args: object) -> None:
        counts.statements += 1

    def on_commit(*_args: object) -> None:
        counts.commits += 1

    def on_checkout(*_args: object) -> None:
        counts.checkouts += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    event.listen(engine.pool, "checkout", on_checkout)
    try:
        yield counts
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
        event.remove(engine.pool, "checkout", on_checkout)


# --------------------------------------------------------------------------- associations


def test_studies_of_several_passes_share_one_association(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    """6 studies (SR + SC each) in 3 passes: one association, released only when closed."""
    s = _with(settings, scp.destination(), association_idle_seconds=60.0)
    expected: list[str] = []
    for part in range(3):
        expected += _studies(tmp_path, s, 2, tag=f"p{part}")
        summary = deliver_pending(s)
        assert (summary.attempted, summary.delivered) == (4, 4), summary.to_json()
    assert scp.received() == sorted(expected)
    assert scp.associations == 1
    assert scp.releases == 0  # still open for the next study
    assert {r.state for r in list_deliveries(s)} == {"delivered"}
    sender.close_pooled_associations()
    assert _wait(lambda: scp.releases == 1)


def test_zero_idle_seconds_releases_after_each_pass(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    s = _with(settings, scp.destination(), association_idle_seconds=0.0)
    for part in range(2):
        _studies(tmp_path, s, 1, tag=f"p{part}")
        assert deliver_pending(s).delivered == 2
    assert scp.associations == 2
    assert _wait(lambda: scp.releases == 2)


def test_idle_association_is_released_after_association_idle_seconds(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    s = _with(settings, scp.destination(), association_idle_seconds=1.0)
    _studies(tmp_path, s, 1)
    started = time.monotonic()
    assert deliver_pending(s).delivered == 2
    assert scp.releases == 0
    assert _wait(lambda: scp.releases == 1, timeout=30.0)
    assert time.monotonic() - started >= 0.9  # not before its idle time
    assert sender.pooled_associations() == 0
    # the next study opens a fresh association
    _studies(tmp_path, s, 1, tag="b")
    assert deliver_pending(s).delivered == 2
    assert scp.associations == 2


def test_peer_closing_the_idle_association_is_reopened_once(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    """The PACS restarts between two studies: the pooled association is dead; the next
    pass reopens it and delivers, and the breaker counts no failure."""
    s = _with(settings, scp.destination(), association_idle_seconds=60.0)
    first = _studies(tmp_path, s, 1)
    assert deliver_pending(s).delivered == 2
    scp.stop()  # the peer goes away: its end of the pooled association is closed
    scp.start()  # and comes back on the same port
    second = _studies(tmp_path, s, 1, tag="b")
    summary = deliver_pending(s)
    assert (summary.delivered, summary.retrying, summary.dead) == (2, 0, 0), summary.to_json()
    assert scp.received() == sorted(first + second)
    assert scp.associations == 2
    from screener.delivery import destination_health

    (health,) = destination_health(s)
    assert (health.state, health.consecutive_failures) == ("up", 0)


def test_peer_down_after_the_reopen_is_a_delivery_failure(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    s = _with(settings, scp.destination(), association_idle_seconds=60.0)
    _studies(tmp_path, s, 1)
    assert deliver_pending(s).delivered == 2
    scp.stop()  # the pooled association dies and nothing listens for the reopen
    _studies(tmp_path, s, 1, tag="b")
    summary = deliver_pending(s)
    assert (summary.delivered, summary.retrying) == (0, 2), summary.to_json()
    from screener.delivery import destination_health

    (health,) = destination_health(s)
    assert health.consecutive_failures == 1 and health.last_error


def test_association_lost_under_a_c_store_is_reopened_once_then_a_failure(
    tmp_path: Path, settings: Settings
) -> None:
    """A peer that aborts every association in the middle of a C-STORE: one reopen, then
    the files fail with the association error and the breaker counts one failure."""
    scp = CountingScp(tmp_path / "aborting", None, "--abort-after").start()
    try:
        s = _with(settings, scp.destination(), association_idle_seconds=60.0)
        _studies(tmp_path, s, 1)
        summary = deliver_pending(s)
        assert (summary.delivered, summary.retrying) == (0, 2), summary.to_json()
        assert scp.associations == 2  # the first and exactly one reopen
        assert "association lost" in summary.errors[scp.destination().name]
        from screener.delivery import destination_health

        (health,) = destination_health(s)
        assert health.consecutive_failures == 1
        assert sender.pooled_associations() == 0
    finally:
        sender.close_pooled_associations()
        scp.stop()


# --------------------------------------------------------------------------- round trips


def _pass_round_trips(tmp_path: Path, s: Settings, n: int, tag: str) -> RoundTrips:
    _studies(tmp_path, s, n, tag=tag)
    with count_round_trips(s.database_url) as counts:
        summary = deliver_pending(s)
    assert summary.delivered == 2 * n
    return counts


def test_round_trips_per_pass_do_not_grow_with_the_studies(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    s = _with(settings, scp.destination(), association_idle_seconds=60.0)
    _pass_round_trips(tmp_path, s, 1, "warm")  # breaker rows created, association open
    one = _pass_round_trips(tmp_path, s, 1, "a")
    six = _pass_round_trips(tmp_path, s, 6, "b")
    print(f"round trips per pass, 1 study: {one}; 6 studies: {six}")
    assert six.statements == one.statements
    assert six.commits == one.commits and six.checkouts == one.checkouts
    assert one.statements <= 8 and one.commits <= 4


def _threads_cpu_s(threads: list[threading.Thread]) -> float:
    """CPU seconds the given (running) threads have used, from their POSIX CPU clocks."""
    total = 0.0
    for thread in threads:
        assert thread.ident is not None and thread.is_alive(), thread
        total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


def test_a_parked_association_costs_little_cpu(tmp_path: Path, scp: CountingScp) -> None:
    """pynetdicom polls an open association every millisecond (~60 ms CPU/s here); the
    pool parks idle ones. The association still works after it was parked."""
    paths = _written(tmp_path)
    first = sender.send_files(
        scp.destination(), paths[:1], calling_ae_title="SCREENER", idle_seconds=60.0
    )
    assert first.failed == {} and sender.pooled_associations() == 1
    # the CPU of the parked association's own threads (its ACSE loop and its DUL reader),
    # not the process's: a thread another test left behind must not count
    (parked,) = [item.assoc for items in sender._POOL._idle.values() for item in items]
    threads = [parked, parked.dul]
    start = _threads_cpu_s(threads)
    time.sleep(3.0)
    idle_ms_per_s = (_threads_cpu_s(threads) - start) * 1000 / 3.0
    assert idle_ms_per_s < 20.0, idle_ms_per_s
    again = sender.send_files(
        scp.destination(), paths[1:], calling_ae_title="SCREENER", idle_seconds=60.0
    )
    assert again.failed == {} and again.associations_opened == 0
    assert scp.associations == 1 and len(scp.received()) == len(paths)


# --------------------------------------------------------------------------- shutdown


def _written(tmp_path: Path) -> list[Path]:
    result, _ = make_result(tmp_path / "study", ["PA"], scores=[0.7])
    return write_study_outputs(result, tmp_path / "outbox", Settings(data_dir=tmp_path / "d"))


def test_worker_shutdown_releases_pooled_associations(tmp_path: Path, scp: CountingScp) -> None:
    from celery.signals import worker_process_shutdown

    import workers.tasks  # noqa: F401  (connects the handler)

    outcome = sender.send_files(
        scp.destination(), _written(tmp_path), calling_ae_title="SCREENER", idle_seconds=60.0
    )
    assert outcome.failed == {} and sender.pooled_associations() == 1
    worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    assert sender.pooled_associations() == 0
    assert _wait(lambda: scp.releases == 1)


def test_process_exit_releases_pooled_associations(tmp_path: Path, scp: CountingScp) -> None:
    """A process that ends with an association open releases it (atexit), no abort."""
    paths = _written(tmp_path)
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from screener.dicom.sender import send_files\nfrom screener.settings import Destination\n"
        f"d = Destination(ae_title='STORESCP', host='127.0.0.1', port={scp.port})\n"
        "o = send_files(d, [Path(p) for p in sys.argv[1:]], calling_ae_title='SCREENER',"
        " idle_seconds=600.0)\n"
        "sys.exit(0 if not o.failed else 1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert scp.associations == 1
    assert _wait(lambda: scp.releases == 1)


# --------------------------------------------------------------------------- what is sent


def _outputs(tmp_path: Path, settings: Settings) -> list[Path]:
    result, _ = make_result(tmp_path / "study", ["PA"], scores=[0.7])
    return list(write_study_outputs(result, tmp_path / "outbox", settings))


def _data_set_bytes(path: Path) -> bytes:
    """The file's bytes after its File Meta Information (what a C-STORE carries)."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_outputs_are_streamed_from_disk_as_they_are(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that accepts the files' own syntax gets the bytes we wrote, never decoded."""
    import pynetdicom.association

    def no_decoding(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the sender decoded an output file")

    monkeypatch.setattr(pynetdicom.association, "dcmread", no_decoding)
    monkeypatch.setattr(sender.pydicom, "dcmread", _headers_only(sender.pydicom.dcmread))
    peer = CountingScp(tmp_path / "received", None, "+B").start()  # +B: stores bytes as received
    try:
        paths = _outputs(tmp_path, settings)
        outcome = sender.send_files(peer.destination(), paths, calling_ae_title="SCREENER")
        assert outcome.failed == {}
        received = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in peer.directory.iterdir()
        }
        assert len(received) == len(paths) == 2
        for path in paths:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert _data_set_bytes(received[uid]) == _data_set_bytes(path)
    finally:
        sender.close_pooled_associations()
        peer.stop()


def _headers_only(read: Any) -> Any:
    """``pydicom.dcmread`` that refuses a full read: send_files may read headers only."""

    def wrapped(path: Any, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("stop_before_pixels"):
            raise AssertionError(f"the sender decoded {path}")
        return read(path, *args, **kwargs)

    return wrapped


def test_a_peer_that_accepts_only_implicit_vr_gets_every_output(
    tmp_path: Path, settings: Settings
) -> None:
    """No context in the files' own syntax (Explicit VR): decoded and sent in Implicit VR."""
    peer = CountingScp(tmp_path / "received", None, "+xi").start()  # implicit VR only
    try:
        paths = _outputs(tmp_path, settings)
        assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in paths} == {
            "1.2.840.10008.1.2.1"
        }
        outcome = sender.send_files(peer.destination(), paths, calling_ae_title="SCREENER")
        assert outcome.failed == {}
        received = sorted(peer.directory.iterdir())
        assert len(received) == 2
        for path in received:
            ds = pydicom.dcmread(path)
            assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
        originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in paths}
        assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == set(originals)
        for path in received:
            ds = pydicom.dcmread(path)
            original = originals[str(ds.SOPInstanceUID)]
            assert set(ds.keys()) == set(original.keys())  # every element arrived
            if "PixelData" in original:  # the heatmap's pixels, byte for byte
                assert ds.PixelData == original.PixelData
    finally:
        sender.close_pooled_associations()
        peer.stop()


def test_delivery_sockets_send_at_once_and_acknowledge_at_once(
    tmp_path: Path, settings: Settings, scp: CountingScp
) -> None:
    """storescp (like many dcmtk-based PACS) keeps Nagle's algorithm on: its response's
    last segment waits for our ACK, which Linux delays up to 40 ms unless quick-ack mode is
    on. Our end of every delivery association has TCP_NODELAY, and quick ACKs re-armed
    before each read (screener.dicom.low_latency; the effect: benchmarks/reports.py)."""
    import socket

    from screener.dicom.low_latency import LowLatencySocket

    s = _with(settings, scp.destination(), association_idle_seconds=60.0)
    _studies(tmp_path, s, 2)
    assert deliver_pending(s).delivered == 4
    [pooled] = [item for items in sender._POOL._idle.values() for item in items]
    transport = pooled.assoc.dul.socket
    assert isinstance(transport, LowLatencySocket)
    assert transport.socket is not None
    assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    if hasattr(socket, "TCP_QUICKACK"):
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        transport.recv(0)  # every read re-arms it (Linux leaves quick-ack mode by itself)
        assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) != 0
    _studies(tmp_path, s, 1, tag="b")  # the association still delivers
    assert deliver_pending(s).delivered == 2
    assert scp.associations == 1
