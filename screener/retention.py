"""Retention: what the screener deletes from its disk, and when (``retention.*``).

Outputs (SR, heatmap SC files in the outbox) are pruned ``retention.outputs_days`` after
their last delivery, and only when every destination acknowledged them: an output with a
delivery still waiting or dead, or with no destination at all (the only copy), is kept.
The row stays (``output_objects.pruned_at``), so deliveries and predecessor references
keep working; a re-screen that writes the same object again clears the mark.

The spool (received images) is kept by default (``retention.spool_days = 0``) because
``screener reprocess`` re-screens from it. With ``spool_days > 0`` the files of complete
studies whose last image arrived longer ago, and whose latest job is finished, are
deleted; ``reprocess`` then names such studies as ``images_pruned`` instead of queueing
them. Only files inside the spool and outbox folders are ever deleted.

The infer stage's results of a job that ended without passing report (failed, superseded)
are deleted too: report deletes them itself when it moves a job on, and nothing else reads
them. So are outbox files that no output row names, in the folder of a job that ended:
the old copy of an output that an identical re-screen re-pointed to its own file, or what
a report wrote before its job failed or was superseded. They are copies nothing sends or
links to; the rule does not depend on ``outputs_days``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import case, delete, func, update
from sqlmodel import Session, col, select

from screener.db.models import (
    TERMINAL_STATES,
    AuditLog,
    Delivery,
    DeliveryState,
    InferResult,
    Instance,
    OutputObject,
    ScreeningJob,
    Study,
    utcnow,
)
from screener.db.session import session_scope
from screener.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What one pruning run removed (or, dry, would remove)."""

    dry_run: bool = False
    outputs: list[str] = field(default_factory=list)  # outbox file paths
    spool: list[str] = field(default_factory=list)  # spool file paths
    studies: list[str] = field(default_factory=list)  # studies whose images went
    bytes_freed: int = 0
    infer_results: int = 0  # stored results of jobs that ended before report
    orphaned: list[str] = field(default_factory=list)  # outbox files no output row names

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "outputs": len(self.outputs),
            "spool_files": len(self.spool),
            "studies": list(self.studies),
            "bytes_freed": self.bytes_freed,
            "infer_results": self.infer_results,
            "orphaned_outputs": len(self.orphaned),
        }


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _remove(path: Path, folder: Path, dry_run: bool) -> int:
    """Delete ``path`` if it lies inside ``folder``; bytes freed (0 when absent or outside)."""
    if not _inside(path, folder) or not path.is_file():
        return 0
    size = path.stat().st_size
    if not dry_run:
        path.unlink(missing_ok=True)
    return size


def prunable_outputs(settings: Settings, now: datetime) -> list[tuple[int, str]]:
    """(output id, file) delivered to every destination more than ``outputs_days`` ago."""
    if settings.retention.outputs_days <= 0:
        return []
    cutoff = now - timedelta(days=settings.retention.outputs_days)
    delivered = func.sum(case((col(Delivery.state) == DeliveryState.DELIVERED.value, 1), else_=0))
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(OutputObject.id, OutputObject.file_path)
            .join(Delivery, col(Delivery.output_id) == col(OutputObject.id))
            .where(col(OutputObject.pruned_at).is_(None))
            .group_by(col(OutputObject.id), col(OutputObject.file_path))
            .having(func.count() == delivered)
            .having(func.max(Delivery.delivered_at) < cutoff)
        ).all()
    return [(int(i or 0), str(p)) for i, p in rows]


def prunable_studies(settings: Settings, now: datetime) -> list[tuple[int, str]]:
    """(study id, UID) whose images may go: complete, quiet ``spool_days``, no job running."""
    if settings.retention.spool_days <= 0:
        return []
    cutoff = now - timedelta(days=settings.retention.spool_days)
    with session_scope(settings.database_url) as session:
        studies = session.exec(
            select(Study.id, Study.study_instance_uid).where(
                col(Study.is_complete).is_(True), col(Study.last_received_at) < cutoff
            )
        ).all()
        out: list[tuple[int, str]] = []
        for study_id, uid in studies:
            if _latest_job_ended(session, int(study_id or 0)):
                out.append((int(study_id or 0), str(uid)))
    return out


def _latest_job_ended(session: Session, study_id: int) -> bool:
    """Whether the study's newest job is in a terminal state (or it has none)."""
    latest = session.exec(
        select(ScreeningJob.state)
        .where(ScreeningJob.study_id == study_id)
        .order_by(col(ScreeningJob.id).desc())
        .limit(1)
    ).first()
    return latest is None or latest in {s.value for s in TERMINAL_STATES}


def prune(settings: Settings, now: datetime | None = None, *, dry_run: bool = False) -> PruneReport:
    """Delete what the retention rules allow; a dry run only reports it."""
    now = now or utcnow()
    report = PruneReport(dry_run=dry_run)
    for output_id, file_path in prunable_outputs(settings, now):
        if not dry_run and not _mark_output_pruned(settings, output_id, file_path, now):
            log.info("retention: output %d was written again meanwhile; kept", output_id)
            continue
        path = Path(file_path)
        report.bytes_freed += _remove(path, settings.outbox_dir, dry_run)
        report.outputs.append(file_path)
        if not dry_run:
            _remove_empty_parent(path, settings.outbox_dir)
    spool_cutoff = now - timedelta(days=settings.retention.spool_days)
    for study_id, uid in prunable_studies(settings, now):
        freed = _prune_study(settings, study_id, spool_cutoff, dry_run)
        if freed is None:
            log.info("retention: study %s received or queued something meanwhile; kept", uid)
            continue
        if not freed:
            continue
        for path, size in freed:
            report.bytes_freed += size
            report.spool.append(str(path))
            if not dry_run:
                _remove_empty_parent(path, settings.spool_dir)
        report.studies.append(uid)
    report.infer_results = _drop_ended_results(settings, dry_run)
    for path in orphaned_outputs(settings, now):
        report.bytes_freed += _remove(path, settings.outbox_dir, dry_run)
        report.orphaned.append(str(path))
        if not dry_run:
            _remove_empty_parent(path, settings.outbox_dir)
    if (report.outputs or report.spool or report.orphaned) and not dry_run:
        with session_scope(settings.database_url) as session:
            session.add(
                AuditLog(
                    actor="retention",
                    action="retention.pruned",
                    detail={
                        "outputs": len(report.outputs),
                        "spool_files": len(report.spool),
                        "studies": len(report.studies),
                        "orphaned_outputs": len(report.orphaned),
                        "bytes_freed": report.bytes_freed,
                    },
                )
            )
        log.info(
            "retention: pruned %d outputs, %d spool files (%d studies) and %d orphaned "
            "outbox files, %.1f MB freed",
            len(report.outputs),
            len(report.spool),
            len(report.studies),
            len(report.orphaned),
            report.bytes_freed / 1e6,
        )
    return report


ORPHAN_GRACE = timedelta(hours=1)  # an unnamed file younger than this is left alone
_JOB_FOLDER = re.compile(r"job-([0-9]{1,18})")
_ID_CHUNK = 500  # ids per IN list


def orphaned_outputs(settings: Settings, now: datetime) -> list[Path]:
    """Outbox files that no output row names, in ``job-N`` folders of jobs that ended.

    Report writes a job's objects to ``outbox/job-N`` and records them with job N, and a
    re-screen that re-points an output moves its row to its own job and folder; so the
    rows naming a file in ``job-N`` are job N's, matched by file name (not by the whole
    path, which changes when the data folder moves). Only folders of jobs in a terminal
    state, and files older than :data:`ORPHAN_GRACE`, are considered; other folders in
    the outbox are not touched. A sender that read a re-pointed row's old path just before
    the file went fails that one send and retries with the new path.
    """
    root = settings.outbox_dir
    if not root.is_dir():
        return []
    folders: dict[int, Path] = {}
    for entry in root.iterdir():
        match = _JOB_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            folders[int(match.group(1))] = entry
    terminal = [s.value for s in TERMINAL_STATES]
    cutoff = (now - ORPHAN_GRACE).timestamp()
    orphans: list[Path] = []
    ids = sorted(folders)
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start : start + _ID_CHUNK]
        with session_scope(settings.database_url) as session:
            ended = set(
                session.exec(
                    select(ScreeningJob.id).where(
                        col(ScreeningJob.id).in_(chunk), col(ScreeningJob.state).in_(terminal)
                    )
                ).all()
            )
            named: dict[int, set[str]] = {}
            for job_id, file_path in session.exec(
                select(OutputObject.job_id, OutputObject.file_path).where(
                    col(OutputObject.job_id).in_(sorted(i for i in ended if i is not None))
                )
            ).all():
                named.setdefault(int(job_id), set()).add(Path(file_path).name)
        for job_id in chunk:
            if job_id not in ended:  # running, or unknown to this database: not ours to judge
                continue
            kept = named.get(job_id, set())
            for path in sorted(folders[job_id].iterdir()):
                if path.name in kept or path.is_symlink() or not path.is_file():
                    continue
                try:
                    if path.stat().st_mtime >= cutoff:
                        continue
                except OSError:  # gone meanwhile
                    continue
                orphans.append(path)
    return orphans


def _mark_output_pruned(settings: Settings, output_id: int, file_path: str, now: datetime) -> bool:
    """Mark the row pruned if it still names ``file_path``; whether it did (then the file may go).

    Compare-and-set on the path as well: an identical re-screen re-points the row to its own
    new file and clears ``pruned_at``, so ``pruned_at IS NULL`` alone would still match.
    """
    with session_scope(settings.database_url) as session:
        result = session.execute(
            update(OutputObject)
            .where(
                col(OutputObject.id) == output_id,
                col(OutputObject.file_path) == file_path,
                col(OutputObject.pruned_at).is_(None),
            )
            .values(pruned_at=now)
        )
        return int(result.rowcount or 0) == 1  # type: ignore[attr-defined]


def _prune_study(
    settings: Settings, study_id: int, cutoff: datetime, dry_run: bool
) -> list[tuple[Path, int]] | None:
    """Delete (dry: size up) a listed study's spool files; None when it changed meanwhile.

    The listing is a snapshot: a late image re-opens the study (``record_instance``) or a
    reprocess queues a job before the files go. So, in one transaction, the study row is
    re-checked and claimed with a compare-and-set (still complete, still quiet since
    ``cutoff``), the latest job is re-checked, and only the instances read there lose their
    files -- while the claim holds the row, so a late image's ``record_instance`` waits and
    then re-opens a study whose old images are gone, never one whose new image is deleted.
    """
    unchanged = (
        col(Study.id) == study_id,
        col(Study.is_complete).is_(True),
        col(Study.last_received_at) < cutoff,
    )
    with session_scope(settings.database_url) as session:
        if dry_run:
            claimed = session.exec(select(Study.id).where(*unchanged)).first() is not None
        else:  # a no-op write: it locks the row (SQLite: the database) until commit
            result = session.execute(
                update(Study).where(*unchanged).values(last_received_at=Study.last_received_at)
            )
            claimed = int(result.rowcount or 0) == 1  # type: ignore[attr-defined]
        if not claimed:
            return None
        if not _latest_job_ended(session, study_id):
            return None
        files = session.exec(select(Instance.file_path).where(Instance.study_id == study_id))
        paths = [Path(p) for p in files.all()]
        freed = [p for p in paths if p.is_file() and _inside(p, settings.spool_dir)]
        return [(p, _remove(p, settings.spool_dir, dry_run)) for p in freed]


def _drop_ended_results(settings: Settings, dry_run: bool) -> int:
    """Delete (dry: count) the infer results of jobs in a terminal state."""
    ended = select(ScreeningJob.id).where(
        col(ScreeningJob.state).in_([s.value for s in TERMINAL_STATES])
    )
    with session_scope(settings.database_url) as session:
        if dry_run:
            count = session.exec(
                select(func.count()).where(col(InferResult.job_id).in_(ended))
            ).one()
            return int(count)
        result = session.execute(delete(InferResult).where(col(InferResult.job_id).in_(ended)))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _remove_empty_parent(path: Path, root: Path) -> None:
    """Drop the now-empty folders above ``path`` up to (not including) ``root``."""
    parent = path.parent
    while _inside(parent, root) and parent.resolve() != root.resolve():
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone): stop
            return
        parent = parent.parent


def missing_images(settings: Settings, study_id: int) -> int:
    """How many of a study's screenable images (newest versions) are gone from the disk."""
    with session_scope(settings.database_url) as session:
        rows = session.exec(
            select(Instance.sop_instance_uid, Instance.file_path)
            .where(Instance.study_id == study_id, col(Instance.is_own_output).is_(False))
            .order_by(col(Instance.sop_instance_uid), col(Instance.version).desc())
        ).all()
    newest: dict[str, str] = {}
    for sop, file_path in rows:
        newest.setdefault(str(sop), str(file_path))
    return sum(1 for f in newest.values() if not Path(f).is_file())
