"""Liveness files for long-running loops that are not Celery workers (container health checks).

The batching consumer and the reconciler touch ``/tmp/pacs-screener-<name>.heartbeat``
every pass; ``screener heartbeat NAME --max-age S`` exits 0 while the file is fresh.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def heartbeat_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"pacs-screener-{name}.heartbeat"


class Heartbeat:
    """Touch the file at most once per ``every_s`` seconds (cheap enough for any loop)."""

    def __init__(self, name: str, every_s: float = 5.0) -> None:
        self.path = heartbeat_path(name)
        self.every_s = every_s
        self._last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self.path.touch()
            os.utime(self.path)
            self._last = now


def heartbeat_age(name: str) -> float | None:
    """Seconds since the last beat, or None when there never was one."""
    path = heartbeat_path(name)
    if not path.exists():
        return None
    return max(0.0, time.time() - path.stat().st_mtime)
