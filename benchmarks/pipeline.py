"""End-to-end throughput and latency of the service, batching on versus off, in one run.

Orthanc (the PACS) pushes N single-image studies to the listener in one burst (a PACS
draining a backlog); the workers (one CPU worker for prepare/report/deliver, one infer
consumer, as `screener serve` runs them) screen them and C-STORE each SR and heatmap back
to Orthanc. Measured per study: from the last C-STORE of the study into the listener
(instances.received_at) to the SR stored in Orthanc (Orthanc's C-STORE response, recorded
as deliveries.delivered_at). Single-image CR studies complete at once
(listener.single_image_complete_modalities = ["CR"]), so no quiet period is included.
Broker: Redis (db 14 of 127.0.0.1:6379, flushed); database: a fresh PostgreSQL schema.

    .venv/bin/python benchmarks/pipeline.py --studies 200
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlmodel import col, select  # noqa: E402

from screener.db.models import Delivery, Instance, OutputObject, ScreeningJob, Study  # noqa: E402
from screener.db.session import dispose_engines, session_scope, upgrade  # noqa: E402
from screener.settings import Destination, Settings  # noqa: E402
from screener.testing.dicom_factory import (  # noqa: E402
    StudyIdentity,
    corpus_image,
    make_instance,
    pick_images,
    write_datasets,
)
from tests.orthanc import OrthancServer  # noqa: E402

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/14"
CXR = REPO.parent / "shared" / "data" / "cxr"


@dataclass
class RunResult:
    label: str
    max_batch: int
    studies: int
    delivered: int
    wall_s: float
    latencies_s: list[float]
    engine_calls: int
    batches: int
    mean_batch_images: float
    peak_rss_mb: dict[str, float]
    infer_ms_per_image: float

    @property
    def per_hour(self) -> float:
        return 3600 * self.delivered / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        values = sorted(self.latencies_s)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


def make_studies(directory: Path, n: int) -> list[Path]:
    rows = pick_images(CXR, 60, split="test", view="PA") + pick_images(
        CXR, 60, split="test", view="AP"
    )
    paths: list[Path] = []
    pixels = {r["id"]: corpus_image(CXR, r["id"]) for r in rows}
    for index in range(n):
        row = rows[index % len(rows)]
        ds = make_instance(
            pixels[row["id"]], study=StudyIdentity.new(), modality="CR", view_position=row["view"]
        )
        paths += write_datasets([ds], directory)
    return paths


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_tree_mb(pid: int) -> float:
    """The largest peak RSS of a process and its children (prefork pool processes)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(c) for c in children]
    return max(peak_rss_mb(p) for p in pids)


def infer_ms_per_image(log: Path) -> float:
    """Busy time of the infer consumer per image, from its 'batch N: j jobs, i images in t ms'."""
    pattern = re.compile(r"batch \d+: \d+ jobs, (\d+) images in (\d+) ms")
    images = ms = 0
    for match in pattern.finditer(log.read_text() if log.exists() else ""):
        images += int(match.group(1))
        ms += int(match.group(2))
    return ms / images if images else float("nan")


def one_run(
    label: str,
    max_batch: int,
    max_wait_ms: int,
    files: list[Path],
    work: Path,
    cpu_concurrency: int = 1,
) -> RunResult:
    import redis

    from workers.runner import EmbeddedService

    redis.Redis(host="127.0.0.1", port=6379, db=14).flushdb()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    db_url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    run_dir = work / label
    pacs = OrthancServer(run_dir)
    settings = Settings(  # type: ignore[call-arg]
        data_dir=run_dir / "data", database_url=db_url, broker_url=REDIS_URL
    )
    settings.listener.port = 0
    settings.listener.single_image_complete_modalities = ["CR"]
    settings.listener.allowed_calling_ae_titles = ["ORTHANC"]
    settings.model.max_batch = max_batch
    settings.model.max_wait_ms = max_wait_ms
    settings.reconciler.stale_seconds = 600
    settings.delivery.destinations = [
        Destination(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
    ]
    upgrade(db_url)
    service = EmbeddedService(
        settings, worker_concurrency=cpu_concurrency, log_dir=run_dir / "logs"
    )
    service.start()
    try:
        pacs.modalities["SCREENER"] = ("SCREENER", "127.0.0.1", service.port)
        pacs.start()
        ids = [pacs.upload(p) for p in files]
        time.sleep(8)  # workers up, models loaded
        started = time.monotonic()
        pacs.send_to_modality("SCREENER", ids)
        n = len(files)
        deadline = started + 60 * 30
        delivered = 0
        while time.monotonic() < deadline:
            with session_scope(db_url) as session:
                delivered = len(
                    session.exec(
                        select(ScreeningJob.id).where(ScreeningJob.state == "delivered")
                    ).all()
                )
            if delivered >= n or service.check_children():
                break
            time.sleep(1.0)
        wall = time.monotonic() - started
        rss = {name: peak_rss_tree_mb(proc.pid) for name, proc in service.processes.items()}
        latencies, calls, batches, images = collect(db_url)
    finally:
        service.stop()
        pacs.stop()
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return RunResult(
        label,
        max_batch,
        len(files),
        delivered,
        wall,
        latencies,
        calls,
        batches,
        images / batches if batches else 0.0,
        rss,
        infer_ms_per_image(run_dir / "logs" / "worker-infer.log"),
    )


def collect(db_url: str) -> tuple[list[float], int, int, int]:
    from screener.db.models import AuditLog

    latencies: list[float] = []
    with session_scope(db_url) as session:
        for study in session.exec(select(Study)):
            last_in = session.exec(
                select(sa.func.max(Instance.received_at)).where(Instance.study_id == study.id)
            ).one()
            sr_stored = session.exec(
                select(sa.func.max(Delivery.delivered_at))
                .join(OutputObject, col(OutputObject.id) == col(Delivery.output_id))
                .where(OutputObject.study_instance_uid == study.study_instance_uid)
                .where(OutputObject.kind == "sr")
            ).one()
            if last_in is not None and sr_stored is not None:
                latencies.append((sr_stored - last_in).total_seconds())
        calls = batches = images = 0
        for audit in session.exec(select(AuditLog).where(AuditLog.action == "infer.batch")):
            detail = audit.detail or {}
            calls += int(detail.get("engine_calls", 0))
            images += int(detail.get("images", 0))
            batches += 1
    return latencies, calls, batches, images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=int, default=200)
    parser.add_argument(
        "--cpu-concurrency",
        type=int,
        default=1,
        help="processes of the prepare/report/deliver worker",
    )
    args = parser.parse_args()
    console = Console(width=170)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        files = make_studies(work / "studies", args.studies)
        runs = [
            one_run(
                "batching-on", args.max_batch, args.max_wait_ms, files, work, args.cpu_concurrency
            ),
            one_run("batching-off", 1, 0, files, work, args.cpu_concurrency),
        ]
    base = runs[1]
    table = Table(
        title=f"pipeline end to end, {args.studies} single-image CR studies in one burst "
        "(Orthanc -> listener -> workers -> SR stored in Orthanc)"
    )
    for column in (
        "run",
        "max_batch",
        "delivered",
        "wall s",
        "studies/h",
        "x off",
        "p50 s",
        "p95 s",
        "engine calls",
        "images/batch",
        "infer ms/image",
        "peak RSS MB per process (cpu / infer)",
    ):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(
            r.label,
            str(r.max_batch),
            f"{r.delivered}/{r.studies}",
            f"{r.wall_s:.1f}",
            f"{r.per_hour:.0f}",
            f"{r.per_hour / base.per_hour:.2f}" if base.per_hour else "-",
            f"{r.pct(0.5):.1f}",
            f"{r.pct(0.95):.1f}",
            str(r.engine_calls),
            f"{r.mean_batch_images:.1f}",
            f"{r.infer_ms_per_image:.0f}",
            " / ".join(f"{r.peak_rss_mb.get(k, float('nan')):.0f}" for k in ("cpu", "infer")),
        )
    console.print(table)
    console.print(
        "latency = last C-STORE of the study into the listener -> SR stored in Orthanc; "
        f"p50/p95 over delivered studies; 2-core machine, CPU worker with "
        f"{args.cpu_concurrency} process(es) + 1 infer consumer; "
        f"statistics.mean latency on/off: {statistics.fmean(runs[0].latencies_s or [0]):.1f} / "
        f"{statistics.fmean(runs[1].latencies_s or [0]):.1f} s"
    )


if __name__ == "__main__":
    main()
