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
from sqlalchemy import bindparam, case, insert, literal_column, null, union_all, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from screener.db.models import AuditLog, Instance, OutputObject, Series, Study, table_of, utcnow
from screener.db.session import session_scope
from screener.dicom.dataset_check import InstanceHeader, read_deflated_file_header
from screener.identity import PRODUCT_NAME
from screener.screenability import (
    PIXEL_DATA_TAGS,
    Refusal,
    screenability,
    screenability_of_file,
)
from screener.settings import ScreeningSettings
from screener.study_assembler import complete_study

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
DIGEST_ALGORITHM = "blake3"


def content_digest(data: bytes | memoryview, algorithm: str = DIGEST_ALGORITHM) -> str:
    """``"<algorithm>:<hex>"`` of ``data``: BLAKE3 (256 bits), or SHA-256 for versions
    recorded before BLAKE3. Both release the GIL while hashing large inputs."""
    if algorithm == "blake3":
        return digest_of(blake3(data))
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    raise ValueError(f"unsupported content digest algorithm {algorithm!r}")


def content_hasher() -> blake3:
    """An incremental hasher: :func:`digest_of` it after ``update`` with a data set's bytes,
    in order, is :func:`content_digest` of those bytes (the listener hashes fragments as
    they arrive, while they are still in the CPU's cache)."""
    return blake3()


def digest_of(hasher: blake3) -> str:
    """``"blake3:<hex>"`` of what ``hasher`` (from :func:`content_hasher`) was given."""
    return "blake3:" + hasher.hexdigest()


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
_NEW_STUDY = insert(_STUDIES).returning(_STUDIES.c.id)
_NEW_SERIES = insert(_SERIES_TABLE).returning(_SERIES_TABLE.c.id)
_NEW_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
# An existing study after an instance (a new study is inserted with these values already).
# ``added``: 1 for a new instance, 0 for a new version (it replaces content; it is not
# another instance).
_NOW = bindparam("now", type_=_STUDIES.c.last_received_at.type)
_COUNTED = _STUDIES.c.instance_count + bindparam("added", type_=_STUDIES.c.instance_count.type)
_OF_STUDY = _STUDIES.c.id == bindparam("study")
# a foreign, screenable instance: (re)opens the study and restarts its quiet period
_TOUCH_SCREENABLE = (
    update(_STUDIES)
    .where(_OF_STUDY)
    .values(
        instance_count=_COUNTED,
        last_received_at=_NOW,
        own_output_only=False,
        is_complete=False,
        completed_at=None,
    )
)
# a foreign instance the gate refuses: restarts the quiet period of a study still arriving; a
# completed one stays closed
_TOUCH_REFUSED = (
    update(_STUDIES)
    .where(_OF_STUDY)
    .values(
        instance_count=_COUNTED,
        own_output_only=False,
        last_received_at=case(
            (_STUDIES.c.is_complete.is_(False), _NOW), else_=_STUDIES.c.last_received_at
        ),
    )
)
# the screener's own output: counted, nothing else
_TOUCH_OWN = update(_STUDIES).where(_OF_STUDY).values(instance_count=_COUNTED)


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


def warm_up(database_url: str) -> None:
    """Pay the recording's one-time costs now: the DB driver's import, the pool's first
    connection and the lookup's compilation (measured: 0.14-0.32 CPU-s per listener process,
    otherwise spent inside the first C-STORE a sender waits on). Read-only."""
    with session_scope(database_url) as session:
        session.connection().execute(_LOOKUP, {"sop": "0", "study": "0", "series": "0"}).all()


def gate_reason(file_path: str, screening: ScreeningSettings) -> str | None:
    """The screenability gate's reason for refusing a spooled file (None: screenable, or
    unreadable here: the prepare stage then records what is wrong with it)."""
    try:
        refusal = _screenability_of_file(file_path, screening)
    except Exception as exc:  # noqa: BLE001 - never fail a C-STORE over the gate
        log.debug("screenability of %s not decided at ingest: %s", file_path, exc)
        return None
    return None if refusal is None else refusal.reason


def _screenability_of_file(file_path: str, screening: ScreeningSettings) -> Refusal | None:
    """:func:`screenability_of_file`, but a deflated file's header is inflated only as far
    as it is read, within a bound (pydicom inflates the whole data set in memory)."""
    with open(file_path, "rb") as fh:
        deflated = read_deflated_file_header(fh)
    if deflated is None:
        return screenability_of_file(file_path, screening)
    ds, next_tag = deflated
    return screenability(ds, screening, has_pixel_data=next_tag in PIXEL_DATA_TAGS)


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
    # loop protection: the screener's own outputs, by product name or by a recorded UID
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
    if found is None:
        # inserted as the update below would leave an existing study
        study_id = connection.execute(
            _NEW_STUDY,
            {
                "study_instance_uid": header.study_instance_uid,
                "patient_id": header.patient_id,
                "accession_number": header.accession_number,
                "study_date": header.study_date,
                "first_received_at": now,
                "last_received_at": now,
                "completed_at": None,
                "is_complete": False,
                "instance_count": added,
                "own_output_only": own,
            },
        ).scalar_one()
        complete = False
    else:
        study_id, complete = found.id, bool(found.flag)
    late_refused = complete and not own and refused
    reopened = complete and not own and not refused

    if series_id is None:
        series_id = connection.execute(
            _NEW_SERIES,
            {
                "study_id": study_id,
                "series_instance_uid": header.series_instance_uid,
                "modality": header.modality,
                "series_description": header.series_description,
            },
        ).scalar_one()

    version = versions[0].version + 1 if versions else 1
    instance_id = connection.execute(
        _NEW_INSTANCE,
        {
            "study_id": study_id,
            "series_id": series_id,
            "sop_instance_uid": header.sop_instance_uid,
            "version": version,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": received.transfer_syntax_uid,
            "modality": header.modality,
            "view_position": header.view_position,
            "image_laterality": header.image_laterality,
            "body_part_examined": header.body_part_examined,
            "photometric_interpretation": header.photometric_interpretation,
            "file_path": received.file_path,
            "size_bytes": received.size_bytes,
            "content_digest": received.content_digest,
            "received_at": now,
            "calling_ae_title": received.calling_ae_title[:16],
            "source_address": received.source_address[:64],
            "is_own_output": own,
            "skip_reason": skip_reason,
        },
    ).scalar_one()

    if found is not None:
        if not own:
            # Only foreign, screenable instances reopen a completed study.
            touch = _TOUCH_REFUSED if refused else _TOUCH_SCREENABLE
            connection.execute(touch, {"study": study_id, "added": added, "now": now})
        elif added:
            connection.execute(_TOUCH_OWN, {"study": study_id, "added": added})

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
