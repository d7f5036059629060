"""The COVID-19 score threshold: versioned, audited, read per job from the database.

The active threshold is the newest ``threshold_versions`` row with ``is_active``; version 0
stands for the embedded default that no admin has set: the validation operating point of the
configured scheme in the model manifest (:func:`embedded_info`). Workers call
:func:`active_threshold` for every job, so ``screener threshold set`` applies to the next job
without a restart, and every result records the version it used.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import update
from sqlmodel import col, select

from engines.manifest import ModelManifest, OperatingPoint, load_manifest
from engines.model_card import shipped_threshold
from screener.db.models import AuditLog, ThresholdVersion, utcnow
from screener.db.session import session_scope
from screener.results import ThresholdInfo
from screener.settings import Settings

EMBEDDED_VERSION = 0


@dataclass(frozen=True)
class ThresholdRecord:
    """One version of the threshold as an admin sees it (``threshold show|history``)."""

    version: int
    value: float
    target_sensitivity: float | None
    operating_point: str
    set_by: str
    reason: str
    created_at: datetime | None
    is_active: bool
    model_name: str | None = None
    model_version: str | None = None

    @property
    def info(self) -> ThresholdInfo:
        return ThresholdInfo(
            value=self.value,
            version=self.version,
            target_sensitivity=self.target_sensitivity,
            operating_point=self.operating_point,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "value": self.value,
            "target_sensitivity": self.target_sensitivity,
            "operating_point": self.operating_point,
            "set_by": self.set_by,
            "reason": self.reason,
            "created_at": None if self.created_at is None else self.created_at.isoformat(),
            "is_active": self.is_active,
            "model_name": self.model_name,
            "model_version": self.model_version,
        }


def embedded_info(
    settings: Settings, scheme: str | None = None, manifest: ModelManifest | None = None
) -> ThresholdInfo:
    """Version 0 for ``scheme`` (default: the configured one), resolved in this one place.

    The model manifest holds each scheme's validation operating point on the scale of its
    calibrated probability; version 0 is that point (for the production scheme rounded down
    to 4 decimals, as the model card states it), so a swapped or newly exported model brings
    its own. A site may set ``threshold.default_value`` for the production scheme
    (then described as its own, "operating point not measured", unless it is the shipped
    value rounded down); any other scheme always uses its own from the manifest: a
    threshold only means something for the model it was chosen on. ``manifest``: the one
    the caller's networks were loaded from (default: the model folder's, read now). The
    service, offline screening, reprocess and the console all call this.
    """
    manifest = manifest or load_manifest(settings.model.model_dir or None)
    scheme = scheme or settings.model.scheme
    point = manifest.operating_point(scheme)
    configured = settings.threshold.default_value
    value, target = point.threshold, point.target_sensitivity
    if scheme == manifest.production_scheme:
        # the value the model card states: the threshold rounded down (sensitivity holds)
        value = shipped_threshold(point.threshold) if configured is None else configured
        target = settings.threshold.target_sensitivity or target
    if not point.is_threshold(value):
        described = f"{scheme} scheme of {manifest.ref}: threshold {value:g} configured by this "
        described += "site (threshold.default_value); operating point not measured"
    else:
        described = f"{scheme} scheme of {manifest.ref}: {point.describe()}"
    return ThresholdInfo(
        value=value,
        version=EMBEDDED_VERSION,
        target_sensitivity=target,
        operating_point=described,
    )


def validation_operating_point(settings: Settings, scheme: str | None = None) -> OperatingPoint:
    """The scheme's shipped operating point: threshold with its validation sensitivity and
    specificity (``.sensitivity`` / ``.specificity``: k, n, Wilson interval; ``describe()``)."""
    manifest = load_manifest(settings.model.model_dir or None)
    return manifest.operating_point(scheme or settings.model.scheme)


def probability_calibration(settings: Settings, scheme: str | None = None) -> str:
    """What the reported probabilities are (for the SR, the SC and the JSONL
    ``probability_calibration`` field), e.g. "COVID-19 probability calibrated by Platt ..."."""
    manifest = load_manifest(settings.model.model_dir or None)
    return manifest.calibration(scheme or settings.model.scheme).description


def embedded_default(
    settings: Settings, scheme: str | None = None, manifest: ModelManifest | None = None
) -> ThresholdRecord:
    """Version 0: the manifest's operating point, in force until an admin sets a threshold."""
    info = embedded_info(settings, scheme, manifest)
    return ThresholdRecord(
        version=EMBEDDED_VERSION,
        value=info.value,
        target_sensitivity=info.target_sensitivity,
        operating_point=info.operating_point,
        set_by="config",
        reason="embedded default (model manifest validation operating point)",
        created_at=None,
        is_active=True,
    )


def _record(row: ThresholdVersion) -> ThresholdRecord:
    assert row.version is not None
    return ThresholdRecord(
        version=row.version,
        value=row.value,
        target_sensitivity=row.target_sensitivity,
        operating_point=row.operating_point,
        set_by=row.set_by,
        reason=row.reason,
        created_at=row.created_at,
        is_active=row.is_active,
        model_name=row.model_name,
        model_version=row.model_version,
    )


def active_record(settings: Settings, manifest: ModelManifest | None = None) -> ThresholdRecord:
    """The threshold in force now (newest active version, else the embedded default of
    ``manifest``: see :func:`embedded_info`)."""
    with session_scope(settings.database_url) as session:
        row = session.exec(
            select(ThresholdVersion)
            .where(col(ThresholdVersion.is_active).is_(True))
            .order_by(col(ThresholdVersion.version).desc())
            .limit(1)
        ).first()
        return embedded_default(settings, None, manifest) if row is None else _record(row)


def active_threshold(settings: Settings, manifest: ModelManifest | None = None) -> ThresholdInfo:
    """What a worker applies to the job it is about to run (one small query); ``manifest``:
    the one its networks were loaded from."""
    return active_record(settings, manifest).info


def threshold_by_version(settings: Settings, version: int) -> ThresholdInfo:
    """The threshold a job recorded, e.g. to re-render its report exactly."""
    if version == EMBEDDED_VERSION:
        return embedded_default(settings).info
    with session_scope(settings.database_url) as session:
        row = session.get(ThresholdVersion, version)
        if row is None:
            raise KeyError(f"threshold version {version} does not exist")
        return _record(row).info


def history(settings: Settings) -> list[ThresholdRecord]:
    """Every version, newest first, ending with the embedded default."""
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(ThresholdVersion).order_by(col(ThresholdVersion.version).desc())
        ).all()
        records = [_record(r) for r in rows]
    base = embedded_default(settings)
    if records:
        base = ThresholdRecord(**{**base.__dict__, "is_active": False})
    return [*records, base]


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover - no passwd entry in some containers
        return "unknown"


def set_threshold(
    settings: Settings,
    value: float,
    *,
    reason: str,
    set_by: str | None = None,
    target_sensitivity: float | None = None,
    operating_point: str = "",
    model_name: str | None = None,
    model_version: str | None = None,
) -> ThresholdRecord:
    """Make ``value`` the active threshold as a new version, with an audit-log row."""
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"threshold must lie in [0, 1], got {value}")
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        # it is printed in the SR's operating-point statement; NaN is not even JSON
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target_sensitivity}")
    if not reason.strip():
        raise ValueError("a reason is required for every threshold change")
    actor = set_by or current_user()
    # the audit log's actor: the caller's own name ("web:NAME" from the console), or the
    # shell user of the CLI (never "cli:web:NAME")
    audit_actor = set_by or f"cli:{actor}"
    with session_scope(settings.database_url) as session:
        previous = session.exec(
            select(ThresholdVersion)
            .where(col(ThresholdVersion.is_active).is_(True))
            .order_by(col(ThresholdVersion.version).desc())
            .limit(1)
        ).first()
        session.execute(
            update(ThresholdVersion)
            .where(col(ThresholdVersion.is_active).is_(True))
            .values(is_active=False)
        )
        row = ThresholdVersion(
            value=float(value),
            target_sensitivity=target_sensitivity,
            operating_point=operating_point or "set manually; no operating point measured",
            model_name=model_name,
            model_version=model_version,
            set_by=actor[:64],
            reason=reason.strip(),
            created_at=utcnow(),
            is_active=True,
        )
        session.add(row)
        session.flush()
        session.add(
            AuditLog(
                actor=audit_actor[:64],
                action="threshold.set",
                detail={
                    "version": row.version,
                    "value": row.value,
                    "previous_version": None if previous is None else previous.version,
                    # version 0 is the configured scheme's own (another scheme's is not
                    # threshold.default_value, which is the production scheme's)
                    "previous_value": (
                        embedded_info(settings).value if previous is None else previous.value
                    ),
                    "target_sensitivity": target_sensitivity,
                    "operating_point": row.operating_point,
                    "reason": row.reason,
                },
            )
        )
        session.flush()
        return _record(row)
