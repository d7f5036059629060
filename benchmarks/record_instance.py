"""CPU and statements of ``screener.ingest.record_instance``, this tree vs a baseline revision.

    .venv/bin/python benchmarks/record_instance.py [--baseline-rev HEAD | --baseline-file F]
        [--calls 400]
        [--database-url URL] [--single-image-modalities CR] [--profile]

Every call records a new single-image CR study (new study, new series, new instance): what
the listener does for each radiograph before it answers the C-STORE. The baseline is
``screener/ingest.py`` at ``--baseline-rev`` (``git show``), imported next to the current
one; calls alternate between the two in one process, so both see the same machine, tables
and caches. Prints the median thread CPU per call and the statements each call sends
(SQLAlchemy ``before_cursor_execute``; BEGIN and COMMIT are not counted).

SQLite: a new file in a temporary folder. PostgreSQL (``--database-url
postgresql+psycopg://...``): a new schema in that database, dropped at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from screener.db.session import dispose_engines, get_engine, upgrade  # noqa: E402
from screener.dicom.dataset_check import InstanceHeader  # noqa: E402
from screener.ingest import ReceivedFile  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.9"


def load_baseline(rev: str, folder: Path, file: Path | None = None) -> ModuleType:
    """``screener/ingest.py`` as it was at ``rev`` (or the module in ``file``), imported as
    its own module."""
    if file is not None:
        source = file.read_text()
    else:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:screener/ingest.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    path = folder / "ingest_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ingest_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ingest_baseline"] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def load_current() -> ModuleType:
    import screener.ingest

    return screener.ingest


@contextmanager
def database(url: str | None, folder: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a new PostgreSQL schema."""
    if url is None or url.startswith("sqlite"):
        url = f"sqlite:///{folder / 'bench.sqlite3'}"
        upgrade(url)
        yield url
        dispose_engines()
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    scoped = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    try:
        upgrade(scoped)
        yield scoped
    finally:
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def new_study(n: int, tag: str) -> tuple[InstanceHeader, ReceivedFile]:
    """The header and spool record of the only image of a new CR study."""
    study = f"{UID_ROOT}.{tag}.{n}"
    header = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        sop_instance_uid=f"{study}.1.1",
        study_instance_uid=study,
        series_instance_uid=f"{study}.1",
        modality="CR",
        view_position="PA",
        image_laterality=None,
        body_part_examined="CHEST",
        photometric_interpretation="MONOCHROME2",
        patient_id=f"PID{n}",
        accession_number=f"ACC{n}",
        study_date="20260101",
        series_description="CHEST PA",
        manufacturer_model_name="CXR-Sim 1",
    )
    received = ReceivedFile(
        file_path=f"/spool/{tag}/{n}.dcm",
        size_bytes=10_000_000,
        content_digest=f"blake3:{uuid.uuid4().hex * 2}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae_title="MODALITY",
        source_address="127.0.0.1:40000",
    )
    return header, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline-rev", default="HEAD")
    parser.add_argument("--baseline-file", type=Path, default=None, help="instead of a rev")
    parser.add_argument("--calls", type=int, default=400, help="per variant")
    parser.add_argument("--database-url", default=None, help="default: a new SQLite file")
    parser.add_argument("--single-image-modalities", default="", help="e.g. CR")
    parser.add_argument("--warmup", type=int, default=30, help="calls per variant, not timed")
    parser.add_argument("--profile", action="store_true", help="cProfile the current variant")
    args = parser.parse_args()
    modalities = [m for m in args.single_image_modalities.split(",") if m]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        variants: dict[str, ModuleType] = {
            "baseline": load_baseline(args.baseline_rev, folder, args.baseline_file),
            "current": load_current(),
        }
        with database(args.database_url, folder) as url:
            statements: list[str] = []

            def count(*_args: Any, **_kw: Any) -> None:
                statements.append(_args[2])

            event.listen(get_engine(url), "before_cursor_execute", count)
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            sent: dict[str, list[int]] = {name: [] for name in variants}
            texts: dict[str, list[str]] = {}
            serial = 0
            for i in range(args.warmup + args.calls):
                for name, module in variants.items() if i % 2 else reversed(variants.items()):
                    serial += 1
                    header, received = new_study(serial, name)
                    record: Callable[..., Any] = module.record_instance
                    statements.clear()
                    start = time.thread_time()
                    record(url, header, received, modalities, skip_reason=None)
                    spent = time.thread_time() - start
                    if i >= args.warmup:
                        cpu[name].append(spent)
                        sent[name].append(len(statements))
                        texts.setdefault(name, list(statements))
            backend = url.split(":", 1)[0]
            print(f"{backend}, {args.calls} calls each, modalities={modalities or 'none'}")
            for name in variants:
                print(
                    f"  {name:8s} thread CPU median {statistics.median(cpu[name]) * 1e3:.3f} ms"
                    f" (p25 {statistics.quantiles(cpu[name], n=4)[0] * 1e3:.3f},"
                    f" p75 {statistics.quantiles(cpu[name], n=4)[2] * 1e3:.3f}),"
                    f" statements {statistics.median(sent[name]):.0f}"
                )
            for name in variants:
                print(f"  {name} statements:")
                for text in texts[name]:
                    print("    " + " ".join(text.split())[:150])
            if args.profile:
                profiler = cProfile.Profile()
                module = variants["current"]
                for n in range(200):
                    header, received = new_study(n, "profile")
                    profiler.runcall(
                        module.record_instance, url, header, received, modalities, skip_reason=None
                    )
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
