"""``GET /healthz``: do the database, the broker, the listener, the workers and (where one
runs) the reconciler answer?

Every check that talks to another process (database, broker) runs on a thread of its own
under one deadline: a peer that accepts connections but never answers (a frozen Redis) is
reported as failing within :data:`DEADLINE_S`, it never holds the answer. The heartbeat
files of this host and install (``workers.heartbeat``) add what the database rows cannot
say: a consumer that runs but whose work does not move, and the last passes of the
reconciler and of the delivery sweep beside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlmodel import select

from screener.db.models import ProcessHeartbeat, utcnow
from screener.db.session import session_scope
from screener.settings import Settings
from screener.timeutil import aware

if TYPE_CHECKING:
    from workers.heartbeat import HeartbeatState

log = logging.getLogger(__name__)

REQUIRED_QUEUES = ("prepare", "infer", "report", "deliver")
DEADLINE_S = 5.0  # the whole answer, whatever a peer does (container checks give up at 10 s)
BROKER_TIMEOUT_S = 3.0  # connect and each read of the broker check
# heartbeat files of this host's loops that say when their work stopped moving
STALL_FILES = {"infer": "infer"}

Checks = dict[str, str | None]


def check_database(settings: Settings) -> str | None:
    try:
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        return f"database does not answer: {type(exc).__name__}"
    return None


def _broker_options(url: str) -> dict[str, Any]:
    """Socket timeouts for a Redis broker: without them a Redis that accepts but never
    answers holds the check forever (kombu's ``connect_timeout`` bounds the connect only)."""
    if url.split("://", 1)[0] not in ("redis", "rediss", "redis+socket", "sentinel"):
        return {}
    return {
        "socket_timeout": BROKER_TIMEOUT_S,
        "socket_connect_timeout": BROKER_TIMEOUT_S,
    }


def check_broker(settings: Settings) -> str | None:
    from kombu import Connection

    url = settings.broker_url
    try:
        with Connection(
            url, connect_timeout=BROKER_TIMEOUT_S, transport_options=_broker_options(url)
        ) as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:
        return f"broker does not answer: {type(exc).__name__}"
    return None


def embedded_broker(url: str) -> bool:
    """The default broker: a file in the data folder (SQLAlchemy transport), nothing to
    reach over a network, so the start and ``status`` checks leave it out."""
    return not url or url.startswith("sqla+")


def _beats(settings: Settings) -> list[ProcessHeartbeat]:
    oldest = utcnow() - timedelta(seconds=settings.http.heartbeat_max_age_seconds)
    with session_scope(settings.database_url) as session:
        rows = session.exec(select(ProcessHeartbeat)).all()
    return [r for r in rows if aware(r.beat_at) >= oldest]


def _unreadable(exc: Exception) -> str:
    """Why the heartbeat rows cannot be read, for the ``unknown: ...`` of the checks."""
    message = str(exc).lower()
    missing = "no such table" in message or "does not exist" in message
    if missing and "process_heartbeats" in message:
        return "database not migrated yet (no process_heartbeats table)"
    return f"heartbeats not readable: {type(exc).__name__}"


def check_listener(beats: list[ProcessHeartbeat], alive: Callable[[], bool] | None) -> str | None:
    if alive is not None:  # in the serve process: ask the listener itself
        try:
            running = alive()
        except Exception as exc:
            return f"listener does not answer: {type(exc).__name__}"
        return None if running else "listener thread is not running"
    if any(b.kind == "listener" for b in beats):
        return None
    return "no listener heartbeat"


def check_workers(beats: list[ProcessHeartbeat]) -> str | None:
    served = {q for b in beats if b.kind == "worker" for q in b.queues.split(",")}
    missing = [q for q in REQUIRED_QUEUES if q not in served]
    return f"no live worker for queue(s) {', '.join(missing)}" if missing else None


def check_stuck_consumers(settings: Settings) -> str | None:
    """A consumer of this host that runs but says its work has not moved for longer than
    ``workers.stuck_after_seconds`` (a hung engine call): its database row ages out only
    later, and on its own says "no live worker"."""
    from workers.heartbeat import heartbeat_state

    limit = settings.workers.stuck_after_seconds
    stuck = []
    for queue, name in STALL_FILES.items():
        state = heartbeat_state(name, settings.data_dir)
        if state is not None and state.stuck_past(limit) and state.writer_alive:
            stuck.append(f"{queue} worker stuck: {state.stuck}")
    return "; ".join(stuck) or None


def _check_pass(what: str, state: HeartbeatState | None, limit: float) -> str | None:
    """How long ago a loop's last pass was (its heartbeat file), against ``limit``."""
    if state is None:
        return f"no {what} heartbeat"
    if state.age_s > limit:
        return f"{what}: last pass {state.age_s:.0f} s ago (limit {limit:.0f} s)"
    return None


def check_reconciler(settings: Settings, state: HeartbeatState | None) -> str | None:
    """How long ago the reconciler's last pass was (its heartbeat file): in ``serve`` it
    is the only path from received studies to jobs."""
    limit = max(settings.http.heartbeat_max_age_seconds, 2 * settings.reconciler.interval_seconds)
    return _check_pass("reconciler", state, limit)


def check_delivery_sweep(settings: Settings, state: HeartbeatState | None) -> str | None:
    """How long ago the delivery sweep's last pass was (its heartbeat file): the thread
    beside every reconciler that retries deliveries and settles the jobs waiting on them;
    dead, results stop reaching the PACS while the reconciler itself still passes."""
    limit = max(
        settings.http.heartbeat_max_age_seconds, 2 * settings.delivery.sweep_interval_seconds
    )
    return _check_pass("delivery sweep", state, limit)


def reconciler_checked(state: HeartbeatState | None, expected: bool) -> bool:
    """``expected``: a reconciler (and its delivery sweep) runs with this service
    (``serve``). Otherwise only a loop whose process still runs on this host is checked: a
    standalone ``screener web`` has none of its own, and the file a stopped one left is not
    a failure."""
    return expected or (state is not None and state.writer_alive)


def _processes(settings: Settings, alive: Callable[[], bool] | None) -> Checks:
    """The database, then (one read for both) the listener and the workers."""
    checks: Checks = {"database": check_database(settings)}
    if checks["database"] is not None:
        checks["listener"] = checks["workers"] = "unknown: database down"
        return checks
    try:
        beats = _beats(settings)
    except Exception as exc:  # e.g. the first start of serve, before the migration
        checks["listener"] = checks["workers"] = f"unknown: {_unreadable(exc)}"
        return checks
    checks["listener"] = check_listener(beats, alive)
    checks["workers"] = check_workers(beats)
    return checks


def _within(deadline_s: float, **tasks: Callable[[], Checks]) -> dict[str, Checks]:
    """Run ``tasks`` on daemon threads at once; the results of those done within
    ``deadline_s`` (a task that hangs is left behind, never waited for)."""
    results: dict[str, Checks] = {}

    def run(name: str, task: Callable[[], Checks]) -> None:
        try:
            results[name] = task()
        except Exception:  # the checks catch what they expect; this is a bug, reported late
            log.exception("health check %s failed", name)

    threads = [
        threading.Thread(target=run, args=(name, task), name=f"healthz-{name}", daemon=True)
        for name, task in tasks.items()
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return dict(results)


def health(
    settings: Settings,
    listener_alive: Callable[[], bool] | None = None,
    *,
    deadline_s: float = DEADLINE_S,
) -> dict[str, Any]:
    """``{"status": "ok"|"fail", "checks": {name: "ok" | reason}}``, within ``deadline_s``.
    Blocking: call it off the event loop. ``listener_alive`` is given inside ``serve``,
    which also runs a reconciler."""
    done = _within(
        deadline_s,
        processes=lambda: _processes(settings, listener_alive),
        broker=lambda: {"broker": check_broker(settings)},
    )
    late = f"did not answer within {deadline_s:g} s"
    checks: Checks = done.get("processes") or {
        "database": f"database {late}",
        "listener": "unknown: database did not answer",
        "workers": "unknown: database did not answer",
    }
    checks["broker"] = (done.get("broker") or {"broker": f"broker {late}"})["broker"]
    _add_host_checks(settings, checks, in_serve=listener_alive is not None)
    return _report(checks)


def _add_host_checks(settings: Settings, checks: Checks, *, in_serve: bool) -> None:
    """What this host's heartbeat files add (local files: quick, no deadline needed)."""
    from workers.heartbeat import heartbeat_state

    stuck = check_stuck_consumers(settings)
    if stuck:
        checks["workers"] = "; ".join(r for r in (checks.get("workers"), stuck) if r)
    # the reconciler's process: its passes and, on a thread beside them, the delivery sweep
    loops = (
        (heartbeat_state("reconciler", settings.data_dir), check_reconciler),
        (heartbeat_state("delivery-sweep", settings.data_dir), check_delivery_sweep),
    )
    judged = [
        check(settings, state) for state, check in loops if reconciler_checked(state, in_serve)
    ]
    if judged:
        checks["reconciler"] = "; ".join(r for r in judged if r) or None


def _report(checks: Checks) -> dict[str, Any]:
    """The JSON answer: checks in a fixed order, the failing ones named."""
    order = ("database", "broker", "listener", "workers", "reconciler")
    ordered = {name: checks[name] for name in order if name in checks}
    failing = [name for name, reason in ordered.items() if reason is not None]
    return {
        "status": "fail" if failing else "ok",
        "failing": failing,
        "checks": {name: reason or "ok" for name, reason in ordered.items()},
    }
