"""Database tables: the source of truth of what arrived, what was screened and delivered.

Changes to these tables go with an Alembic migration in ``screener/db/migrations``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, LargeBinary, Table, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def table_of(model: type[SQLModel]) -> Table:
    """A model's Core table, for statements built once on hot paths (no ORM objects)."""
    table = model.__table__  # type: ignore[attr-defined]  # set by the declarative mapping
    assert isinstance(table, Table)
    return table


class JobState(enum.StrEnum):
    """Screening job life cycle. Terminal: delivered, completed, ignored, failed, superseded."""

    RECEIVED = "received"  # instances arriving, study not yet complete
    COMPLETE = "complete"  # quiet period over; job about to be queued
    QUEUED = "queued"  # hand-off point to the workers
    PREPARING = "preparing"
    PREPARED = "prepared"  # input tensors written; waiting for the batching consumer
    INFERRING = "inferring"
    INFERRED = "inferred"
    REPORTING = "reporting"
    REPORTED = "reported"  # SR/SC in outbox
    DELIVERING = "delivering"
    DELIVERED = "delivered"  # every output acknowledged by every configured destination
    COMPLETED = "completed"  # reported, and no destination is configured
    IGNORED = "ignored"  # nothing screenable in the study: no output objects, reason recorded
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer job for the same study replaced this one


TERMINAL_STATES = frozenset(
    {
        JobState.DELIVERED,
        JobState.COMPLETED,
        JobState.IGNORED,
        JobState.FAILED,
        JobState.SUPERSEDED,
    }
)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    RETRYING = "retrying"
    DEAD = "dead"  # dead letter: gave up (delivery.give_up_after_hours); `deliveries retry`


class Study(SQLModel, table=True):
    __tablename__ = "studies"

    id: int | None = Field(default=None, primary_key=True)
    study_instance_uid: str = Field(index=True, unique=True, max_length=64)
    patient_id: str | None = Field(default=None, max_length=64)
    accession_number: str | None = Field(default=None, max_length=16)
    study_date: str | None = Field(default=None, max_length=8)
    first_received_at: datetime = Field(default_factory=utcnow, index=True)
    last_received_at: datetime = Field(default_factory=utcnow, index=True)
    completed_at: datetime | None = None
    is_complete: bool = Field(default=False, index=True)
    instance_count: int = 0
    # True when every instance is the screener's own output (loop protection)
    own_output_only: bool = False


class Series(SQLModel, table=True):
    __tablename__ = "series"

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="studies.id", index=True)
    series_instance_uid: str = Field(index=True, unique=True, max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    series_description: str | None = Field(default=None, max_length=64)


class Instance(SQLModel, table=True):
    """One received version of a SOP instance; a re-send with new content is a new version."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="studies.id", index=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    sop_instance_uid: str = Field(index=True, max_length=64)
    version: int = 1
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax_uid: str = Field(default="", max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    view_position: str | None = Field(default=None, max_length=16)
    image_laterality: str | None = Field(default=None, max_length=16)
    body_part_examined: str | None = Field(default=None, max_length=64)
    photometric_interpretation: str | None = Field(default=None, max_length=16)
    file_path: str = Field(max_length=1024)
    size_bytes: int = 0
    # "<algorithm>:<hex>" of the data set as received: "blake3:" since 0005, "sha256:" before
    content_digest: str = Field(max_length=80, index=True)
    received_at: datetime = Field(default_factory=utcnow, index=True)
    calling_ae_title: str = Field(default="", max_length=16)
    source_address: str = Field(default="", max_length=64)
    is_own_output: bool = False
    # why the screenability gate refuses it (None: screenable); such an instance never
    # re-opens a completed study (screener/screenability.py)
    skip_reason: str | None = None


class ScreeningJob(SQLModel, table=True):
    __tablename__ = "screening_jobs"

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="studies.id", index=True)
    state: str = Field(default=JobState.QUEUED.value, index=True, max_length=16)
    reason: str | None = None  # why failed / superseded
    attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow, index=True)
    # last time a worker message was sent for this job (None: never dispatched); the
    # reconciler dispatches fresh queued jobs and re-sends work whose state went stale
    dispatched_at: datetime | None = None
    model_name: str | None = Field(default=None, max_length=64)
    model_version: str | None = Field(default=None, max_length=64)
    threshold_version: int | None = None
    # what else the outputs depend on (reprocess compares them); NULL before revision 0007
    scheme: str | None = Field(default=None, max_length=16)
    threshold_value: float | None = None
    supersedes_job_id: int | None = Field(default=None, foreign_key="screening_jobs.id")
    trigger: str = Field(default="ingest", max_length=16)  # ingest | reprocess
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class ImageResult(SQLModel, table=True):
    __tablename__ = "image_results"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="screening_jobs.id", index=True)
    sop_instance_uid: str = Field(max_length=64)
    view: str = Field(default="UNKNOWN", max_length=16)
    view_source: str = Field(default="tag", max_length=8)
    screened: bool = False
    skip_reason: str | None = None
    covid: float | None = None
    pneumonia: float | None = None
    normal: float | None = None
    covid_positive: bool | None = None
    heatmap_lung_fraction: float | None = None


class InferResult(SQLModel, table=True):
    """What the infer stage hands to report: each image's result at the networks' grid
    (``workers.result_store``'s encoding, a few kB per image plus the 224 x 224 lung map).
    Written in the transaction that moves the job to ``inferred`` (one commit, no file to
    fsync per job); deleted in the one that moves it on from ``reporting``."""

    __tablename__ = "infer_results"

    job_id: int = Field(
        primary_key=True,
        foreign_key="screening_jobs.id",
        sa_column_kwargs={"autoincrement": False},
    )
    written_at: datetime = Field(default_factory=utcnow)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class OutputObject(SQLModel, table=True):
    """A DICOM object the screener wrote (SR, SC, parametric map)."""

    __tablename__ = "output_objects"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="screening_jobs.id", index=True)
    study_instance_uid: str = Field(index=True, max_length=64)
    series_instance_uid: str = Field(default="", max_length=64)  # predecessor references
    sop_instance_uid: str = Field(index=True, unique=True, max_length=64)
    sop_class_uid: str = Field(max_length=64)
    kind: str = Field(max_length=16)  # sr | sc | pmap
    file_path: str = Field(max_length=1024)
    created_at: datetime = Field(default_factory=utcnow)
    pruned_at: datetime | None = None  # file removed by retention (after every delivery)


class Delivery(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("output_id", "destination"),)

    id: int | None = Field(default=None, primary_key=True)
    output_id: int = Field(foreign_key="output_objects.id", index=True)
    destination: str = Field(max_length=128)  # Destination.name
    state: str = Field(default=DeliveryState.PENDING.value, index=True, max_length=16)
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    created_at: datetime | None = Field(default_factory=utcnow)  # NULL: made before 0002
    first_attempt_at: datetime | None = None  # start of the give-up horizon


class DestinationBreaker(SQLModel, table=True):
    """Circuit breaker of one destination, shared by every sending process."""

    __tablename__ = "destination_health"

    name: str = Field(primary_key=True, max_length=128)  # Destination.name
    state: str = Field(default="up", max_length=16)  # up | down | probing
    consecutive_failures: int = 0
    last_error: str | None = None
    down_since: datetime | None = None
    next_probe_at: datetime | None = None
    probe_started_at: datetime | None = None
    last_success_at: datetime | None = None
    last_failure_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class ThresholdVersion(SQLModel, table=True):
    __tablename__ = "threshold_versions"

    version: int | None = Field(default=None, primary_key=True)
    value: float
    target_sensitivity: float | None = None
    operating_point: str = ""  # e.g. "sensitivity 0.95 (95% CI 0.90-0.98) on validation"
    model_name: str | None = Field(default=None, max_length=64)
    model_version: str | None = Field(default=None, max_length=64)
    set_by: str = Field(default="", max_length=64)
    reason: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    is_active: bool = Field(default=True, index=True)


class AuditLog(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(default="system", max_length=64)  # listener | worker:<queue> | cli:<user>
    action: str = Field(max_length=64, index=True)  # e.g. instance.stored, job.failed
    study_instance_uid: str | None = Field(default=None, max_length=64, index=True)
    job_id: int | None = None
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class User(SQLModel, table=True):
    """A web console / API user (``screener users add``); the password as an argon2id hash."""

    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    role: str = Field(default="viewer", max_length=16)  # admin | viewer
    password_hash: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow)
    last_login_at: datetime | None = None


class WebSession(SQLModel, table=True):
    """A signed-in console session. The signed cookie alone is not enough: logging out
    deletes the row (a copied cookie stops working), and a session idle longer than
    ``http.session_idle_minutes`` or older than ``http.session_hours`` is refused."""

    __tablename__ = "web_sessions"

    id: str = Field(primary_key=True, max_length=64)  # SHA-256 of the cookie's random token
    user_id: int = Field(index=True)  # users.id: a removed (or re-added) user has no session
    created_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime = Field(default_factory=utcnow, index=True)


class ProcessHeartbeat(SQLModel, table=True):
    """Liveness of a long-running process (listener, worker), read by ``/healthz``."""

    __tablename__ = "process_heartbeats"

    name: str = Field(primary_key=True, max_length=128)  # e.g. worker:infer@host:pid
    kind: str = Field(max_length=32, index=True)  # listener | worker
    queues: str = Field(default="", max_length=128)  # comma-separated, for workers
    host: str = Field(default="", max_length=128)
    pid: int = 0
    started_at: datetime = Field(default_factory=utcnow)
    beat_at: datetime = Field(default_factory=utcnow, index=True)


class StageTiming(SQLModel, table=True):
    """How long one stage took for one job (claim to finish): the stage timeline and the
    ``screener_stage_duration_seconds`` histogram."""

    __tablename__ = "stage_timings"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    stage: str = Field(max_length=16, index=True)  # prepare | infer | report | deliver
    seconds: float
    finished_at: datetime = Field(default_factory=utcnow)
