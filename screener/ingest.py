"""Record a received instance in the database (after it is durable in the spool).

- The same SOP instance with the same content again: a duplicate, nothing changes. Content
  is identified by a cryptographic digest of the data set as received, ``content_digest``
  (``"blake3:<hex>"``; versions recorded before migration 0005 carry ``"sha256:<hex>"`` and
  are compared by digesting the received bytes with SHA-256, see :class:`ReceivedFile`).
- The same SOP instance with different content: stored as a new version, logged.
- Loop protection: an instance whose ManufacturerModelName is the screener's own
  :data:`~screener.identity.PRODUCT_NAME`, or whose SOP Instance UID is one of the screener's
  ``output_objects``, is stored with ``is_own_output=True`` and never makes its study
  screened: it neither reopens a completed study nor restarts its quiet period.
- Screenability (:mod:`screener.screenability`; the listener decides it from the header it
  parsed in memory, otherwise the spooled file's header is read here): an object
  the gate refuses (a dose SR, a KOS, a presentation state, a CT slice...) is stored with
  its ``skip_reason``. It may restart the quiet period of a study that is still arriving,
  but it never re-opens a completed study: a late dose report is recorded and nothing is
  screened or sent again. Only a new screenable image re-opens a study.
- A study whose modality is in ``single_image_complete_modalities`` completes at once.

Concurrent associations (threads and processes) may record instances of the same study at
the same moment; unique constraints plus a retry make get-or-create safe on SQLite and
PostgreSQL, and counters are updated with SQL expressions, never read-modify-write.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from blake3 import blake3
from sqlalchemy import (
    ColumnElement,
    Insert,
    Table,
    Update,
    bindparam,
    case,
    insert,
    literal_column,
    null,
    union_all,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.sql.elements import BindParameter
from sqlmodel import Session

from screener.db.models import AuditLog, Instance, OutputObject, Series, Study, table_of, utcnow
from screener.db.session import session_scope
from screener.dicom.dataset_check import InstanceHeader
from screener.identity import PRODUCT_NAME
from screener.screenability import screenability_of_file
from screener.settings import ScreeningSettings
from screener.study_assembler import complete_study

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
DIGEST_ALGORITHM = "blake3"


def content_digest(data: bytes | memoryview, algorithm: str = DIGEST_ALGORITHM) -> str:
    """``"<algorithm>:<hex>"`` of ``data``: BLAKE3 (256 bits), or SHA-256 for versions
    recorded before BLAKE3. Both release the GIL while hashing large inputs."""
    if algorithm == "blake3":
        return "blake3:" + blake3(data).hexdigest()
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    raise ValueError(f"unsupported content digest algorithm {algorithm!r}")


class Gate(enum.Enum):
    """``record_instance(skip_reason=Gate.READ_FILE)``: the caller did not decide the
    screenability gate; it is decided from the spooled file's header."""

    READ_FILE = "read_file"


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new_version"


@dataclass(frozen=True)
class ReceivedFile:
    """Where and how an instance arrived (everything but its header).

    ``content_digest``: ``"<algorithm>:<hex>"`` of the data set as received (no file meta),
    normally :func:`content_digest`'s BLAKE3. ``rehash``: digests the same bytes with
    another algorithm (``rehash("sha256")`` -> ``"sha256:<hex>"``), used only to compare
    with a version recorded under that algorithm (before the switch to BLAKE3); None: such
    a version never counts as the same content.
    """

    file_path: str
    size_bytes: int
    content_digest: str
    transfer_syntax_uid: str
    calling_ae_title: str = ""
    source_address: str = ""
    rehash: Callable[[str], str] | None = None


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    instance_id: int
    study_id: int
    version: int
    is_own_output: bool
    job_id: int | None = None  # set when the completion rule completed the study at once
    file_path: str = ""  # the recorded version's file (for a duplicate: the first copy's)


# The statements of the per-instance path, built once: building a SQLAlchemy expression
# per call (and SQLModel objects per row) cost more CPU than the database's own work, and
# every instance a PACS sends takes this path before its C-STORE is answered.
_STUDIES = table_of(Study)
_SERIES_TABLE = table_of(Series)
_INSTANCES = table_of(Instance)
_OUTPUTS = table_of(OutputObject)
_OWN_OUTPUT = (
    sa_select(_OUTPUTS.c.id).where(_OUTPUTS.c.sop_instance_uid == bindparam("uid")).limit(1)
)
# Everything the path reads, in one statement (one round trip, one statement's client CPU
# instead of four): ``kind`` tells the rows apart. _VERSION: the instance's recorded versions,
# newest first; _OWN: its SOP Instance UID is one of the screener's outputs; _STUDY_ROW: its
# study (``flag``: is_complete); _SERIES_ROW: its series.
_VERSION, _OWN, _STUDY_ROW, _SERIES_ROW = 0, 1, 2, 3
_LOOKUP_UNION = union_all(
    sa_select(
        literal_column(str(_VERSION)).label("kind"),
        _INSTANCES.c.id,
        _INSTANCES.c.study_id,
        _INSTANCES.c.version,
        _INSTANCES.c.content_digest,
        _INSTANCES.c.is_own_output.label("flag"),
        _INSTANCES.c.file_path,
    ).where(_INSTANCES.c.sop_instance_uid == bindparam("sop")),
    sa_select(
        literal_column(str(_OWN)), _OUTPUTS.c.id, null(), null(), null(), null(), null()
    ).where(_OUTPUTS.c.sop_instance_uid == bindparam("sop")),
    sa_select(
        literal_column(str(_STUDY_ROW)),
        _STUDIES.c.id,
        null(),
        null(),
        null(),
        _STUDIES.c.is_complete,
        null(),
    ).where(_STUDIES.c.study_instance_uid == bindparam("study")),
    sa_select(
        literal_column(str(_SERIES_ROW)), _SERIES_TABLE.c.id, null(), null(), null(), null(), null()
    ).where(_SERIES_TABLE.c.series_instance_uid == bindparam("series")),
)
_LOOKUP = _LOOKUP_UNION.order_by(
    _LOOKUP_UNION.selected_columns.kind, _LOOKUP_UNION.selected_columns.version.desc()
)


def _binds(table: Table, prefix: str, *skip: str) -> dict[str, BindParameter[Any]]:
    """A typed bind parameter per column of ``table``, named ``<prefix>__<column>``: the
    write statements of one instance share one parameter dict, so names must not clash
    (and no name is a column's, which SQLAlchemy would add to an INSERT or UPDATE)."""
    return {
        column.name: bindparam(f"{prefix}__{column.name}", type_=column.type)
        for column in table.columns
        if column.name not in ("id", *skip)
    }


_STUDY_VALUES = _binds(_STUDIES, "study")
_SERIES_VALUES = _binds(_SERIES_TABLE, "series", "study_id")
_INSTANCE_VALUES = _binds(_INSTANCES, "instance", "study_id", "series_id")
_STUDY_ID = bindparam("study__id", type_=_STUDIES.c.id.type)
_SERIES_ID = bindparam("series__id", type_=_SERIES_TABLE.c.id.type)
_NEW_STUDY = insert(_STUDIES).values(_STUDY_VALUES).returning(_STUDIES.c.id)
_NEW_SERIES = (
    insert(_SERIES_TABLE).values(study_id=_STUDY_ID, **_SERIES_VALUES).returning(_SERIES_TABLE.c.id)
)
_NEW_INSTANCE = (
    insert(_INSTANCES)
    .values(study_id=_STUDY_ID, series_id=_SERIES_ID, **_INSTANCE_VALUES)
    .returning(_INSTANCES.c.id)
)

# An existing study after an instance (a new study is inserted with these values already).
# ``touch__added``: 1 for a new instance, 0 for a new version (it replaces content; it is
# not another instance).
_NOW = bindparam("touch__now", type_=_STUDIES.c.last_received_at.type)
_COUNTED = _STUDIES.c.instance_count + bindparam(
    "touch__added", type_=_STUDIES.c.instance_count.type
)
_OF_STUDY = _STUDIES.c.id == _STUDY_ID


class _Touch(enum.Enum):
    """How an instance changes its (existing) study."""

    SCREENABLE = "screenable"  # foreign, screenable: (re)opens it, restarts its quiet period
    REFUSED = "refused"  # foreign, refused by the gate: restarts the quiet period of a study
    # still arriving; a completed one stays closed
    OWN = "own"  # the screener's own output: counted, nothing else


_TOUCHES: dict[_Touch, Update] = {
    _Touch.SCREENABLE: update(_STUDIES)
    .where(_OF_STUDY)
    .values(
        instance_count=_COUNTED,
        last_received_at=_NOW,
        own_output_only=False,
        is_complete=False,
        completed_at=None,
    ),
    _Touch.REFUSED: update(_STUDIES)
    .where(_OF_STUDY)
    .values(
        instance_count=_COUNTED,
        own_output_only=False,
        last_received_at=case(
            (_STUDIES.c.is_complete.is_(False), _NOW), else_=_STUDIES.c.last_received_at
        ),
    ),
    _Touch.OWN: update(_STUDIES).where(_OF_STUDY).values(instance_count=_COUNTED),
}


def _folded(new_study: bool, new_series: bool, touch: _Touch | None) -> Insert:
    """On PostgreSQL, the writes of one instance in one statement (one round trip): the new
    study and series as data-modifying CTEs the instance INSERT reads its ids from, the
    study UPDATE as a CTE nothing reads (PostgreSQL runs those after the main statement,
    the order of the separate statements). Returns the instance's id and study id."""
    study_id: ColumnElement[Any] = _STUDY_ID
    series_id: ColumnElement[Any] = _SERIES_ID
    if new_study:
        study = _NEW_STUDY.cte("new_study")
        study_id = sa_select(study.c.id).scalar_subquery()
    if new_series:
        series = (
            insert(_SERIES_TABLE)
            .values(study_id=study_id, **_SERIES_VALUES)
            .returning(_SERIES_TABLE.c.id)
            .cte("new_series")
        )
        series_id = sa_select(series.c.id).scalar_subquery()
    statement = (
        insert(_INSTANCES)
        .values(study_id=study_id, series_id=series_id, **_INSTANCE_VALUES)
        .returning(_INSTANCES.c.id, _INSTANCES.c.study_id)
    )
    if touch is not None:
        statement = statement.add_cte(_TOUCHES[touch].cte("touch_study"))
    return statement


# a new study has nothing to touch: it is inserted as the touch would leave it
_FOLDED: dict[tuple[bool, bool, _Touch | None], Insert] = {
    (new_study, new_series, touch): _folded(new_study, new_series, touch)
    for new_study in (True, False)
    for new_series in (True, False)
    for touch in ((None,) if new_study else (None, *_Touch))
}


def is_own_output(session: Session, header: InstanceHeader) -> bool:
    """True for objects the screener produced (loop protection)."""
    if header.manufacturer_model_name == PRODUCT_NAME:
        return True
    hit = session.execute(_OWN_OUTPUT, {"uid": header.sop_instance_uid}).first()
    return hit is not None


def record_instance(
    database_url: str,
    header: InstanceHeader,
    received: ReceivedFile,
    single_image_complete_modalities: Collection[str] = (),
    now: datetime | None = None,
    screening: ScreeningSettings | None = None,
    skip_reason: str | None | Literal[Gate.READ_FILE] = Gate.READ_FILE,
) -> IngestResult:
    """Record one instance version; retried on unique-constraint races and SQLite locks.

    ``screening``: the gate's settings (None: the defaults of :class:`ScreeningSettings`).
    ``skip_reason``: the screenability gate's reason as the caller decided it (None:
    screenable); :attr:`Gate.READ_FILE` (the default): decided here from the file's header.
    """
    if skip_reason is Gate.READ_FILE:
        skip_reason = gate_reason(received.file_path, screening or ScreeningSettings())
    digests = _Digests(received)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with session_scope(database_url) as session:
                return _record(
                    session,
                    header,
                    received,
                    single_image_complete_modalities,
                    now or utcnow(),
                    skip_reason,
                    digests,
                )
        except (IntegrityError, OperationalError) as exc:
            if attempt == MAX_ATTEMPTS or not _retryable(exc):
                raise
            time.sleep(random.uniform(0.005, 0.05) * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def gate_reason(file_path: str, screening: ScreeningSettings) -> str | None:
    """The screenability gate's reason for refusing a spooled file (None: screenable, or
    unreadable here: the prepare stage then records what is wrong with it)."""
    try:
        refusal = screenability_of_file(file_path, screening)
    except Exception as exc:  # noqa: BLE001 - never fail a C-STORE over the gate
        log.debug("screenability of %s not decided at ingest: %s", file_path, exc)
        return None
    return None if refusal is None else refusal.reason


class _Digests:
    """The received content's digest per algorithm, each computed at most once."""

    def __init__(self, received: ReceivedFile) -> None:
        self._received = received
        algorithm = received.content_digest.partition(":")[0]
        self._known: dict[str, str | None] = {algorithm: received.content_digest}

    def same_content(self, recorded: str) -> bool:
        """Whether a version recorded with digest ``recorded`` holds the received content."""
        if recorded == self._received.content_digest:
            return True
        algorithm = recorded.partition(":")[0]
        if algorithm not in self._known:
            digest = None
            if self._received.rehash is not None:
                try:
                    digest = self._received.rehash(algorithm)
                except ValueError:  # an algorithm this version cannot compute
                    digest = None
            self._known[algorithm] = digest
        return self._known[algorithm] == recorded


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # a concurrent insert of the same study/series/instance: retry reads it
    text = str(exc).lower()
    return "locked" in text or "busy" in text or "deadlock" in text or "serializ" in text


def _record(
    session: Session,
    header: InstanceHeader,
    received: ReceivedFile,
    single_image_modalities: Collection[str],
    now: datetime,
    skip_reason: str | None = None,
    digests: _Digests | None = None,
) -> IngestResult:
    digests = digests or _Digests(received)
    connection = session.connection()
    versions: list[Row[Any]] = []
    own = header.manufacturer_model_name == PRODUCT_NAME
    found: Row[Any] | None = None
    series_id: int | None = None
    for row in connection.execute(
        _LOOKUP,
        {
            "sop": header.sop_instance_uid,
            "study": header.study_instance_uid,
            "series": header.series_instance_uid,
        },
    ):
        if row.kind == _VERSION:
            versions.append(row)
        elif row.kind == _OWN:
            own = True
        elif row.kind == _STUDY_ROW:
            found = row
        else:
            series_id = row.id
    refused = skip_reason is not None
    for existing in versions:
        if digests.same_content(existing.content_digest):
            log.debug("duplicate of instance %s (version %d)", existing.id, existing.version)
            return IngestResult(
                IngestOutcome.DUPLICATE,
                existing.id,
                existing.study_id,
                existing.version,
                bool(existing.flag),
                file_path=existing.file_path,
            )

    added = 0 if versions else 1  # a new version replaces content; it is not another instance
    version: int = versions[0].version + 1 if versions else 1
    params: dict[str, object] = {
        "instance__sop_instance_uid": header.sop_instance_uid,
        "instance__version": version,
        "instance__sop_class_uid": header.sop_class_uid,
        "instance__transfer_syntax_uid": received.transfer_syntax_uid,
        "instance__modality": header.modality,
        "instance__view_position": header.view_position,
        "instance__image_laterality": header.image_laterality,
        "instance__body_part_examined": header.body_part_examined,
        "instance__photometric_interpretation": header.photometric_interpretation,
        "instance__file_path": received.file_path,
        "instance__size_bytes": received.size_bytes,
        "instance__content_digest": received.content_digest,
        "instance__received_at": now,
        "instance__calling_ae_title": received.calling_ae_title[:16],
        "instance__source_address": received.source_address[:64],
        "instance__is_own_output": own,
        "instance__skip_reason": skip_reason,
    }
    touch: _Touch | None = None
    if found is None:
        complete = False
        params.update(
            study__study_instance_uid=header.study_instance_uid,
            study__patient_id=header.patient_id,
            study__accession_number=header.accession_number,
            study__study_date=header.study_date,
            study__first_received_at=now,
            study__last_received_at=now,
            study__completed_at=None,
            study__is_complete=False,
            study__instance_count=added,
            study__own_output_only=own,
        )
    else:
        complete = bool(found.flag)
        params["study__id"] = found.id
        if not own:
            touch = _Touch.REFUSED if refused else _Touch.SCREENABLE
        elif added:
            touch = _Touch.OWN
        if touch is not None:
            params.update(touch__added=added, touch__now=now)
    if series_id is None:
        params.update(
            series__series_instance_uid=header.series_instance_uid,
            series__modality=header.modality,
            series__series_description=header.series_description,
        )
    else:
        params["series__id"] = series_id
    late_refused = complete and not own and refused
    reopened = complete and not own and not refused

    instance_id: int
    study_id: int
    if connection.dialect.name == "postgresql":
        folded = _FOLDED[found is None, series_id is None, touch]
        instance_id, study_id = connection.execute(folded, params).one()
    else:
        if found is None:
            study_id = params["study__id"] = connection.execute(_NEW_STUDY, params).scalar_one()
        else:
            study_id = found.id
        if series_id is None:
            params["series__id"] = connection.execute(_NEW_SERIES, params).scalar_one()
        instance_id = connection.execute(_NEW_INSTANCE, params).scalar_one()
        if touch is not None:
            connection.execute(_TOUCHES[touch], params)

    outcome = IngestOutcome.NEW_VERSION if versions else IngestOutcome.STORED
    if outcome is IngestOutcome.NEW_VERSION:
        log.warning(
            "SOP instance %s re-sent with different content: stored as version %d",
            header.sop_instance_uid,
            version,
        )
        session.add(
            AuditLog(
                actor="listener",
                action="instance.new_version",
                study_instance_uid=header.study_instance_uid,
                detail={
                    "sop_instance_uid": header.sop_instance_uid,
                    "version": version,
                    "content_digest": received.content_digest,
                    "previous_content_digest": versions[0].content_digest,
                },
            )
        )
    if reopened:
        log.info("study %s reopened by a late instance", header.study_instance_uid)
        session.add(
            AuditLog(
                actor="listener",
                action="study.reopened",
                study_instance_uid=header.study_instance_uid,
                detail={"sop_instance_uid": header.sop_instance_uid},
            )
        )
    if own:
        log.info("instance %s is the screener's own output: not screened", instance_id)
    if late_refused:
        log.info("instance %s arrived after completion and is not screenable", instance_id)
        session.add(
            AuditLog(
                actor="listener",
                action="instance.late_not_screenable",
                study_instance_uid=header.study_instance_uid,
                detail={"sop_instance_uid": header.sop_instance_uid, "reason": skip_reason},
            )
        )

    job_id = None
    if (
        not own
        and not refused
        and header.modality
        and header.modality.upper() in {m.upper() for m in single_image_modalities}
    ):
        job_id = complete_study(session, study_id, now, reason=f"{header.modality} rule")
    return IngestResult(
        outcome, instance_id, study_id, version, own, job_id, file_path=received.file_path
    )
