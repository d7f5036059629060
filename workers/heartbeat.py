"""Liveness files for long-running loops that are not Celery workers (container health checks).

The batching consumer, the reconciler and the delivery sweep touch
``$TMPDIR/pacs-screener-<install>-<name>.heartbeat`` every pass; ``screener heartbeat NAME
--max-age S`` exits 0 while the file is fresh. ``<install>`` is a short hash of the
resolved ``data_dir``: two installs (two ``serve`` with their own data, two test runs) on
one host must not read or overwrite each other's liveness. The files stay in the temp
dir, not in ``data_dir``, which may be a volume shared by several containers. A file holds
one JSON line: the writer's pid and, once a loop that turns but whose work does not move
declared itself stuck (:class:`Progress`), why; its time is then that of the last
progress, so the age the health checks read is how long the work has not moved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from screener import atomic_files

log = logging.getLogger(__name__)


def install_key(data_dir: Path) -> str:
    """A short key of the install whose data lives in ``data_dir`` (resolved, so that every
    spelling of one directory gives one key)."""
    resolved = str(Path(data_dir).expanduser().resolve())
    return hashlib.sha256(resolved.encode()).hexdigest()[:12]


def heartbeat_path(name: str, data_dir: Path) -> Path:
    """The heartbeat file of loop ``name`` of the install in ``data_dir``: every writer and
    reader (the loops, ``/healthz``, ``screener heartbeat``) names it through this."""
    return Path(tempfile.gettempdir()) / f"pacs-screener-{install_key(data_dir)}-{name}.heartbeat"


class Heartbeat:
    """Touch the file at most once per ``every_s`` seconds (cheap enough for any loop)."""

    def __init__(self, name: str, data_dir: Path, every_s: float = 5.0) -> None:
        self.path = heartbeat_path(name, data_dir)
        self.every_s = every_s
        self._last = 0.0
        self._note: str | None = None  # what the file says; None: not written yet
        self._stalled = False

    def beat(self) -> None:
        """Touch the file; never raises: liveness must not stop the work it reports on (a
        heartbeat file left by another user made the reconciler thread of ``serve`` die)."""
        now = time.monotonic()
        if self._stalled or now - self._last >= self.every_s:
            self._last = now
            self._stalled = False
            self._write("", time.time())

    def stall(self, quiet_s: float, reason: str) -> None:
        """The loop turns but its work has not moved for ``quiet_s`` seconds: date the file
        back to the last progress and say why, so that ``screener heartbeat`` and
        ``/healthz`` see a stale heartbeat although the loop still runs. The next
        :meth:`beat` (the work moved again) is written at once."""
        now = time.monotonic()
        if not self._stalled or now - self._last >= self.every_s:
            self._last = now
            self._stalled = True
            self._write(reason, time.time() - quiet_s)

    def _write(self, note: str, at: float) -> None:
        """A new note and its time land together (a temporary file, dated, then renamed
        over the old one): a reader between the two once saw a stall dated now, or a beat
        dated back to the stall, and judged by the wrong one."""
        try:
            if note != self._note or not self.path.exists():
                text = json.dumps({"pid": os.getpid(), "stuck": note or None}) + "\n"

                def dated(tmp: Path) -> None:
                    tmp.write_text(text)
                    os.utime(tmp, (at, at))

                atomic_files.write_by_path(self.path, dated, sync_dir=False)
                self._note = note
            else:
                os.utime(self.path, (at, at))
        except OSError as exc:
            log.warning("heartbeat %s not written: %s", self.path, exc)


def heartbeat_age(name: str, data_dir: Path) -> float | None:
    """Seconds since the last beat, or None when there never was one."""
    path = heartbeat_path(name, data_dir)
    if not path.exists():
        return None
    return max(0.0, time.time() - path.stat().st_mtime)


@dataclass(frozen=True)
class HeartbeatState:
    """What a heartbeat file says: its age, who wrote it (0: unknown) and whether it is
    stuck (the reason)."""

    age_s: float
    pid: int
    stuck: str | None

    @property
    def writer_alive(self) -> bool:
        """The process that wrote the file still runs on this host."""
        return self.pid > 0 and pid_alive(self.pid)

    def stuck_past(self, limit_s: float) -> bool:
        """The writer said its work is stuck and it has not moved for more than
        ``limit_s`` (``workers.stuck_after_seconds``): the one rule of ``/healthz`` and of
        the supervisors that restart a stuck consumer."""
        return self.stuck is not None and self.age_s > limit_s


def heartbeat_state(name: str, data_dir: Path) -> HeartbeatState | None:
    """The heartbeat file ``name`` read back; None when there is none (or it is unreadable)."""
    path = heartbeat_path(name, data_dir)
    try:
        age = max(0.0, time.time() - path.stat().st_mtime)
        text = path.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:  # a half-written file, or one from an older version: no details
        data = {}
    if not isinstance(data, dict):
        data = {}
    pid = data.get("pid")
    stuck = data.get("stuck")
    return HeartbeatState(
        age, pid if isinstance(pid, int) else 0, stuck if isinstance(stuck, str) else None
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class Progress:
    """Liveness from work done, not from a loop turning: work held for longer than
    ``stuck_after_s`` with nothing finished is stuck, however busy the threads around it
    look (an engine call that never returns left the receiving loop beating). Thread-safe:
    the pipeline threads report what they finished, the receiving loop what it holds."""

    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self._lock = threading.Lock()
        self._held_since: float | None = None  # when work was first held after none was
        self._held = 0
        self._last_done = time.monotonic()

    def holding(self, count: int) -> None:
        """How much work is held now (received, not yet settled)."""
        with self._lock:
            if count <= 0:
                self._held_since = None
            elif self._held_since is None:
                self._held_since = time.monotonic()
            self._held = max(0, count)

    def done(self) -> None:
        """A piece of work (a batch) left the pipeline, written or not."""
        with self._lock:
            self._last_done = time.monotonic()

    def quiet_s(self) -> float:
        """Seconds that held work has not moved (0 while nothing is held)."""
        with self._lock:
            if self._held_since is None:
                return 0.0
            return time.monotonic() - max(self._held_since, self._last_done)

    def stuck(self) -> str | None:
        """Why the work is stuck, or None while it moves (or there is none)."""
        with self._lock:
            held = self._held
        quiet = self.quiet_s()
        if quiet <= self.stuck_after_s:
            return None
        return f"no batch finished for {quiet:.0f} s with {held} message(s) held"


# Liveness probes of this process (a stuck consumer registers one): while one of them
# names a reason, ProcessBeat stops refreshing the process's row, so /healthz on any host
# stops counting the process as a live worker.
_probes: list[Callable[[], str | None]] = []


def add_liveness_probe(probe: Callable[[], str | None]) -> Callable[[], None]:
    """Register ``probe`` (None: alive, else why not); returns its removal."""
    _probes.append(probe)

    def remove() -> None:
        if probe in _probes:
            _probes.remove(probe)

    return remove


def stuck_reason() -> str | None:
    """Why this process is stuck, from its liveness probes; None while none says so."""
    for probe in list(_probes):
        try:
            reason = probe()
        except Exception as exc:  # a broken probe must not stop the beats
            log.debug("liveness probe failed: %r", exc)
            continue
        if reason:
            return reason
    return None


class ProcessBeat:
    """A daemon thread that upserts this process's row in ``process_heartbeats`` every
    ``every_s`` seconds, so ``/healthz`` (any process, any machine) sees who is alive. A
    process whose liveness probe says it is stuck is not beaten for."""

    def __init__(self, database_url: str, kind: str, queues: str = "", every_s: float = 10.0):
        import socket

        self.database_url = database_url
        self.kind = kind
        self.queues = queues
        self.every_s = every_s
        self.name = f"{kind}:{queues}@{socket.gethostname()}:{os.getpid()}"[:128]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"beat-{kind}", daemon=True)
        self._stuck: str | None = None

    def start(self) -> ProcessBeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        import socket

        from screener.db.models import ProcessHeartbeat, utcnow
        from screener.db.session import session_scope

        with session_scope(self.database_url) as session:
            row = session.get(ProcessHeartbeat, self.name)
            if row is None:
                row = ProcessHeartbeat(
                    name=self.name,
                    kind=self.kind,
                    queues=self.queues,
                    host=socket.gethostname()[:128],
                    pid=os.getpid(),
                )
            row.beat_at = utcnow()
            session.add(row)

    def _alive(self) -> bool:
        """False (logged once per episode) while a liveness probe of this process says
        it is stuck."""
        reason = stuck_reason()
        if reason is not None and self._stuck is None:
            log.error("%s is stuck (%s); its heartbeat row is not refreshed", self.name, reason)
        elif reason is None and self._stuck is not None:
            log.warning("%s moves again; its heartbeat row is refreshed again", self.name)
        self._stuck = reason
        return reason is None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._alive():
                    self.beat()
            except Exception as exc:  # the database may be briefly away; try again
                log.warning("heartbeat not recorded: %s", exc)
            self._stop.wait(self.every_s)

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop beating and remove the row (a clean stop is not a dead process). A beat
        under way is waited for (at most ``wait_s``): one that landed after the delete left
        the row of a stopped process, counted alive until it aged out."""
        from screener.db.models import ProcessHeartbeat
        from screener.db.session import session_scope

        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait_s)
        try:
            with session_scope(self.database_url) as session:
                row = session.get(ProcessHeartbeat, self.name)
                if row is not None:
                    session.delete(row)
        except Exception:  # noqa: S110 - best effort at shutdown
            pass
