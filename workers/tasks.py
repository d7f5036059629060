"""Celery tasks: thin wrappers that give each stage its queue, retry policy and limits.

Transient trouble (database locked or unreachable, disk or network errors) is retried with
exponential backoff and jitter; bad input (:class:`workers.stages.BadInput`) fails the job
at once with its reason. A task whose job is not in its entry state does nothing, so a
duplicate message is harmless. When a stage commits, the task's dispatcher sends the job to
the next stage of :mod:`workers.stage_graph`.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from sqlalchemy.exc import OperationalError

from screener.settings import Settings
from workers import jobstate, stages
from workers.celery_app import TIME_LIMITS, app
from workers.dispatch import Dispatcher

if TYPE_CHECKING:
    from workers.infer_stage import ScreeningHandler

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, OSError, ConnectionError)


@lru_cache(maxsize=1)
def worker_settings() -> Settings:
    """The settings of this worker process (environment + config file), read once."""
    # No file-system work here: `screener worker` created the folders at start-up, and an
    # OSError raised outside a task body would look like a broker failure to Celery.
    return Settings()


@lru_cache(maxsize=1)
def worker_dispatcher() -> Dispatcher:
    return Dispatcher(app, worker_settings())


@lru_cache(maxsize=1)
def worker_infer_handler() -> ScreeningHandler:
    """The models, loaded once per process, behind the staged infer handler."""
    from screener.screening.models import ScreeningModels
    from workers.infer_stage import ScreeningHandler

    settings = worker_settings()
    return ScreeningHandler(
        settings,
        ScreeningModels.from_settings(settings),
        actor=f"worker:infer:{os.getpid()}",
        dispatcher=worker_dispatcher(),
        glue_threads=settings.model.glue_threads,
    )


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """Pooled DB connections must not cross a fork; the child's start-up heap is frozen and
    its allocator keeps freed memory for the next job (screener.allocator)."""
    from screener.db.session import dispose_engines
    from screener.startup_heap import STAGE_MODULES, settle_worker_process

    dispose_engines()
    settle_worker_process(STAGE_MODULES)


@worker_ready.connect
def _freeze_heap(**_: Any) -> None:
    """The worker's start-up objects out of the collector's way (screener.startup_heap);
    a prefork pool's children, forked before this, freeze their own in ``_after_fork``.
    The allocator keeps freed memory for the next job (screener.allocator)."""
    from screener.startup_heap import STAGE_MODULES, settle_worker_process

    settle_worker_process(STAGE_MODULES)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _release_associations(**_: Any) -> None:
    """Pool children leave through os._exit (no atexit): release the PACS associations
    the deliver task kept open (``delivery.association_idle_seconds``) on the way out."""
    from screener.dicom.sender import close_pooled_associations

    close_pooled_associations()


def _stage_options(stage: str) -> dict[str, Any]:
    return {
        "name": f"workers.tasks.{stage}_job",
        "bind": True,
        "acks_late": True,
        "autoretry_for": TRANSIENT_ERRORS,
        "dont_autoretry_for": (stages.BadInput, SoftTimeLimitExceeded),
        "retry_backoff": 2,
        "retry_backoff_max": 120,
        "retry_jitter": True,
        "max_retries": 5,
        "time_limit": TIME_LIMITS[stage],
        "soft_time_limit": TIME_LIMITS[stage] - 15,
    }


class StageTask(Task):
    """On a retry, hand the job back to its entry state so the retry can claim it."""

    abstract = True
    stage = ""

    # The hooks run outside the task's own error handling: they must never raise (with the
    # solo pool an OSError escaping here would be taken for a lost broker connection).

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job_id = int(args[0])
        log.warning("job %s: %s retried after transient error %r", job_id, self.stage, exc)
        try:
            jobstate.release(worker_settings(), job_id, self.stage)
        except Exception:  # the reconciler hands it back later
            log.exception("job %s: could not hand back to %s", job_id, self.stage)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job_id = int(args[0])
        try:
            jobstate.fail(
                worker_settings(), job_id, f"{self.stage}: {exc!r}", f"worker:{self.stage}"
            )
        except Exception:  # the reconciler fails it after max_attempts
            log.exception("job %s: could not record the failure", job_id)


STAGE_FUNCTIONS = {"prepare": stages.run_prepare, "report": stages.run_report}


def _run_stage(stage: str, job_id: int) -> bool:
    settings = worker_settings()
    try:
        moved = STAGE_FUNCTIONS[stage](settings, job_id)
    except stages.BadInput as exc:
        jobstate.fail(settings, job_id, f"{stage}: {exc}", f"worker:{stage}")
        return False
    except stages.RedoStage as redo:
        _send_after_commit(stage, job_id, redo.stage)
        return False
    except SoftTimeLimitExceeded:
        jobstate.release(settings, job_id, stage)
        raise
    if moved:
        _send_after_commit(stage, job_id)
    return moved


def _send_after_commit(stage: str, job_id: int, redo: str | None = None) -> None:
    """Send the job on once its state has committed (to the next stage, or back to
    ``redo``); a broker that fails now (restarted, briefly unreachable: kombu's
    OperationalError is no transient error of the task) must not fail the task, whose
    on_failure would then fail a job whose stage succeeded. The job waits in its committed
    state and the reconciler sends it."""
    try:
        if redo is None:
            worker_dispatcher().committed(stage, [job_id])
        else:
            worker_dispatcher().send(redo, [job_id])
    except Exception as exc:  # noqa: BLE001 - committed: the reconciler sends it
        log.warning(
            "job %s: %s committed but not sent on (%s); the reconciler will send it",
            job_id,
            stage,
            type(exc).__name__,
        )


class _Prepare(StageTask):
    stage = "prepare"


class _Infer(StageTask):
    stage = "infer"


class _Report(StageTask):
    stage = "report"


class _Deliver(StageTask):
    stage = "deliver"


@app.task(base=_Prepare, **_stage_options("prepare"))
def prepare_job(self: Task, job_id: int) -> bool:
    """CPU: decode, view filter, pre-process; tensors to the spool; then queue ``infer``."""
    return _run_stage("prepare", job_id)


@app.task(base=_Infer, **_stage_options("infer"))
def infer_job(self: Task, job_id: int) -> bool:
    """One job alone (a plain Celery worker on ``infer``): batching off, same handler.

    The production consumer of this queue is :mod:`workers.batching`, which reads these
    same messages and runs many jobs per engine call.
    """
    from workers.batching import run_inline

    return job_id in run_inline(worker_infer_handler(), [job_id])


@app.task(base=_Report, **_stage_options("report"))
def report_job(self: Task, job_id: int) -> bool:
    """CPU: SR + heatmap SCs into the outbox, recorded for delivery; then queue ``deliver``."""
    return _run_stage("report", job_id)


@app.task(base=_Deliver, **_stage_options("deliver"))
def deliver_job(self: Task, job_id: int) -> str:
    """Network: C-STORE the outputs once; what fails is retried by the delivery sweep.

    No self re-queue with a countdown: the sweep (``screener serve``/``screener reconcile``)
    retries on the backoff schedule and probes a down PACS once for all its jobs.
    """
    outcome = stages.run_deliver(worker_settings(), job_id)
    return outcome.state
