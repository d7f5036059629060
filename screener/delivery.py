"""Delivery of the screener's outputs to the PACS, with its state in the database.

Every written file becomes an ``OutputObject``; every output x configured destination a
``Delivery`` row that moves pending -> sending -> delivered, or -> retrying -> ... -> dead.
A failed row waits ``backoff_seconds * 2^(attempts-1)`` (capped at ``backoff_max_seconds``,
shortened by a random share up to ``backoff_jitter``) and is tried again until
``delivery.give_up_after_hours`` have passed since its first attempt: then it is a dead
letter (``delivery.max_attempts``, when not 0, is an extra cap on attempts per row).

Each destination has a circuit breaker in ``destination_health``, shared by every process
that sends: after ``breaker_failures`` consecutive failed associations the destination is
*down*; its rows are then left alone and one process at a time sends one row as a *probe*
when ``next_probe_at`` comes (the wait grows like the row backoff). A probe that stores
closes the breaker, makes the destination's waiting rows due at once, and the backlog
flows in the same pass. Nothing here waits for new jobs: the delivery sweep
(:func:`workers.reconciler.run_delivery_sweep`, run by ``screener serve`` and
``screener reconcile``) calls :func:`deliver_pending` and :func:`settle_jobs` every
``delivery.sweep_interval_seconds`` or sooner when something is due. The database is the
source of truth, so a crashed sender leaves rows in ``sending`` that are picked up again
once they are stale.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
from sqlalchemy import bindparam, case, func, or_, update
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from screener.db.models import (
    AuditLog,
    Delivery,
    DeliveryState,
    DestinationBreaker,
    JobState,
    OutputObject,
    ScreeningJob,
    table_of,
    utcnow,
)
from screener.db.session import get_engine, session_scope
from screener.dicom.sender import send_files
from screener.reports.common import PredecessorRef
from screener.settings import Destination, Settings
from screener.timeutil import aware

log = logging.getLogger(__name__)

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"})
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
DUE_STATES = (DeliveryState.PENDING.value, DeliveryState.RETRYING.value)
WAITING_STATES = (*DUE_STATES, DeliveryState.SENDING.value)

UP, DOWN, PROBING = "up", "down", "probing"  # breaker states (destination_health.state)
UNCONFIGURED = "unconfigured"  # deliveries wait for a destination the settings do not name
# Rows sent between two settlements: each chunk's outcome commits, and the claim on the rows
# still to send is renewed, so a long pass at a slow PACS is never taken for a crashed one.
SEND_CHUNK = 50


def output_kind(sop_class_uid: str) -> str:
    if sop_class_uid.startswith(SR_PREFIX):
        return "sr"
    if sop_class_uid in SC_CLASSES:
        return "sc"
    if sop_class_uid == PARAMETRIC_MAP:
        return "pmap"
    return "other"


def backoff_delay(attempts: int, settings: Settings, rng: random.Random | None = None) -> timedelta:
    """Wait after the ``attempts``-th failure: base * 2^(attempts-1), capped, with jitter.

    The jitter only shortens the wait (by up to ``backoff_jitter`` of it), so the cap holds
    and rows that failed together do not all come due in the same instant.
    """
    base = settings.delivery.backoff_seconds
    seconds = min(settings.delivery.backoff_max_seconds, base * (2 ** max(0, attempts - 1)))
    jitter = settings.delivery.backoff_jitter
    if jitter > 0:
        seconds *= 1.0 - jitter * (rng or random).random()
    return timedelta(seconds=seconds)


def _horizon(settings: Settings) -> timedelta:
    return timedelta(hours=settings.delivery.give_up_after_hours)


def _horizon_start(row: Delivery) -> datetime | None:
    return aware(row.first_attempt_at or row.created_at or row.updated_at)


# --------------------------------------------------------------------------- recording

# The statements of recording, built once: the report stage (serial in ``screener serve``)
# records every study's outputs, and the ORM's objects, flush and unit of work cost more
# CPU there than the database's own work.
_OUTPUTS = table_of(OutputObject)
_DELIVERIES = table_of(Delivery)
_KNOWN_OUTPUTS = sa_select(*_OUTPUTS.c).where(
    _OUTPUTS.c.sop_instance_uid.in_(bindparam("sops", expanding=True))
)
_INSERT_OUTPUTS = sa_insert(_OUTPUTS).returning(_OUTPUTS.c.id, _OUTPUTS.c.sop_instance_uid)
_RENEW_OUTPUTS = (
    update(_OUTPUTS)
    .where(_OUTPUTS.c.id == bindparam("renewed_id"))
    .values(job_id=bindparam("renewed_job"), file_path=bindparam("renewed_path"), pruned_at=None)
)
_QUEUED = sa_select(_DELIVERIES.c.output_id, _DELIVERIES.c.destination).where(
    _DELIVERIES.c.output_id.in_(bindparam("ids", expanding=True))
)
_INSERT_DELIVERIES = sa_insert(_DELIVERIES)
_INSERT_AUDIT = sa_insert(table_of(AuditLog))


class OutputHeader(NamedTuple):
    """What recording needs of a written file's header (the values pydicom reads)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def read_output_header(path: Path) -> OutputHeader:
    """The UIDs of a written file (pydicom raises for a file that is not DICOM, and
    AttributeError for a missing tag)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutputHeader(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
    )


def record_outputs(settings: Settings, job_id: int, paths: Iterable[Path]) -> list[OutputObject]:
    """Register written files and queue one delivery per configured destination.

    Idempotent: an output already known by its SOP Instance UID (an identical re-screen)
    keeps its row and its deliveries (the newest job and file become its own); what was
    delivered is not sent again. Returns the outputs in the order of ``paths``.

    Core statements built once, one per kind of work (not per output), in one
    transaction: a study recorded for the first time takes 4 (known outputs, new outputs
    with their ids, deliveries, audit row); a re-record adds the renewal of the known
    outputs and the deliveries they have.
    """
    named = [(str(path), read_output_header(path)) for path in map(Path, paths)]
    destinations = [d.name for d in settings.delivery.destinations]
    headers: dict[str, OutputHeader] = {}  # by SOP Instance UID: its first file's header
    newest_path: dict[str, str] = {}  # an output named twice: its last path is its file
    for path, header in named:
        headers.setdefault(header.sop_instance_uid, header)
        newest_path[header.sop_instance_uid] = path
    now = utcnow()
    with get_engine(settings.database_url).begin() as conn:
        outputs, known_ids = _store_outputs(conn, job_id, headers, newest_path, now)
        output_ids = [outputs[header.sop_instance_uid].id or 0 for _, header in named]
        _queue_deliveries(conn, output_ids, known_ids, destinations, now)
        conn.execute(
            _INSERT_AUDIT,
            {
                "at": now,
                "actor": "delivery",
                "action": "outputs.recorded",
                "study_instance_uid": named[0][1].study_instance_uid if named else None,
                "job_id": job_id,
                "detail": {"outputs": len(named), "destinations": destinations},
            },
        )
    return [outputs[header.sop_instance_uid] for _, header in named]


def _store_outputs(
    conn: Connection,
    job_id: int,
    headers: dict[str, OutputHeader],
    newest_path: dict[str, str],
    now: datetime,
) -> tuple[dict[str, OutputObject], list[int]]:
    """The output rows by SOP Instance UID, new ones inserted and known ones renewed, and
    the ids of those that were known already."""
    if not headers:
        return {}, []
    outputs: dict[str, OutputObject] = {}
    renewed: list[dict[str, Any]] = []
    for known in conn.execute(_KNOWN_OUTPUTS, {"sops": list(headers)}).mappings():
        sop = known["sop_instance_uid"]
        path = newest_path[sop]
        # identical re-screen: same UID, same content; the newest job and copy own it
        outputs[sop] = OutputObject(
            **{**known, "job_id": job_id, "file_path": path, "pruned_at": None}
        )
        if (known["job_id"], known["file_path"], known["pruned_at"]) != (job_id, path, None):
            renewed.append({"renewed_id": known["id"], "renewed_job": job_id, "renewed_path": path})
    known_ids = [output.id or 0 for output in outputs.values()]
    if renewed:  # nothing to write when the same job records the same files again
        conn.execute(_RENEW_OUTPUTS, renewed)
    new_rows: list[dict[str, Any]] = [
        {
            "job_id": job_id,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "sop_instance_uid": sop,
            "sop_class_uid": header.sop_class_uid,
            "kind": output_kind(header.sop_class_uid),
            "file_path": newest_path[sop],
            "created_at": now,
            "pruned_at": None,
        }
        for sop, header in headers.items()
        if sop not in outputs
    ]
    if new_rows:
        # RETURNING's rows need not come in the order of the parameters: matched by UID
        new_ids = {sop: new_id for new_id, sop in conn.execute(_INSERT_OUTPUTS, new_rows)}
        for values in new_rows:
            outputs[values["sop_instance_uid"]] = OutputObject(
                id=new_ids[values["sop_instance_uid"]], **values
            )
    return outputs, known_ids


def _queue_deliveries(
    conn: Connection,
    output_ids: list[int],
    known_ids: list[int],
    destinations: list[str],
    now: datetime,
) -> None:
    """One pending delivery per output and destination that has none yet (an output
    named twice is queued once). Only outputs known before can have deliveries."""
    if not destinations:
        return
    queued: set[tuple[int, str]] = (
        {
            (int(output_id), str(name))
            for output_id, name in conn.execute(_QUEUED, {"ids": known_ids})
        }
        if known_ids
        else set()
    )
    rows: list[dict[str, Any]] = []
    for output_id in output_ids:
        for name in destinations:
            if (output_id, name) not in queued:
                queued.add((output_id, name))
                rows.append(
                    {
                        "output_id": output_id,
                        "destination": name,
                        "state": DeliveryState.PENDING.value,
                        "attempts": 0,
                        "last_error": None,
                        "next_attempt_at": None,
                        "delivered_at": None,
                        "updated_at": now,
                        "created_at": now,
                        "first_attempt_at": None,
                    }
                )
    if rows:
        conn.execute(_INSERT_DELIVERIES, rows)


def previous_outputs_for_study(
    settings: Settings, study_instance_uid: str, exclude_job_id: int | None = None
) -> list[PredecessorRef]:
    """SRs written for this study by earlier jobs: the Predecessor Documents of a re-screen."""
    with session_scope(settings.database_url) as session:
        query = select(OutputObject).where(
            OutputObject.study_instance_uid == study_instance_uid,
            OutputObject.kind == "sr",
        )
        if exclude_job_id is not None:
            query = query.where(OutputObject.job_id != exclude_job_id)
        rows = session.exec(query.order_by(col(OutputObject.id))).all()
        return [
            PredecessorRef(
                study_instance_uid=r.study_instance_uid,
                series_instance_uid=r.series_instance_uid,
                sop_instance_uid=r.sop_instance_uid,
                sop_class_uid=r.sop_class_uid,
            )
            for r in rows
            if r.series_instance_uid
        ]


# --------------------------------------------------------------------------- breaker


def _breaker_view(
    session: Session, names: Iterable[str], now: datetime, stale_before: datetime
) -> tuple[set[str], set[str]]:
    """(destinations not up, of those the ones whose probe is due now).

    Creates the missing ``destination_health`` rows of ``names`` (racing inserts of other
    processes are skipped by ON CONFLICT DO NOTHING): one SELECT when all exist.
    """
    blocked: set[str] = set()
    probe_due: set[str] = set()
    breakers = session.exec(select(DestinationBreaker)).all()
    missing = sorted(set(names) - {b.name for b in breakers})
    if missing:
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        session.execute(
            insert(DestinationBreaker)
            .values([{"name": name, "state": UP} for name in missing])
            .on_conflict_do_nothing(index_elements=["name"])
        )
    for b in breakers:
        if b.state == UP:
            continue
        blocked.add(b.name)
        next_probe = aware(b.next_probe_at)
        started = aware(b.probe_started_at)
        if (b.state == DOWN and (next_probe is None or next_probe <= now)) or (
            b.state == PROBING and (started is None or started < stale_before)
        ):
            probe_due.add(b.name)
    return blocked, probe_due


def _take_probe(settings: Settings, name: str, now: datetime, stale_before: datetime) -> bool:
    """Compare-and-set down -> probing: exactly one process probes a down destination."""
    with session_scope(settings.database_url) as session:
        result = session.execute(
            update(DestinationBreaker)
            .where(
                col(DestinationBreaker.name) == name,
                or_(
                    (col(DestinationBreaker.state) == DOWN)
                    & (
                        col(DestinationBreaker.next_probe_at).is_(None)
                        | (col(DestinationBreaker.next_probe_at) <= now)
                    ),
                    (col(DestinationBreaker.state) == PROBING)
                    & (
                        col(DestinationBreaker.probe_started_at).is_(None)
                        | (col(DestinationBreaker.probe_started_at) < stale_before)
                    ),
                ),
            )
            .values(state=PROBING, probe_started_at=now, updated_at=now)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _give_back_probe(settings: Settings, name: str, now: datetime) -> None:
    """Nothing to probe with: back to down, probe again as soon as a row waits."""
    with session_scope(settings.database_url) as session:
        session.execute(
            update(DestinationBreaker)
            .where(col(DestinationBreaker.name) == name, col(DestinationBreaker.state) == PROBING)
            .values(state=DOWN, probe_started_at=None, updated_at=now)
        )


def _record_destination(
    session: Session,
    settings: Settings,
    name: str,
    error: str | None,
    now: datetime,
    *,
    probe: bool,
) -> None:
    """Feed one association's outcome to the destination's breaker (row locked meanwhile).

    The usual case, a healthy destination that stored again, is one conditional UPDATE.
    """
    if error is None:
        healthy = session.execute(
            update(DestinationBreaker)
            .where(
                col(DestinationBreaker.name) == name,
                col(DestinationBreaker.state) == UP,
                col(DestinationBreaker.consecutive_failures) == 0,
            )
            .values(last_success_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if healthy.rowcount == 1:  # type: ignore[attr-defined]
            return
    # the breaker changes state: read it under a row lock
    b = session.exec(
        select(DestinationBreaker).where(col(DestinationBreaker.name) == name).with_for_update()
    ).first()
    if b is None:
        b = DestinationBreaker(name=name)
    if error is None:
        was_failing = b.state != UP or b.consecutive_failures > 0
        if b.state != UP:
            down_since = aware(b.down_since)
            log.warning(
                "destination %s is up again after %.0f s down",
                name,
                0.0 if down_since is None else (now - down_since).total_seconds(),
            )
            session.add(
                AuditLog(
                    actor="delivery",
                    action="destination.up",
                    detail={"destination": name, "down_since": str(b.down_since)},
                )
            )
        b.state, b.consecutive_failures, b.last_error = UP, 0, None
        b.down_since = b.next_probe_at = b.probe_started_at = None
        b.last_success_at = b.updated_at = now
        if was_failing:
            # the rows waited for the destination, not for themselves: send them now
            session.execute(
                update(Delivery)
                .where(
                    col(Delivery.destination) == name,
                    col(Delivery.state) == DeliveryState.RETRYING.value,
                )
                .values(next_attempt_at=now)
            )
    else:
        b.consecutive_failures += 1
        b.last_error = error[:2000]
        b.last_failure_at = b.updated_at = now
        if probe or b.state != UP or b.consecutive_failures >= settings.delivery.breaker_failures:
            if b.state == UP:
                b.down_since = now
                log.warning(
                    "destination %s is down after %d failed associations; probing it alone",
                    name,
                    b.consecutive_failures,
                )
                session.add(
                    AuditLog(
                        actor="delivery",
                        action="destination.down",
                        detail={"destination": name, "error": b.last_error},
                    )
                )
            b.state = DOWN
            b.probe_started_at = None
            excess = b.consecutive_failures - settings.delivery.breaker_failures + 1
            b.next_probe_at = now + backoff_delay(max(1, excess), settings)
    session.add(b)


# --------------------------------------------------------------------------- sending


@dataclass
class DeliverySummary:
    """What one ``deliver_pending`` pass did (also logged and shown by the CLI)."""

    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    probes: int = 0  # single-row attempts on a destination that was down
    down: list[str] = field(default_factory=list)  # destinations skipped: breaker open
    errors: dict[str, str] = field(default_factory=dict)  # destination -> last error

    def to_json(self) -> dict[str, object]:
        return {
            "attempted": self.attempted,
            "delivered": self.delivered,
            "retrying": self.retrying,
            "dead": self.dead,
            "probes": self.probes,
            "down": list(self.down),
            "errors": dict(self.errors),
        }


@dataclass(frozen=True)
class _Claimed:
    """A delivery row this process now owns (state ``sending``), with its file."""

    id: int
    destination: str
    path: Path | None  # None: its output row is gone


def _claim(
    session: Session,
    now: datetime,
    stale_before: datetime,
    limit: int,
    *,
    exclude: Iterable[str] = (),
    only: str | None = None,
) -> list[_Claimed]:
    """Mark up to ``limit`` due rows as sending; returns the rows this process now owns.

    One ``WITH picked AS (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED) UPDATE ... WHERE id IN
    picked AND <due> RETURNING``
    and one SELECT of the files, however many rows: the due condition is checked again on
    each row as it is updated, so two senders never both own a row (PostgreSQL re-reads a
    row another transaction changed; SQLite has one writer at a time).

    ``only`` (a probe) takes the oldest waiting row of one destination even if its own
    backoff has not run out: the breaker, not the row, decides when a down PACS is tried.
    """
    stale_sending = (col(Delivery.state) == DeliveryState.SENDING.value) & (
        col(Delivery.updated_at) < stale_before
    )
    if only is None:
        due = or_(
            (col(Delivery.state).in_(DUE_STATES))
            & (col(Delivery.next_attempt_at).is_(None) | (col(Delivery.next_attempt_at) <= now)),
            stale_sending,
        )
        excluded = list(exclude)
        if excluded:
            due = due & col(Delivery.destination).not_in(excluded)
    else:
        due = (col(Delivery.destination) == only) & or_(
            col(Delivery.state).in_(DUE_STATES), stale_sending
        )
    pick = (
        sa_select(col(Delivery.id))
        .where(due)
        .order_by(col(Delivery.id))
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has no row locks to skip
        .cte("picked")  # evaluated once: an IN (subquery) may be re-scanned past its LIMIT
    )
    owned = session.execute(
        update(Delivery)
        .where(col(Delivery.id).in_(sa_select(pick.c.id)), due)
        .values(state=DeliveryState.SENDING.value, updated_at=now)
        .returning(col(Delivery.id), col(Delivery.destination), col(Delivery.output_id))
        .execution_options(synchronize_session=False)
    ).all()
    if not owned:
        return []
    paths = dict(
        session.execute(
            sa_select(col(OutputObject.id), col(OutputObject.file_path)).where(
                col(OutputObject.id).in_({int(output_id) for _, _, output_id in owned})
            )
        ).all()
    )
    return [
        _Claimed(
            id=int(delivery_id),
            destination=str(name),
            path=Path(paths[output_id]) if output_id in paths else None,
        )
        for delivery_id, name, output_id in sorted(owned)
    ]


def deliver_pending(
    settings: Settings, now: datetime | None = None, limit: int = 500
) -> DeliverySummary:
    """Send what is due (at most ``limit`` rows) to each destination, in this pass.

    Destinations that are down get one probe row, from one process at a time; the others
    get all their due rows, over the association the sender keeps open per destination
    (``delivery.association_idle_seconds``). Safe to run in several processes at once.
    Database cost with every destination up: two transactions for the reads and the
    claim, one per destination and :data:`SEND_CHUNK` rows to settle.
    """
    now = aware(now) or utcnow()
    stale_before = now - timedelta(seconds=settings.reconciler.stale_seconds)
    summary = DeliverySummary()
    configured = {d.name: d for d in settings.delivery.destinations}
    claimed: list[_Claimed] | None = None
    with session_scope(settings.database_url) as session:
        blocked, probe_due = _breaker_view(session, configured, now, stale_before)
        if not probe_due:  # the usual pass: claim in the same transaction
            claimed = _claim(session, now, stale_before, limit, exclude=blocked & set(configured))

    for name in sorted(probe_due):
        destination = configured.get(name)
        if destination is None or not _take_probe(settings, name, now, stale_before):
            continue
        with session_scope(settings.database_url) as session:
            probe_rows = _claim(session, now, stale_before, 1, only=name)
        if not probe_rows:
            _give_back_probe(settings, name, now)
            continue
        summary.probes += 1
        if _send_and_settle(settings, destination, name, probe_rows, now, summary, probe=True):
            blocked.discard(name)  # up again: its backlog goes in this same pass
    summary.down = sorted(blocked & set(configured))

    if claimed is None:
        with session_scope(settings.database_url) as session:
            claimed = _claim(session, now, stale_before, limit, exclude=blocked & set(configured))
    work: dict[str, list[_Claimed]] = defaultdict(list)
    for row in claimed:
        work[row.destination].append(row)
    for name, rows in work.items():
        _send_and_settle(settings, configured.get(name), name, rows, now, summary, probe=False)
    if summary.attempted or summary.down:
        log.info("delivery pass: %s", summary.to_json())
    return summary


def _send_and_settle(
    settings: Settings,
    destination: Destination | None,
    name: str,
    rows: list[_Claimed],
    now: datetime,
    summary: DeliverySummary,
    *,
    probe: bool,
) -> bool:
    """Send ``rows`` and record the outcome; True when the destination stored something."""
    errors: dict[int, str | None] = {
        r.id: "its output is no longer recorded" for r in rows if r.path is None
    }
    items = [(r.id, r.path) for r in rows if r.path is not None]
    if destination is None:
        # A start without the site's destination settings (a forgotten env file, a test
        # `serve` on the production data folder) must not dead-letter the backlog: the rows
        # wait as for a PACS that is down, and die only past the give-up horizon.
        if items:
            log.warning(
                "%d deliveries to %s wait: that destination is not configured "
                "(delivery.destinations); they are dead-lettered after the give-up horizon",
                len(items),
                name,
            )
        waiting: dict[int, str | None] = {
            i: f"destination {name} is not configured (delivery.destinations)" for i, _ in items
        }
        with session_scope(settings.database_url) as session:
            if errors:  # their output is gone: nothing to wait for
                _settle_rows(session, settings, name, errors, now, summary, final=True)
            _settle_rows(session, settings, name, waiting, now, summary)
        return False
    started = time.monotonic()
    destination_error: str | None = None
    for start in range(0, max(len(items), 1), SEND_CHUNK):
        chunk, rest = items[start : start + SEND_CHUNK], items[start + SEND_CHUNK :]
        sent, destination_error = _send(settings, destination, chunk) if chunk else ({}, None)
        errors.update(sent)
        if destination_error is not None:  # the rest would fail alike: not tried
            errors.update({i: destination_error for i, _ in rest})
            rest = []
        with session_scope(settings.database_url) as session:
            _record_destination(session, settings, name, destination_error, now, probe=probe)
            _settle_rows(session, settings, name, errors, now, summary)
            # still ours: a pass at a slow PACS outlasting stale_seconds must not let
            # another sender reclaim (and send again) what this one is about to send
            _touch_sending(session, [i for i, _ in rest], now, time.monotonic() - started)
        errors = {}
        if destination_error is not None:
            break
    if destination_error is not None and probe:
        _expire_destination(settings, name, destination_error, now, summary)
    return destination_error is None


def _touch_sending(session: Session, ids: list[int], now: datetime, elapsed: float) -> None:
    """Renew the claim of rows this pass still holds (``updated_at`` as of now in the pass's
    clock: ``now`` plus the seconds the pass has run)."""
    if ids:
        session.execute(
            update(Delivery)
            .where(col(Delivery.id).in_(ids), col(Delivery.state) == DeliveryState.SENDING.value)
            .values(updated_at=now + timedelta(seconds=elapsed))
            .execution_options(synchronize_session=False)
        )


def _send(
    settings: Settings, destination: Destination, items: Sequence[tuple[int, Path]]
) -> tuple[dict[int, str | None], str | None]:
    """Per-row errors, and the destination's error (None: the association worked).

    A peer that answers refuses objects, not the link: a refusal (a SOP class it does not
    take, an error status) fails that row alone, which retries on its own backoff. Counting
    it against the destination let one object the PACS will never take (a Parametric Map
    at a PACS without that class) open the breaker, be chosen as every probe (the oldest
    waiting row) and keep the destination down until the horizon made dead letters of
    the later studies' outputs, none of them ever tried. Only "out of resources" (A7xx),
    with nothing stored, is the PACS's own state: the destination waits as if down."""
    try:
        outcome = send_files(
            destination,
            [p for _, p in items],
            calling_ae_title=settings.listener.ae_title,
            idle_seconds=settings.delivery.association_idle_seconds,
        )
    except Exception as exc:  # never let one destination break the pass
        log.exception("sending to %s failed", destination.name)
        error = f"sender error: {exc}"
        return {i: error for i, _ in items}, error
    errors = {i: outcome.per_file.get(p, "not attempted") for i, p in items}
    if outcome.association_error is not None:
        return errors, f"{destination.name}: {outcome.association_error}"
    if outcome.out_of_resources and not outcome.stored:  # a full PACS: the breaker waits
        return errors, next(iter(outcome.failed.values()), "refused: out of resources")
    return errors, None


def _dead(
    session: Session, row: Delivery, destination: str, error: str, summary: DeliverySummary
) -> None:
    row.state = DeliveryState.DEAD.value
    row.last_error = error[:2000]
    row.next_attempt_at = None
    summary.dead += 1
    summary.errors[destination] = error
    session.add(
        AuditLog(
            actor="delivery",
            action="delivery.dead",
            detail={
                "delivery_id": row.id,
                "destination": destination,
                "attempts": row.attempts,
                "error": error,
            },
        )
    )


def _settle_rows(
    session: Session,
    settings: Settings,
    destination: str,
    errors: dict[int, str | None],
    now: datetime,
    summary: DeliverySummary,
    *,
    final: bool = False,
) -> None:
    """Record one attempt of each row: delivered rows in one UPDATE, the failed ones (their
    backoff and horizon differ per row) after one SELECT of them."""
    ok = sorted(i for i, error in errors.items() if error is None)
    failed = {i: error for i, error in errors.items() if error is not None}
    if ok:
        delivered = session.execute(
            update(Delivery)
            .where(col(Delivery.id).in_(ok))
            .values(
                state=DeliveryState.DELIVERED.value,
                delivered_at=now,
                last_error=None,
                next_attempt_at=None,
                attempts=col(Delivery.attempts) + 1,
                first_attempt_at=func.coalesce(col(Delivery.first_attempt_at), now),
                updated_at=now,
            )
            .returning(col(Delivery.id))
            .execution_options(synchronize_session=False)
        ).all()
        ids = sorted(int(i) for (i,) in delivered)
        summary.attempted += len(ids)
        summary.delivered += len(ids)
        if ids:
            log.info("%d deliveries to %s delivered", len(ids), destination)
            log.debug("delivered to %s: delivery ids %s", destination, ids)
            session.add(
                AuditLog(
                    actor="delivery",
                    action="delivery.delivered",
                    detail={"destination": destination, "delivery_ids": ids},
                )
            )
    if not failed:
        return
    max_attempts = settings.delivery.max_attempts
    horizon = _horizon(settings)
    rows = session.exec(select(Delivery).where(col(Delivery.id).in_(sorted(failed)))).all()
    for row in sorted(rows, key=lambda r: r.id or 0):
        error = failed[int(row.id or 0)]
        summary.attempted += 1
        row.attempts += 1
        row.updated_at = now
        if row.first_attempt_at is None:
            row.first_attempt_at = now
        started = _horizon_start(row) or now
        if final or (max_attempts and row.attempts >= max_attempts):
            _dead(session, row, destination, error, summary)
        elif now - started >= horizon:
            _dead(session, row, destination, _gave_up(settings, error), summary)
        else:
            row.state = DeliveryState.RETRYING.value
            row.last_error = error[:2000]
            row.next_attempt_at = now + backoff_delay(row.attempts, settings)
            summary.retrying += 1
            summary.errors[destination] = error
        session.add(row)
        log.info(
            "delivery %s (output %s) to %s: %s after %d attempt(s)",
            row.id,
            row.output_id,
            destination,
            row.state,
            row.attempts,
        )


def _gave_up(settings: Settings, error: str) -> str:
    return f"gave up after {settings.delivery.give_up_after_hours:g} h: {error}"


def _expire_destination(
    settings: Settings, name: str, error: str, now: datetime, summary: DeliverySummary
) -> None:
    """A probe failed: rows of that destination older than the horizon become dead letters."""
    cutoff = now - _horizon(settings)
    started = func.coalesce(Delivery.first_attempt_at, Delivery.created_at, Delivery.updated_at)
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(Delivery).where(
                col(Delivery.destination) == name,
                col(Delivery.state).in_(DUE_STATES),
                started < cutoff,
            )
        ).all()
        for row in rows:
            row.updated_at = now
            _dead(session, row, name, _gave_up(settings, error), summary)
            session.add(row)


def next_due(settings: Settings) -> datetime | None:
    """When the sweep has something to do next: a row's retry or a down destination's probe."""
    with session_scope(settings.database_url) as session:
        breakers = session.exec(select(DestinationBreaker)).all()
        down = [b.name for b in breakers if b.state != UP]
        backlog = set(
            session.exec(
                select(Delivery.destination)
                .where(col(Delivery.state).in_(DUE_STATES), col(Delivery.destination).in_(down))
                .distinct()
            ).all()
        )
        # a down destination is probed only when something waits for it
        moments = [
            aware(b.next_probe_at) for b in breakers if b.state == DOWN and b.name in backlog
        ]
        waiting = select(Delivery.id, Delivery.next_attempt_at).where(
            col(Delivery.state).in_(DUE_STATES)
        )
        if down:
            waiting = waiting.where(col(Delivery.destination).not_in(down))
        # NULL (due at once) sorts first on both backends with this key
        first = session.exec(
            waiting.order_by(
                col(Delivery.next_attempt_at).is_not(None), col(Delivery.next_attempt_at)
            )
        ).first()
    if first is not None:  # a row waits: at its retry time, or now when it has none
        moments.append(aware(first[1]) or utcnow())
    known = [m for m in moments if m is not None]
    return min(known) if known else None


# --------------------------------------------------------------------------- job states


@dataclass
class SettledJobs:
    delivered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.delivered or self.failed)


def dead_letter_reason(settings: Settings, job_id: int) -> str | None:
    """The failure reason of a job with a dead delivery (None: none is dead)."""
    with session_scope(settings.database_url) as session:
        row = session.exec(
            select(Delivery.destination, Delivery.last_error)
            .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
            .where(OutputObject.job_id == job_id, col(Delivery.state) == DeliveryState.DEAD.value)
            .order_by(col(Delivery.id))
        ).first()
    if row is None:
        return None
    return f"delivery to {row[0]} dead-lettered: {row[1] or 'unknown error'}"


def settle_jobs(settings: Settings, now: datetime | None = None) -> SettledJobs:
    """Job states follow their deliveries.

    A job waiting in ``reported`` (or ``failed`` earlier because a delivery was given up,
    then re-queued by ``deliveries retry``) whose every output was acknowledged by every
    destination becomes ``delivered``; a ``reported`` job with a dead delivery becomes
    ``failed`` with the reason. All moves are compare-and-set: a deliver task that holds
    the job (``delivering``) is left alone.
    """
    now = aware(now) or utcnow()
    settled = SettledJobs()
    delivered_n = func.sum(case((col(Delivery.state) == DeliveryState.DELIVERED.value, 1), else_=0))
    dead_n = func.sum(case((col(Delivery.state) == DeliveryState.DEAD.value, 1), else_=0))
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            sa_select(
                col(ScreeningJob.id), col(ScreeningJob.state), func.count(), delivered_n, dead_n
            )
            .join(OutputObject, col(OutputObject.job_id) == col(ScreeningJob.id))
            .join(Delivery, col(Delivery.output_id) == col(OutputObject.id))
            .where(col(ScreeningJob.state).in_([JobState.REPORTED.value, JobState.FAILED.value]))
            .group_by(col(ScreeningJob.id), col(ScreeningJob.state))
        ).all()
    for job_id, state, total, delivered, dead in rows:
        assert job_id is not None
        if int(delivered or 0) == int(total):
            if _move_job(settings, job_id, state, JobState.DELIVERED, now, reason=None):
                settled.delivered.append(job_id)
        elif int(dead or 0) and state == JobState.REPORTED.value:
            reason = dead_letter_reason(settings, job_id) or "delivery dead-lettered"
            if _move_job(settings, job_id, state, JobState.FAILED, now, reason=reason):
                settled.failed.append(job_id)
    return settled


def _move_job(
    settings: Settings,
    job_id: int,
    from_state: str,
    to_state: JobState,
    now: datetime,
    *,
    reason: str | None,
) -> bool:
    with session_scope(settings.database_url) as session:
        result = session.execute(
            update(ScreeningJob)
            .where(col(ScreeningJob.id) == job_id, col(ScreeningJob.state) == from_state)
            .values(state=to_state.value, reason=reason, updated_at=now)
        )
        moved = bool(result.rowcount == 1)  # type: ignore[attr-defined]
        if moved:
            action = "job.delivered" if to_state == JobState.DELIVERED else "job.failed"
            session.add(
                AuditLog(
                    actor="delivery",
                    action=action,
                    job_id=job_id,
                    detail={"from": from_state, "reason": reason},
                )
            )
    if moved:
        log.info("job %s: %s -> %s (deliveries)", job_id, from_state, to_state.value)
    return moved


# --------------------------------------------------------------------------- health


@dataclass(frozen=True)
class DestinationHealth:
    """One destination as operators see it (``screener status``, the web console)."""

    name: str
    state: str  # up | down | probing
    consecutive_failures: int
    last_error: str | None
    down_since: datetime | None
    next_probe_at: datetime | None
    last_success_at: datetime | None
    pending: int  # pending, retrying or sending
    dead: int

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = dict(self.__dict__)
        for key in ("down_since", "next_probe_at", "last_success_at"):
            value = aware(getattr(self, key))
            data[key] = None if value is None else value.isoformat()
        return data


def destination_health(
    settings: Settings, session: Session | None = None
) -> list[DestinationHealth]:
    """Breaker state and backlog of every configured destination, then of every destination
    not configured that deliveries still wait for (state ``unconfigured``); a pure read."""
    if session is None:
        with session_scope(settings.database_url) as own:
            return destination_health(settings, own)
    breakers = {b.name: b for b in session.exec(select(DestinationBreaker)).all()}
    counts: dict[tuple[str, str], int] = {
        (str(d), str(s)): int(n)
        for d, s, n in session.exec(
            select(Delivery.destination, Delivery.state, func.count()).group_by(
                col(Delivery.destination), col(Delivery.state)
            )
        ).all()
    }
    out: list[DestinationHealth] = []
    for destination in settings.delivery.destinations:
        name = destination.name
        b = breakers.get(name)
        out.append(
            DestinationHealth(
                name=name,
                state=UP if b is None else b.state,
                consecutive_failures=0 if b is None else b.consecutive_failures,
                last_error=None if b is None else b.last_error,
                down_since=None if b is None else aware(b.down_since),
                next_probe_at=None if b is None else aware(b.next_probe_at),
                last_success_at=None if b is None else aware(b.last_success_at),
                pending=sum(counts.get((name, s), 0) for s in WAITING_STATES),
                dead=counts.get((name, DeliveryState.DEAD.value), 0),
            )
        )
    configured = {d.name for d in settings.delivery.destinations}
    waiting = sorted(
        {d for (d, s), n in counts.items() if s in WAITING_STATES and n and d not in configured}
    )
    for name in waiting:  # not sent until configured again: shown, so it is not forgotten
        out.append(
            DestinationHealth(
                name=name,
                state=UNCONFIGURED,
                consecutive_failures=0,
                last_error=f"destination {name} is not configured (delivery.destinations)",
                down_since=None,
                next_probe_at=None,
                last_success_at=None,
                pending=sum(counts.get((name, s), 0) for s in WAITING_STATES),
                dead=counts.get((name, DeliveryState.DEAD.value), 0),
            )
        )
    return out


# --------------------------------------------------------------------------- admin


def delivery_states(settings: Settings, ids: Sequence[int]) -> dict[int, str]:
    """The state of each of ``ids`` that exists."""
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(Delivery.id, Delivery.state).where(col(Delivery.id).in_(list(ids)))
        ).all()
    return {int(i): str(state) for i, state in rows if i is not None}


def retry_dead(settings: Settings, ids: Sequence[int] | None = None) -> int:
    """Re-queue dead letters (all), or the given ids when dead, retrying or pending.

    Re-queued rows start a fresh horizon and are due at once; a destination they wait for
    that is down gets its probe now (the operator says it is back). The sweep sends them.
    """
    now = utcnow()
    where: list[Any]
    if ids:
        # never a delivered row (no duplicates) nor one being sent right now
        allowed = [
            DeliveryState.DEAD.value,
            DeliveryState.RETRYING.value,
            DeliveryState.PENDING.value,
        ]
        where = [col(Delivery.id).in_(list(ids)), col(Delivery.state).in_(allowed)]
    else:
        where = [col(Delivery.state) == DeliveryState.DEAD.value]
    with session_scope(settings.database_url) as session:
        destinations = set(session.exec(select(Delivery.destination).where(*where)).all())
        result = session.execute(
            update(Delivery)
            .where(*where)
            .values(
                state=DeliveryState.PENDING.value,
                attempts=0,
                next_attempt_at=None,
                first_attempt_at=None,
                created_at=now,
                updated_at=now,
            )
        )
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if count and destinations:
            session.execute(
                update(DestinationBreaker)
                .where(
                    col(DestinationBreaker.name).in_(list(destinations)),
                    col(DestinationBreaker.state) == DOWN,
                )
                .values(next_probe_at=now, updated_at=now)
            )
        session.add(
            AuditLog(
                actor="cli",
                action="delivery.retry",
                detail={"ids": list(ids or []), "requeued": count},
            )
        )
    return count


@dataclass
class DeliveryRow:
    """One delivery as the CLI shows it."""

    id: int
    destination: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    kind: str
    sop_instance_uid: str
    study_instance_uid: str
    job_id: int

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        for key in ("next_attempt_at", "delivered_at"):
            value = aware(data[key])
            data[key] = None if value is None else value.isoformat()
        return data


def list_deliveries(
    settings: Settings, states: Sequence[str] | None = None, limit: int = 1000
) -> list[DeliveryRow]:
    with session_scope(settings.database_url) as session:
        query = select(Delivery, OutputObject).join(
            OutputObject, col(OutputObject.id) == col(Delivery.output_id)
        )
        if states:
            query = query.where(col(Delivery.state).in_(list(states)))
        rows = session.exec(query.order_by(col(Delivery.id).desc()).limit(limit)).all()
        return [
            DeliveryRow(
                id=int(d.id or 0),
                destination=d.destination,
                state=d.state,
                attempts=d.attempts,
                last_error=d.last_error,
                next_attempt_at=aware(d.next_attempt_at),
                delivered_at=aware(d.delivered_at),
                kind=o.kind,
                sop_instance_uid=o.sop_instance_uid,
                study_instance_uid=o.study_instance_uid,
                job_id=o.job_id,
            )
            for d, o in rows
        ]


def job_delivered(settings: Settings, job_id: int) -> bool | None:
    """True when every delivery of the job's outputs is delivered; None if it has none."""
    with session_scope(settings.database_url) as session:
        states = session.exec(
            select(Delivery.state)
            .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
            .where(OutputObject.job_id == job_id)
        ).all()
    if not states:
        return None
    return all(s == DeliveryState.DELIVERED.value for s in states)
