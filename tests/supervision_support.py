"""Helpers for the supervision tests: an infer process that hangs in its engine call (the
first one started in a test only), and a queued job whose state the test follows."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from screener.db.session import upgrade
from tests.workers_support import make_job

# The job has moved past the infer stage (on to report, deliver or done).
MOVED_ON = ("inferred", "reporting", "reported", "delivering", "completed", "delivered")

_HANG_INFER = """\
import os, sys, threading
from pathlib import Path
if os.environ.get("SUPERVISION_TEST_INJECT") == "hang_infer" and sys.argv[1:4] == [
    "worker", "--queues", "infer"
]:
    import workers.infer_stage as stage

    engine_call = stage.ScreeningHandler.segment

    def segment(self, batch):
        marker = Path(os.environ["SUPERVISION_TEST_MARKER"])
        if not marker.exists():  # the first infer process only
            marker.touch()
            threading.Event().wait()  # an engine call that never returns
        return engine_call(self, batch)

    stage.ScreeningHandler.segment = segment
"""


def hang_first_infer_process(tmp_path: Path) -> dict[str, str]:
    """Environment under which the first ``screener worker --queues infer`` process of the
    test hangs in its first engine call (a sitecustomize on PYTHONPATH); the next ones
    work (the marker file :func:`hung_once` looks at exists then)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_HANG_INFER)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "SUPERVISION_TEST_INJECT": "hang_infer",
        "SUPERVISION_TEST_MARKER": str(tmp_path / "infer-hung-once"),
    }


def hung_once(tmp_path: Path) -> bool:
    """The first infer process entered its hanging engine call."""
    return (tmp_path / "infer-hung-once").exists()


def job_state(data: Path, job_id: int) -> str:
    with sqlite3.connect(data / "screener.sqlite3", timeout=10) as db:
        row = db.execute("SELECT state FROM screening_jobs WHERE id = ?", (job_id,)).fetchone()
    return str(row[0])


def queued_job(tmp_path: Path, cxr_dir: Path) -> int:
    """A received study's job in ``<tmp_path>/data``, waiting for its first dispatch (a
    reconciler sends it)."""
    from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets

    database_url = f"sqlite:///{tmp_path / 'data' / 'screener.sqlite3'}"
    (tmp_path / "data").mkdir()
    upgrade(database_url)
    (row,) = pick_images(cxr_dir, 1, view="PA", split="test")
    files = write_datasets(make_study([(corpus_image(cxr_dir, row["id"]), "PA")]), tmp_path / "in")
    return make_job(database_url, "1.2.826.0.1.83.4242", files=files)
