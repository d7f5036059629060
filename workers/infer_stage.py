"""The infer stage: the screening models as the batching consumer's staged work.

    admit (loader thread)     claim the jobs in one statement, read their prepared inputs
                              (network input and working image; never the display image)
    segment (engine thread)   engine call 1 for the whole batch
    plan (glue thread)        per image, in a small thread pool: view, lung mask, the
                              scheme's classifier input (Pillow and numpy release the GIL)
    classify (engine thread)  engine call 2 for the whole batch
    persist (writer thread)   per image: calibration, call, CAM lung fraction, maps at the
                              networks' grid; the encoded results of every job, image rows,
                              job states, stage timings and the batch audit row in one
                              transaction; the committed jobs dispatched to ``report``

The same handler runs one job at a time for a plain Celery worker on the ``infer`` queue
(:func:`workers.batching.run_inline`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sqlalchemy import insert

from screener.db.models import AuditLog, StageTiming, table_of, utcnow
from screener.db.session import get_engine
from screener.results import ImageResult
from screener.settings import Settings
from screener.thresholds import active_threshold
from workers import jobstate, result_store
from workers.batching import Step
from workers.stages import load_prepared, replace_image_rows

if TYPE_CHECKING:
    from screener.screening.models import ImagePlan, ScreeningModels
    from screener.screening.prepare import PreparedImage
    from workers.dispatch import Dispatcher

log = logging.getLogger(__name__)

# built once: per batch the statements only take their rows
_INSERT_TIMINGS = insert(table_of(StageTiming))
_INSERT_AUDIT = insert(table_of(AuditLog))

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class AdmittedJob:
    job_id: int
    study_instance_uid: str
    prepared: list[PreparedImage]
    files: list[str]  # the prepared file of each image (report reads its display image)
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> int:
        """Images that reach the engine (skipped ones do not)."""
        return sum(1 for p in self.prepared if p.skip_reason is None)


@dataclass
class InferBatch:
    """One batch on its way through the pipeline threads."""

    items: list[AdmittedJob]
    images: list[PreparedImage]  # every image of every job, in job order
    live: list[int]  # indices into ``images`` that reach engine call 1
    seg: dict[str, np.ndarray] = field(default_factory=dict)
    plans: dict[int, ImagePlan] = field(default_factory=dict)
    frontal: list[int] = field(default_factory=list)  # indices that reach engine call 2
    inputs: np.ndarray | None = None
    out: dict[str, np.ndarray] = field(default_factory=dict)
    engine_calls: int = 0


def default_glue_threads() -> int:
    """One core is left to the loader, engine, writer and broker threads: on 2 cores a
    second glue thread added ~0.5 ms of CPU per image (GIL hand-offs) and no images/s
    (``benchmarks/infer_overhead.py --glue-threads 1`` vs ``2``)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class ScreeningHandler:
    """The staged infer handler (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        models: ScreeningModels,
        *,
        actor: str = "worker:infer",
        dispatcher: Dispatcher | None = None,
        glue_threads: int = 0,
    ) -> None:
        self.settings = settings
        self.models = models
        self.actor = actor
        self.dispatcher = dispatcher
        self.threads = glue_threads or default_glue_threads()
        # one thread: the calling thread does the work (no hand-off to a pool thread)
        self.pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="infer-glue")
            if self.threads > 1
            else None
        )
        self.steps = (
            Step("segment", self.segment, engine=True),
            Step("plan", self.plan),
            Step("classify", self.classify, engine=True),
        )

    def map(self, fn: Callable[[T], R], values: Sequence[T]) -> list[R]:
        """``[fn(v) for v in values]`` in the glue pool, one task per thread (a run of
        neighbouring values each), in order: a task per value cost a future, a queue
        hand-off and a thread wake-up each, ~0.1 ms of CPU per image over the three maps."""
        parts = min(self.threads, len(values))
        if parts == 0:
            return []
        if self.pool is None or parts == 1:
            return [fn(v) for v in values]
        bounds = [len(values) * k // parts for k in range(parts + 1)]

        def run(k: int) -> list[R]:
            return [fn(v) for v in values[bounds[k] : bounds[k + 1]]]

        return [r for chunk in self.pool.map(run, range(parts)) for r in chunk]

    # ---------------------------------------------------------------- loader thread

    def admit(self, job_ids: list[int]) -> list[AdmittedJob | None]:
        """Claim and read the jobs in one transaction; a job named twice (a re-sent
        message next to the first) is admitted once."""
        views = {v.id: v for v in jobstate.claim_views(self.settings, job_ids, "infer")}
        admitted: list[AdmittedJob | None] = []
        for job_id in job_ids:
            view = views.pop(job_id, None)
            if view is None:
                admitted.append(None)
                continue
            try:
                prepared, files = load_prepared(self.settings, job_id, display=False)
                if not prepared:
                    raise FileNotFoundError("no prepared inputs")
            except Exception as exc:  # spool lost or unreadable: prepare again
                log.warning("job %s: prepared inputs unreadable (%s); back to prepare", job_id, exc)
                again = jobstate.redo_previous(self.settings, job_id, "infer")
                if again is not None and self.dispatcher is not None:
                    try:
                        self.dispatcher.send(again, [job_id])
                    except Exception as exc:  # noqa: BLE001 - the claim of its batch mates
                        # committed: raising would drop their messages; the reconciler
                        # re-sends a job waiting in an entry state
                        log.warning(
                            "job %s not sent back to %s (%s); the reconciler will send it",
                            job_id,
                            again,
                            type(exc).__name__,
                        )
                admitted.append(None)
                continue
            admitted.append(AdmittedJob(job_id, view.study_instance_uid, prepared, files))
        return admitted

    @staticmethod
    def size(item: AdmittedJob) -> int:
        return max(1, item.ready)

    # ---------------------------------------------------------------- engine and glue

    def begin(self, items: list[AdmittedJob]) -> InferBatch:
        images = [p for item in items for p in item.prepared]
        live = [i for i, p in enumerate(images) if p.skip_reason is None]
        return InferBatch(items, images, live)

    def segment(self, batch: InferBatch) -> InferBatch:
        if batch.live:
            batch.seg, calls = self.models.segment([batch.images[i] for i in batch.live])
            batch.engine_calls += calls
        return batch

    def plan(self, batch: InferBatch) -> InferBatch:
        if not batch.live:
            return batch
        lateral = batch.seg["lateral_probability"]
        lung = batch.seg["lung_probability"]

        def one(row: int) -> ImagePlan:
            image = batch.images[batch.live[row]]
            return self.models.plan(image, float(lateral[row]), lung[row])

        plans = self.map(one, range(len(batch.live)))
        batch.plans = dict(zip(batch.live, plans, strict=True))
        batch.frontal = [i for i in batch.live if batch.plans[i].classifier_input is not None]
        if batch.frontal:
            batch.inputs = np.stack([batch.plans[i].classifier_input for i in batch.frontal])  # type: ignore[misc]
        return batch

    def classify(self, batch: InferBatch) -> InferBatch:
        if batch.inputs is not None:
            batch.out, calls = self.models.classify(batch.inputs)
            batch.engine_calls += calls
            batch.inputs = None
        return batch

    # ---------------------------------------------------------------- writer thread

    def results(self, batch: InferBatch, threshold: Any) -> list[ImageResult]:
        """Every image's result at the networks' grid, in ``batch.images`` order."""
        rows = {i: row for row, i in enumerate(batch.frontal)}
        probabilities = batch.out.get("probabilities")
        heat = batch.out.get("heat")

        def one(i: int) -> ImageResult:
            row = rows.get(i)
            return self.models.image_result(
                batch.images[i],
                batch.plans.get(i),
                threshold,
                None if row is None or probabilities is None else probabilities[row],
                None if row is None or heat is None else heat[row],
            )

        return self.map(one, range(len(batch.images)))

    def persist(self, batch: InferBatch) -> list[int]:
        # per batch: a new one applies at once; version 0 is the loaded networks' own
        threshold = active_threshold(self.settings, self.models.manifest)
        flat = self.results(batch, threshold)
        per_job: dict[int, list[ImageResult]] = {}
        start = 0
        for item in batch.items:
            per_job[item.job_id] = flat[start : start + len(item.prepared)]
            start += len(item.prepared)
        model = self.models.model_info

        def encode(item: AdmittedJob) -> bytes:
            return result_store.encode_results(per_job[item.job_id], model, item.files, threshold)

        payloads = dict(
            zip((item.job_id for item in batch.items), self.map(encode, batch.items), strict=True)
        )
        now = utcnow()
        finished_at = time.monotonic()
        # Core statements on one connection: no ORM objects or unit of work per batch
        with get_engine(self.settings.database_url).begin() as conn:
            moved = jobstate.finish_all(
                conn,
                [item.job_id for item in batch.items],
                "infer",
                model_name=model.name,
                model_version=model.version,
                scheme=model.scheme,
                threshold_version=threshold.version,
                threshold_value=threshold.value,
            )
            replace_image_rows(conn, {job_id: per_job[job_id] for job_id in moved})
            result_store.insert_results(conn, {job_id: payloads[job_id] for job_id in moved})
            if moved:
                conn.execute(
                    _INSERT_TIMINGS,
                    [
                        {
                            "job_id": item.job_id,
                            "stage": "infer",
                            "seconds": finished_at - item.admitted_at,
                            "finished_at": now,
                        }
                        for item in batch.items
                        if item.job_id in moved
                    ],
                )
            conn.execute(
                _INSERT_AUDIT,
                {
                    "at": utcnow(),
                    "actor": self.actor[:64],
                    "action": "infer.batch",
                    "study_instance_uid": None,
                    "job_id": None,
                    "detail": {
                        "jobs": [item.job_id for item in batch.items],
                        "studies": len({item.study_instance_uid for item in batch.items}),
                        "images": len(batch.live),
                        "engine_calls": batch.engine_calls,
                        "threshold_version": threshold.version,
                        "model": model.ref,
                    },
                },
            )
        if moved and self.dispatcher is not None:
            try:
                self.dispatcher.committed("infer", moved)
            except Exception as exc:  # noqa: BLE001 - committed: the reconciler sends them
                log.warning(
                    "%d committed job(s) not sent on (%s); the reconciler will send them",
                    len(moved),
                    type(exc).__name__,
                )
        return moved

    def fail(self, item: AdmittedJob, exc: BaseException) -> None:
        jobstate.fail(self.settings, item.job_id, f"inference failed: {exc!r}", self.actor)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
