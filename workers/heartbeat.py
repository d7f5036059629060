"""Liveness files for long-running loops that are not Celery workers (container health checks).

The batching consumer and the reconciler touch ``/tmp/pacs-screener-<name>.heartbeat``
every pass; ``screener heartbeat NAME --max-age S`` exits 0 while the file is fresh.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def heartbeat_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"pacs-screener-{name}.heartbeat"


class Heartbeat:
    """Touch the file at most once per ``every_s`` seconds (cheap enough for any loop)."""

    def __init__(self, name: str, every_s: float = 5.0) -> None:
        self.path = heartbeat_path(name)
        self.every_s = every_s
        self._last = 0.0

    def beat(self) -> None:
        """Touch the file; never raises: liveness must not stop the work it reports on (a
        heartbeat file left by another user made the reconciler thread of ``serve`` die)."""
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            try:
                self.path.touch()
                os.utime(self.path)
            except OSError as exc:
                log.warning("heartbeat %s not written: %s", self.path, exc)


def heartbeat_age(name: str) -> float | None:
    """Seconds since the last beat, or None when there never was one."""
    path = heartbeat_path(name)
    if not path.exists():
        return None
    return max(0.0, time.time() - path.stat().st_mtime)


class ProcessBeat:
    """A daemon thread that upserts this process's row in ``process_heartbeats`` every
    ``every_s`` seconds, so ``/healthz`` (any process, any machine) sees who is alive."""

    def __init__(self, database_url: str, kind: str, queues: str = "", every_s: float = 10.0):
        import socket
        import threading

        self.database_url = database_url
        self.kind = kind
        self.queues = queues
        self.every_s = every_s
        self.name = f"{kind}:{queues}@{socket.gethostname()}:{os.getpid()}"[:128]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"beat-{kind}", daemon=True)

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

    def _run(self) -> None:
        import logging

        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # the database may be briefly away; try again
                logging.getLogger(__name__).warning("heartbeat not recorded: %s", exc)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        """Stop beating and remove the row (a clean stop is not a dead process)."""
        from screener.db.models import ProcessHeartbeat
        from screener.db.session import session_scope

        self._stop.set()
        try:
            with session_scope(self.database_url) as session:
                row = session.get(ProcessHeartbeat, self.name)
                if row is not None:
                    session.delete(row)
        except Exception:  # noqa: S110 - best effort at shutdown
            pass
