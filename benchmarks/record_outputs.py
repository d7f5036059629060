"""CPU of recording one study's outputs: ``screener.delivery.record_outputs`` against the
ORM version it replaced (kept below as :func:`record_outputs_orm`), interleaved in one process.

    .venv/bin/python benchmarks/record_outputs.py [--studies 24] [--destinations 1]
                                                  [--database-url URL | --postgres]

Each study is one PA image, the SR and heatmap SC that ``write_study_outputs`` writes for
it (``tests.report_results.make_result``), and a job. Both versions record their own
studies in turns (which goes first alternates), on the same fresh database: SQLite in a
temporary folder by default, ``--postgres`` a fresh schema in the ``test`` database
(dropped afterwards), or ``--database-url``. Thread CPU (``time.thread_time``) around each
call; ``first``: a study's first recording (what the report stage does), ``again``: the
same call repeated (an identical re-record). Prints medians and quartiles in ms.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from sqlmodel import col, select  # noqa: E402

from screener.db.models import AuditLog, Delivery, OutputObject  # noqa: E402
from screener.db.session import dispose_engines, session_scope, upgrade  # noqa: E402
from screener.delivery import output_kind, record_outputs  # noqa: E402
from screener.reports.writer import write_study_outputs  # noqa: E402
from screener.settings import Destination, Settings  # noqa: E402
from tests.report_results import make_job, make_result  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

Record = Callable[[Settings, int, Iterable[Path]], list[OutputObject]]


def record_outputs_orm(
    settings: Settings, job_id: int, paths: Iterable[Path]
) -> list[OutputObject]:
    """``record_outputs`` as it was before the Core statements (commit 441f3de)."""
    headers = [(Path(p), pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]
    destinations = [d.name for d in settings.delivery.destinations]
    outputs: list[OutputObject] = []
    with session_scope(settings.database_url) as session:
        sops = [str(ds.SOPInstanceUID) for _, ds in headers]
        known_rows = {
            row.sop_instance_uid: row
            for row in session.exec(
                select(OutputObject).where(col(OutputObject.sop_instance_uid).in_(sops))
            ).all()
        }
        for path, ds in headers:
            sop = str(ds.SOPInstanceUID)
            row = known_rows.get(sop)
            if row is None:
                row = OutputObject(
                    job_id=job_id,
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_instance_uid=sop,
                    sop_class_uid=str(ds.SOPClassUID),
                    kind=output_kind(str(ds.SOPClassUID)),
                    file_path=str(path),
                )
                known_rows[sop] = row
            else:
                row.file_path = str(path)
                row.job_id = job_id
                row.pruned_at = None
            session.add(row)
            outputs.append(row)
        session.flush()
        ids = [row.id for row in outputs if row.id is not None]
        queued: set[tuple[int | None, str]] = set(
            session.exec(
                select(Delivery.output_id, Delivery.destination).where(
                    col(Delivery.output_id).in_(ids)
                )
            ).all()
        )
        for row in outputs:
            for name in destinations:
                if (row.id, name) not in queued:
                    queued.add((row.id, name))
                    session.add(Delivery(output_id=row.id or 0, destination=name))
        session.add(
            AuditLog(
                actor="delivery",
                action="outputs.recorded",
                job_id=job_id,
                study_instance_uid=headers[0][1].StudyInstanceUID if headers else None,
                detail={"outputs": len(outputs), "destinations": destinations},
            )
        )
    return outputs


def postgres_schema() -> tuple[str, Callable[[], None]]:
    """A fresh schema in the ``test`` database (as tests/conftest.py makes them), and
    what drops it."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}", drop


def make_studies(settings: Settings, root: Path, count: int) -> list[tuple[int, list[Path]]]:
    """``count`` one-image studies: a job and the SR + SC written for it."""
    studies = []
    for i in range(count):
        result, _ = make_result(root / f"study-{i}", ["PA"], scores=[0.7])
        paths = write_study_outputs(result, root / f"outbox-{i}", settings)
        studies.append((make_job(settings, result.study_instance_uid), paths))
    return studies


def cpu_ms(record: Record, settings: Settings, job_id: int, paths: list[Path]) -> float:
    gc.collect()
    start = time.thread_time()
    record(settings, job_id, paths)
    return (time.thread_time() - start) * 1000.0


def check_same_rows(settings: Settings) -> None:
    """Both versions left the same rows for their studies (ids and times aside)."""
    with session_scope(settings.database_url) as session:
        outputs = session.exec(select(OutputObject)).all()
        deliveries = session.exec(select(Delivery)).all()
        audit = session.exec(select(AuditLog)).all()
    by_output: defaultdict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for d in deliveries:
        by_output[d.output_id].append((d.destination, d.state, d.attempts))
    shapes = {
        (o.kind, o.sop_class_uid, Path(o.file_path).name[:3], o.pruned_at is None) for o in outputs
    }
    assert len(shapes) == 2, shapes  # one SR and one SC shape, for every study
    assert len({tuple(sorted(v)) for v in by_output.values()}) == 1
    assert len(by_output) == len(outputs)
    assert len({str(a.detail) for a in audit}) == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=24, help="per version")
    parser.add_argument("--destinations", type=int, default=1)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--postgres", action="store_true", help="a fresh schema in `test`")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="record-outputs-") as tmp:
        root = Path(tmp)
        drop: Callable[[], None] = dispose_engines
        url = args.database_url or f"sqlite:///{root / 'db.sqlite3'}"
        if args.postgres:
            url, drop = postgres_schema()
        try:
            os.environ["SCREENER_DATA_DIR"] = str(root / "data")
            os.environ["SCREENER_DATABASE_URL"] = url
            settings = Settings()
            settings.ensure_dirs()
            upgrade(url)
            destinations = [
                Destination(ae_title=f"PACS{i}", host="127.0.0.1", port=11112 + i)
                for i in range(args.destinations)
            ]
            settings.delivery.destinations = destinations
            versions: dict[str, Record] = {"orm": record_outputs_orm, "core": record_outputs}
            warm = 3
            studies = make_studies(settings, root, 2 * (args.studies + warm))
            first: dict[str, list[float]] = {name: [] for name in versions}
            again: dict[str, list[float]] = {name: [] for name in versions}
            for i in range(args.studies + warm):
                order = list(versions) if i % 2 == 0 else list(reversed(versions))
                for k, name in enumerate(order):
                    job_id, paths = studies[2 * i + k]
                    cost = cpu_ms(versions[name], settings, job_id, paths)
                    repeat = cpu_ms(versions[name], settings, job_id, paths)
                    if i >= warm:
                        first[name].append(cost)
                        again[name].append(repeat)
            check_same_rows(settings)
            dialect = url.split(":", 1)[0].split("+", 1)[0]
            print(
                f"record_outputs, one-image study (SR + SC), {args.destinations} destination(s), "
                f"{dialect}, {args.studies} studies per version, thread CPU ms"
            )
            for label, samples in (("first", first), ("again", again)):
                for name, values in samples.items():
                    q1, _, q3 = statistics.quantiles(values, n=4)
                    median = statistics.median(values)
                    print(f"  {label:5} {name:4}  median {median:6.3f}  (q1 {q1:.3f}, q3 {q3:.3f})")
        finally:
            drop()


if __name__ == "__main__":
    main()
