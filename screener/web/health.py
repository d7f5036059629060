"""``GET /healthz``: do the database, the broker, the listener and the workers answer?"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel import select

from screener.db.models import ProcessHeartbeat, utcnow
from screener.db.session import session_scope
from screener.settings import Settings
from screener.timeutil import aware

REQUIRED_QUEUES = ("prepare", "infer", "report", "deliver")


def check_database(settings: Settings) -> str | None:
    try:
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        return f"database does not answer: {type(exc).__name__}"
    return None


def check_broker(settings: Settings) -> str | None:
    from kombu import Connection

    try:
        with Connection(settings.broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        return f"broker does not answer: {type(exc).__name__}"
    return None


def _beats(settings: Settings) -> list[ProcessHeartbeat]:
    oldest = utcnow() - timedelta(seconds=settings.http.heartbeat_max_age_seconds)
    with session_scope(settings.database_url) as session:
        rows = session.exec(select(ProcessHeartbeat)).all()
    return [r for r in rows if aware(r.beat_at) >= oldest]


def check_listener(beats: list[ProcessHeartbeat], alive: Callable[[], bool] | None) -> str | None:
    if alive is not None:  # in the serve process: ask the listener itself
        return None if alive() else "listener thread is not running"
    if any(b.kind == "listener" for b in beats):
        return None
    return "no listener heartbeat"


def check_workers(beats: list[ProcessHeartbeat]) -> str | None:
    served = {q for b in beats if b.kind == "worker" for q in b.queues.split(",")}
    missing = [q for q in REQUIRED_QUEUES if q not in served]
    return f"no live worker for queue(s) {', '.join(missing)}" if missing else None


def health(settings: Settings, listener_alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """``{"status": "ok"|"fail", "checks": {name: "ok" | reason}}``."""
    checks: dict[str, str | None] = {"database": check_database(settings)}
    checks["broker"] = check_broker(settings)
    if checks["database"] is None:
        beats = _beats(settings)  # one read for both checks
        checks["listener"] = check_listener(beats, listener_alive)
        checks["workers"] = check_workers(beats)
    else:
        checks["listener"] = checks["workers"] = "unknown: database down"
    failing = [name for name, reason in checks.items() if reason is not None]
    return {
        "status": "fail" if failing else "ok",
        "failing": failing,
        "checks": {name: reason or "ok" for name, reason in checks.items()},
    }
