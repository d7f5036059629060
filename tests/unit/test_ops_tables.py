"""What the CLI prints from the database: text a peer controls is shown as text (never read
as rich markup), and UIDs and destinations are shown whole when stdout is not a terminal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update
from sqlmodel import col

from screener.db.models import (
    AuditLog,
    Delivery,
    DeliveryState,
    JobState,
    ScreeningJob,
    Study,
)
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import add_sr_output, make_job

SCREENER = str(Path(sys.executable).parent / "screener")
# 60 characters (the study's series and instance UIDs add ".1.1" to reach the 64 DICOM
# allows): an 80-column table cannot show it on one line
LONG_UID = "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234"
PEER_AE = "[/x]"  # a valid calling AE title, and a closing rich markup tag
DESTINATION = "[/b]PACS@127.0.0.1:11112"
REASON = "decoder said [/red] and [bold]"


def run(settings: Settings, *args: str, broker_url: str = "") -> subprocess.CompletedProcess[str]:
    """The installed CLI in a subprocess (stdout is a pipe: 80 columns, no terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "SCREENER_BROKER_URL")}
    env["SCREENER_DATABASE_URL"] = settings.database_url
    env["SCREENER_DATA_DIR"] = str(settings.data_dir)
    if broker_url:
        env["SCREENER_BROKER_URL"] = broker_url
    return subprocess.run([SCREENER, *args], env=env, capture_output=True, text=True, timeout=120)


def folded_column(table: str, column: int, anchor: int) -> list[str]:
    """The whole values of one column of a printed rich table whose cells fold: the
    fragments of a row joined (a row starts where the ``anchor`` column has text)."""
    values: list[str] = []
    for line in table.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[anchor]:
            values.append("")
        values[-1] += cells[column]
    return values


def _failed_study_with_peer_text(settings: Settings) -> None:
    """A failed study whose reason, a rejected association whose calling AE title, and a
    dead delivery whose destination and error all look like rich markup."""
    spooled = settings.spool_dir / "x.dcm"
    spooled.write_bytes(b"x")
    job_id = make_job(settings.database_url, LONG_UID, JobState.FAILED, files=[spooled])
    received = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ScreeningJob).where(col(ScreeningJob.id) == job_id).values(reason=REASON)
        )
        session.execute(
            update(Study)
            .where(col(Study.study_instance_uid) == LONG_UID)
            .values(first_received_at=received, last_received_at=received)
        )
        session.add(
            AuditLog(
                actor="listener",
                action="association.rejected",
                detail={"calling_ae_title": PEER_AE, "reason": "called AE title not recognised"},
            )
        )
        output_id = add_sr_output(session, settings, job_id, LONG_UID)
        session.add(
            Delivery(
                output_id=output_id,
                destination=DESTINATION,
                state=DeliveryState.DEAD.value,
                attempts=3,
                last_error=f"association rejected by {PEER_AE}",
            )
        )


def test_status_prints_peer_text_as_text(settings: Settings) -> None:
    _failed_study_with_peer_text(settings)
    done = run(settings, "status")
    assert done.returncode == 0, done.stderr
    assert "MarkupError" not in done.stderr
    assert f"calling_ae_title={PEER_AE}" in done.stderr  # the audit detail, verbatim
    assert f"failed {LONG_UID} (job 1): {REASON}" in done.stderr  # whole UID, verbatim reason
    check = run(settings, "status", "--check")
    assert check.returncode == 1, check.stderr  # the failed study needs attention, no crash
    assert "needs attention" in check.stderr and "1 studies failed" in check.stderr


def test_deliveries_list_shows_whole_uids_and_peer_text(settings: Settings) -> None:
    _failed_study_with_peer_text(settings)
    done = run(settings, "deliveries", "list")
    assert done.returncode == 3, done.stderr  # a dead letter is listed
    assert "…" not in done.stdout
    assert folded_column(done.stdout, 4, anchor=0) == [DESTINATION]
    assert folded_column(done.stdout, 5, anchor=0) == [LONG_UID]
    assert [PEER_AE in error for error in folded_column(done.stdout, 7, anchor=0)] == [True]
    destinations = run(settings, "deliveries", "destinations")
    assert "MarkupError" not in destinations.stderr and "Traceback" not in destinations.stderr


def test_reprocess_table_shows_whole_uids_in_utc(settings: Settings) -> None:
    _failed_study_with_peer_text(settings)
    done = run(settings, "reprocess", "--since", "2026-03-01", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout and "received (UTC)" in done.stdout
    assert "1 x re-screen: last job failed" in done.stdout  # why, counted under the table
    assert folded_column(done.stdout, 0, anchor=3) == [LONG_UID]
    received = [when.replace(" ", "") for when in folded_column(done.stdout, 1, anchor=3)]
    assert received == ["2026-03-0123:30"]  # the stored UTC time, not local time


def test_status_check_flags_a_broker_that_does_not_answer(settings: Settings) -> None:
    """Studies received while the broker is away are never screened, and nothing in the
    database says so: `status` names the broker, `status --check` needs attention. The
    embedded broker (a file) is not a peer to reach."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    try:
        away = run(settings, "status", "--check", broker_url=url)
        listed = run(settings, "status", "--json", broker_url=url)
    finally:
        closed.close()
    assert away.returncode == 1, away.stderr
    assert f"broker does not answer: OperationalError at {url}" in away.stderr
    assert json.loads(listed.stdout)["broker"].startswith("broker does not answer")
    embedded = run(settings, "status", "--check")
    assert embedded.returncode == 0, embedded.stderr
    assert json.loads(run(settings, "status", "--json").stdout)["broker"] == "embedded"
