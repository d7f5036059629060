"""Database round trips per study, counted per stage (issue 11: "DB round trips per study
counted and cut"), so that a change adding statements to a stage's path is seen.

One single-image PA study goes through the real stages on SQLite: prepare, the batching
infer consumer (real models, embedded broker), report, and delivery to a dcmtk storescp.
Every statement the main database executes is counted by stage; each stage has a budget:
the count measured when this test was written. Lower is welcome (lower the budget then);
higher fails with the statements listed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event

from screener.db.models import InferResult, JobState, ScreeningJob
from screener.db.session import get_engine, session_scope
from screener.settings import Destination, Settings
from tests.dcmtk import StoreSCP
from tests.workers_support import make_job, require_models
from workers import stages

# Statements on the main database for a one-image study, per stage (measured 2026-11-30;
# report +2 on 2026-12-01: infer's results are read from and deleted in the database, where
# they were a spool file; then -3: the outputs recorded with Core statements).
BUDGET = {"prepare": 5, "infer": 8, "report": 11, "deliver": 11}


@contextmanager
def counted(settings: Settings) -> Iterator[list[str]]:
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(" ".join(statement.split())[:160])

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def _state(settings: Settings, job_id: int) -> str:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job.state


def test_statements_per_stage_stay_within_budget(
    sqlite_settings: Settings, cxr_dir: Path, tmp_path: Path
) -> None:
    require_models()
    from screener.screening.models import ScreeningModels
    from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets
    from workers.batching import BatchingConsumer, BatchPolicy
    from workers.celery_app import TASK_FOR_QUEUE, create_app
    from workers.infer_stage import ScreeningHandler

    settings = sqlite_settings
    pacs = StoreSCP(tmp_path / "pacs", fork=False)
    pacs.start()
    try:
        settings.delivery.destinations = [
            Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.port)
        ]
        row = pick_images(cxr_dir, 1, view="PA", split="test")[0]
        files = write_datasets(make_study([(corpus_image(cxr_dir, row["id"]), "PA")]), tmp_path)
        job = make_job(settings.database_url, "1.2.826.0.1.79.1", files=files)
        models = ScreeningModels.from_settings(settings)
        app = create_app(Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"))  # type: ignore[call-arg]
        handler = ScreeningHandler(settings, models, glue_threads=1)
        counts: dict[str, list[str]] = {}

        with counted(settings) as counts["prepare"]:
            assert stages.run_prepare(settings, job)
        app.send_task(TASK_FOR_QUEUE["infer"], args=[job], queue="infer", routing_key="infer")
        with counted(settings) as counts["infer"]:
            BatchingConsumer(app, "infer", handler, BatchPolicy(8, 0.2)).run(idle_timeout_s=1.0)
        handler.close()
        assert _state(settings, job) == JobState.INFERRED.value
        with counted(settings) as counts["report"]:
            assert stages.run_report(settings, job)
        with session_scope(settings.database_url) as session:  # report used them up
            assert session.get(InferResult, job) is None
        with counted(settings) as counts["deliver"]:
            outcome = stages.run_deliver(settings, job)
        assert outcome.state == "delivered", outcome
        assert len(list((tmp_path / "pacs").iterdir())) == 2  # SR and heatmap SC
    finally:
        pacs.stop()

    table = {stage: len(statements) for stage, statements in counts.items()}
    print(f"statements per stage for one study: {table} (total {sum(table.values())})")
    for stage, statements in counts.items():
        print(stage, *statements, sep="\n  ")
    for stage, statements in counts.items():
        assert len(statements) <= BUDGET[stage], (stage, len(statements), statements)
        assert len(statements) > 0, stage  # the counter saw the stage's database work
