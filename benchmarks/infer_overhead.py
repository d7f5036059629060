"""The infer consumer's own cost: what one consumer spends around the engines, per image.

    .venv/bin/python benchmarks/infer_overhead.py [--images 2000] [--batches 8 32 64]
    .venv/bin/python benchmarks/infer_overhead.py --engine onnxruntime --images 64
    .venv/bin/python benchmarks/infer_overhead.py --batches 32 --consumers 2

Default (``--engine zero``): the two engines are replaced by a zero-cost engine that
*sleeps* the time a GPU would take (``--gpu-ms`` per call + ``--gpu-ms-per-image``) and
returns the real networks' outputs for the same inputs (computed once, up front), so the
consumer does exactly the work it does in production — claim, load the prepared files,
view decision, lung mask, classifier input, calibration, CAM lung fraction, the results
row, image rows, job states, stage timings, the audit row, the dispatch of every
job to ``report`` — while the engine costs no CPU. Measured for one consumer process
(``workers.batching.BatchingConsumer`` with ``workers.infer_stage.ScreeningHandler``),
in a process settled as the infer worker's is (``screener.startup_heap.settle_worker_process``:
start-up heap frozen, freed memory kept, numpy's BLAS on one thread), with the backlog
waiting in the broker (Redis db 14 of 127.0.0.1:6379, flushed) and the
embedded SQLite database:

- CPU ms per image outside engine calls: process CPU time over the run minus the CPU spent
  inside engine calls, per image (the consumer's overhead: what a GPU host pays per image);
- images/s: images committed per wall-clock second from the first claim to the last ack;
- per-thread CPU ms per image (loader, segment, plan, classify, writer, broker);
- the glue floor, measured in the same run before the consumer starts: ``plan`` and
  ``image_result`` alone on one thread (:func:`glue_floor`), and the consumer's CPU per
  image as a multiple of it.

``--consumers N`` forks N consumer processes on the same queue (N infer workers on one
host): images/s of them all, CPU per image summed over them (no per-thread columns).

``--engine onnxruntime`` runs the real models instead (CPU time per study of the whole
infer stage, engine included: the "after" figure of the infer stage).
Prepared inputs are real: corpus radiographs at 2048 x 2048, prepared once and hard-linked
into every job's spool folder.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import insert, select  # noqa: E402
from sqlmodel import col  # noqa: E402

from screener.db.models import JobState, ScreeningJob, Study, utcnow  # noqa: E402
from screener.db.session import dispose_engines, session_scope, upgrade  # noqa: E402
from screener.settings import Settings  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/14"
CXR = REPO.parent / "shared" / "data" / "cxr"
TEMPLATES = 8


class ZeroCostEngine:
    """An engine that costs no CPU: it sleeps what a GPU would take and hands back outputs
    of the real network for the same input (looked up by the input's checksum)."""

    def __init__(self, real: Any, known: dict[bytes, dict[str, np.ndarray]], ms: float, per: float):
        self.input_spec = real.input_spec
        self.output_names = real.output_names
        self.version = "zero-cost"
        self.model_hash = real.model_hash
        self.known = known
        self.seconds = ms / 1000
        self.per_image = per / 1000
        self.cpu_s = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def key(x: np.ndarray) -> bytes:
        return np.ascontiguousarray(x[0, 100:124, 100:124]).tobytes()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cpu = time.thread_time()
        rows = [self.known[self.key(x)] for x in batch]
        out = {name: np.stack([r[name] for r in rows]) for name in self.output_names}
        with self._lock:
            self.cpu_s += time.thread_time() - cpu
        time.sleep(self.seconds + self.per_image * len(batch))
        return out


def glue_floor(
    models: Any, files: list[Path], settings: Settings, n: int = 400
) -> dict[str, float]:
    """The per-image work no consumer design avoids while the engines' inputs and outputs
    stay bit for bit what they are: ``plan`` (view, lung mask at the working image, the exact
    Pillow crop resize and equalisation of the classifier input) and ``image_result``
    (calibration, call, CAM lung fraction), on one thread, no broker or database, the engine
    calls not counted: CPU ms per image."""
    from screener.screening.prepare import PreparedImage
    from screener.startup_heap import settle_worker_process
    from screener.thresholds import embedded_info

    settle_worker_process()  # as the consumer runs: BLAS on this thread, freed memory kept
    threshold = embedded_info(settings)
    images = [PreparedImage.load(f, display=False) for f in files]
    segmented = [models.segment([image])[0] for image in images]
    plan_s = result_s = 0.0
    for index in range(-len(images), n):  # one untimed pass first: caches, first touches
        if index == 0:
            plan_s = result_s = 0.0
        image, seg = images[index % len(images)], segmented[index % len(images)]
        cpu = time.thread_time()
        plan = models.plan(image, float(seg["lateral_probability"][0]), seg["lung_probability"][0])
        plan_s += time.thread_time() - cpu
        if plan.classifier_input is None:
            continue
        out, _ = models.classify(plan.classifier_input[None])
        cpu = time.thread_time()
        models.image_result(image, plan, threshold, out["probabilities"][0], out["heat"][0])
        result_s += time.thread_time() - cpu
    return {"plan_ms": 1000 * plan_s / n, "result_ms": 1000 * result_s / n}


def templates(work: Path, settings: Settings) -> list[Path]:
    """Prepared files of real 2048 px radiographs (PA and AP)."""
    from screener.screening.prepare import prepare_instance
    from screener.testing.dicom_factory import (
        StudyIdentity,
        corpus_image,
        make_instance,
        pick_images,
        write_datasets,
    )

    rows = pick_images(CXR, TEMPLATES // 2, split="test", view="PA") + pick_images(
        CXR, TEMPLATES // 2, split="test", view="AP"
    )
    out = []
    for index, row in enumerate(rows):
        ds = make_instance(
            corpus_image(CXR, row["id"]),
            study=StudyIdentity.new(),
            view_position=row["view"],
            target_size=(2048, 2048),
        )
        [path] = write_datasets([ds], work / "dicom")
        prepared = prepare_instance(path, settings)
        assert prepared.skip_reason is None, prepared.skip_reason
        target = work / "templates" / f"{index:02d}.prepared"
        prepared.save(target)
        out.append(target)
    return out


def make_jobs(settings: Settings, files: list[Path], n: int) -> list[int]:
    """n single-image jobs in ``prepared``, their spool files hard links to the templates."""
    now = utcnow()
    uids = [f"1.2.826.0.1.3680043.10.999.{os.getpid()}.{i}" for i in range(n)]
    with session_scope(settings.database_url) as session:
        session.execute(
            insert(Study),
            [
                {
                    "study_instance_uid": u,
                    "is_complete": True,
                    "completed_at": now,
                    "first_received_at": now,
                    "last_received_at": now,
                    "instance_count": 1,
                    "own_output_only": False,
                }
                for u in uids
            ],
        )
    with session_scope(settings.database_url) as session:
        studies: dict[str, int] = {
            uid: int(i)
            for uid, i in session.execute(
                select(col(Study.study_instance_uid), col(Study.id))
            ).all()
        }
        rows = [
            {
                "study_id": studies[u],
                "state": JobState.PREPARED.value,
                "created_at": now,
                "updated_at": now,
                "trigger": "ingest",
                "attempts": 0,
            }
            for u in uids
        ]
        session.execute(insert(ScreeningJob), rows)
        ids = sorted(int(i) for (i,) in session.execute(select(col(ScreeningJob.id))).all())
    from workers.result_store import prepared_dir

    for job_id, template in zip(ids, itertools.cycle(files), strict=False):
        directory = prepared_dir(settings, job_id)
        directory.mkdir(parents=True)
        os.link(template, directory / "0000.prepared")
    return ids


def consumer_for(
    args: argparse.Namespace, settings: Settings, models: Any, max_batch: int, app: Any
) -> tuple[Any, Any]:
    """The infer handler and its batching consumer, as an infer worker builds them."""
    from workers.batching import BatchingConsumer, BatchPolicy
    from workers.dispatch import Dispatcher
    from workers.infer_stage import ScreeningHandler

    handler = ScreeningHandler(
        settings, models, dispatcher=Dispatcher(app, settings), glue_threads=args.glue_threads
    )
    policy = BatchPolicy(max_batch, args.max_wait_ms / 1000, args.depth)
    return handler, BatchingConsumer(app, "infer", handler, policy)


def run(
    args: argparse.Namespace, max_batch: int, files: list[Path], work: Path, models: Any
) -> dict[str, float]:
    import redis

    from screener.startup_heap import settle_worker_process
    from workers.celery_app import TASK_FOR_QUEUE, create_app

    redis.Redis.from_url(REDIS_URL).flushdb()
    run_dir = work / f"run-b{max_batch}"
    settings = Settings(
        data_dir=run_dir, database_url=f"sqlite:///{run_dir}/db.sqlite3", broker_url=REDIS_URL
    )
    settings.model.max_batch = max_batch
    settings.ensure_dirs()
    upgrade(settings.database_url)
    jobs = make_jobs(settings, files, args.images)
    app = create_app(settings)
    with app.producer_or_acquire() as producer:
        for job_id in jobs:
            app.send_task(
                TASK_FOR_QUEUE["infer"],
                args=[job_id],
                queue="infer",
                routing_key="infer",
                producer=producer,
            )
    models.max_batch = max_batch
    if args.consumers > 1:
        dispose_engines()  # each consumer process opens its own connections
        return run_processes(args, settings, models, max_batch)
    handler, consumer = consumer_for(args, settings, models, max_batch, app)
    # the process as the infer worker settles it before it consumes (workers.runner):
    # start-up heap frozen, freed memory kept, numpy's BLAS on one thread
    settle_worker_process()
    engines = [models.segmenter, models.classifier]
    engine_cpu0 = sum(getattr(e, "cpu_s", 0.0) for e in engines)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done_at = [wall0]
    consumer.on_batch = lambda jobs_, images: done_at.__setitem__(0, time.perf_counter())
    consumer.run(idle_timeout_s=1.0)
    cpu = time.process_time() - cpu0
    handler.close()
    engine_cpu = sum(getattr(e, "cpu_s", 0.0) for e in engines) - engine_cpu0
    n = consumer.images
    wall = done_at[0] - wall0
    row = {
        "max_batch": max_batch,
        "images": n,
        "batches": consumer.batches,
        "images_per_s": n / wall if wall > 0 else float("nan"),
        "cpu_ms": 1000 * (cpu - engine_cpu) / max(n, 1),
        "engine_cpu_ms": 1000 * engine_cpu / max(n, 1),
    }
    for name, seconds in consumer.thread_cpu_s.items():
        row[f"thread:{name}"] = 1000 * seconds / max(n, 1)
    row["thread:glue pool"] = 1000 * cpu / max(n, 1) - sum(
        1000 * seconds / max(n, 1) for seconds in consumer.thread_cpu_s.values()
    )
    dispose_engines()
    return row


def run_processes(
    args: argparse.Namespace, settings: Settings, models: Any, max_batch: int
) -> dict[str, float]:
    """``--consumers N``: N consumer processes (forked, each with its own broker and database
    connections, as N infer workers on one host) on the same queue; images/s of them all
    from the first claim to the last commit, CPU per image summed over the processes."""
    import json

    from screener.startup_heap import settle_worker_process
    from workers.celery_app import create_app

    start = time.perf_counter() + 0.5  # every process starts consuming at this moment
    children: list[tuple[int, int]] = []
    for _ in range(args.consumers):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a consumer process
            os.close(read_end)
            _, consumer = consumer_for(args, settings, models, max_batch, create_app(settings))
            settle_worker_process()
            engines = [models.segmenter, models.classifier]
            engine_cpu0 = sum(getattr(e, "cpu_s", 0.0) for e in engines)
            time.sleep(max(0.0, start - time.perf_counter()))
            cpu0 = time.process_time()
            done_at = [start]
            consumer.on_batch = lambda jobs_, images, last=done_at: last.__setitem__(
                0, time.perf_counter()
            )
            consumer.run(idle_timeout_s=1.0)
            report = {
                "images": consumer.images,
                "cpu_s": time.process_time() - cpu0,
                "engine_cpu_s": sum(getattr(e, "cpu_s", 0.0) for e in engines) - engine_cpu0,
                "done_at": done_at[0],
            }
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    reports = []
    for pid, read_end in children:
        with os.fdopen(read_end, "rb") as pipe:
            reports.append(json.loads(pipe.read()))
        os.waitpid(pid, 0)
    n = sum(r["images"] for r in reports)
    wall = max(r["done_at"] for r in reports) - start
    cpu = sum(r["cpu_s"] - r["engine_cpu_s"] for r in reports)
    return {
        "max_batch": max_batch,
        "images": n,
        "images_per_s": n / wall if wall > 0 else float("nan"),
        "cpu_ms": 1000 * cpu / max(n, 1),
        "engine_cpu_ms": 1000 * sum(r["engine_cpu_s"] for r in reports) / max(n, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--engine", choices=["zero", "onnxruntime"], default="zero")
    parser.add_argument("--gpu-ms", type=float, default=1.0, help="sleep per engine call")
    parser.add_argument("--gpu-ms-per-image", type=float, default=0.1)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--glue-threads", type=int, default=0)
    parser.add_argument(
        "--consumers", type=int, default=1, help="consumer processes on the queue (default 1)"
    )
    args = parser.parse_args()

    from screener.screening.models import ScreeningModels
    from screener.screening.prepare import PreparedImage

    work = Path(tempfile.mkdtemp(prefix="infer-overhead-"))
    base = Settings(data_dir=work / "base", database_url=f"sqlite:///{work}/base.sqlite3")
    files = templates(work, base)
    models = ScreeningModels.from_settings(base)
    if args.engine == "zero":
        prepared = [PreparedImage.load(f, display=False) for f in files]
        seg_known: dict[bytes, dict[str, np.ndarray]] = {}
        cls_known: dict[bytes, dict[str, np.ndarray]] = {}
        for image in prepared:
            seg, _ = models.segment([image])
            seg_known[ZeroCostEngine.key(image.network_input)] = {  # type: ignore[arg-type]
                k: v[0] for k, v in seg.items()
            }
            plan = models.plan(
                image, float(seg["lateral_probability"][0]), seg["lung_probability"][0]
            )
            if plan.classifier_input is not None:
                out = models.classifier.infer(plan.classifier_input[None])
                cls_known[ZeroCostEngine.key(plan.classifier_input)] = {
                    k: v[0] for k, v in out.items()
                }
        models.segmenter = ZeroCostEngine(
            models.segmenter, seg_known, args.gpu_ms, args.gpu_ms_per_image
        )
        models.classifier = ZeroCostEngine(
            models.classifier, cls_known, args.gpu_ms, args.gpu_ms_per_image
        )
    else:
        for engine in (models.segmenter, models.classifier):
            engine.cpu_s = 0.0
            original = engine.infer

            def timed(batch: np.ndarray, original: Any = original, engine: Any = engine) -> Any:
                cpu = time.thread_time()
                try:
                    return original(batch)
                finally:
                    engine.cpu_s += time.thread_time() - cpu

            engine.infer = timed

    floor = glue_floor(models, files, base)  # in this run, before the consumer runs
    floor_ms = floor["plan_ms"] + floor["result_ms"]
    rows = [run(args, b, files, work, models) for b in args.batches]
    console = Console(width=200)
    title = (
        f"infer consumer, zero-cost engine ({args.gpu_ms:g} ms + {args.gpu_ms_per_image:g} "
        f"ms/image per call), {args.images} single-image jobs, {os.cpu_count()} cores"
        if args.engine == "zero"
        else f"infer stage with onnxruntime, {args.images} single-image 2048 px studies"
    ) + (f", {args.consumers} consumer processes" if args.consumers > 1 else "")
    table = Table(title=title)
    threads = sorted({k for r in rows for k in r if k.startswith("thread:")})
    for column in [
        "max_batch",
        "images/s",
        "CPU ms/image outside engine",
        "x glue floor",
        "engine CPU ms/img",
    ]:
        table.add_column(column, justify="right")
    for name in threads:
        table.add_column(name.split(":", 1)[1] + " ms", justify="right")
    for r in rows:
        table.add_row(
            str(r["max_batch"]),
            f"{r['images_per_s']:.0f}",
            f"{r['cpu_ms']:.2f}",
            f"{r['cpu_ms'] / floor_ms:.2f}",
            f"{r['engine_cpu_ms']:.2f}",
            *[f"{r.get(t, float('nan')):.2f}" for t in threads],
        )
    console.print(table)
    console.print(
        "thread columns: CPU ms per image of each consumer thread (glue pool: the rest); "
        "targets: <= 1 ms/image outside the engine, >= 1,000 images/s"
    )
    console.print(
        f"glue floor, same run: {floor_ms:.2f} CPU ms per image on one thread (plan "
        f"{floor['plan_ms']:.2f} + result {floor['result_ms']:.2f}): the exact image work "
        "of every image, whatever the consumer around it"
    )


if __name__ == "__main__":
    main()
