"""What administrators read and grep: table values on one line each in 80 columns, status
words that say what they count, and `deliveries retry` that says what it did and why not."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from screener.db.models import AuditLog, Delivery, DeliveryState, JobState
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import add_sr_output, make_job

# 60 characters: with the destination, an 80-column table cannot fold nothing
LONG_UID = "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234"
LONG_DESTINATION = "RADIOLOGY_PACS@pacs-archive-primary.hospital.example.org:11112"
OTHER_DESTINATION = "VNA@vna-secondary.hospital.example.org:104"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, **env: str) -> CliRunner:
    from screener.settings import get_settings

    monkeypatch.setenv("SCREENER_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SCREENER_DATA_DIR", str(settings.data_dir))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> Result:
    from screener.cli import app

    return runner.invoke(app, list(args), env={"COLUMNS": "80"})


def _deliveries(settings: Settings, *rows: tuple[str, str]) -> list[int]:
    """One output of a reported study, one delivery per (destination, state); their ids."""
    job_id = make_job(settings.database_url, LONG_UID, JobState.REPORTED)
    ids = []
    with session_scope(settings.database_url) as session:
        output_id = add_sr_output(session, settings, job_id, LONG_UID)
        for destination, state in rows:
            delivery = Delivery(
                output_id=output_id,
                destination=destination,
                state=state,
                attempts=1,
                last_error="association rejected: called AE title not recognised" * 2
                if state == DeliveryState.DEAD.value
                else None,
            )
            session.add(delivery)
            session.flush()
            assert delivery.id is not None
            ids.append(delivery.id)
    return ids


def test_deliveries_list_keeps_each_value_on_one_line(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _deliveries(
        sqlite_settings,
        (LONG_DESTINATION, DeliveryState.DELIVERED.value),
        (OTHER_DESTINATION, DeliveryState.DEAD.value),
    )
    configured = [
        {"ae_title": "RADIOLOGY_PACS", "host": "pacs-archive-primary.hospital.example.org"}
    ]
    runner = _cli(
        sqlite_settings,
        monkeypatch,
        SCREENER_DELIVERY__DESTINATIONS=json.dumps([{**configured[0], "port": 11112}]),
    )
    listed = invoke(runner, "deliveries", "list")
    assert listed.exit_code == 3, listed.output  # a dead letter is listed
    assert "…" not in listed.stdout
    lines = listed.stdout.splitlines()
    delivered = [line for line in lines if " delivered " in line]  # `| grep delivered`
    assert len(delivered) == 1 and LONG_DESTINATION in delivered[0] and LONG_UID in delivered[0]
    dead = [line for line in lines if " dead " in line]
    assert len(dead) == 1 and OTHER_DESTINATION in dead[0] and LONG_UID in dead[0]
    # the last error (free text) is the one column that may wrap, never cut with "…"
    assert "association rejected" in dead[0]

    health = invoke(runner, "deliveries", "destinations")
    assert "…" not in health.stdout
    up = [line for line in health.stdout.splitlines() if " up " in line]
    assert len(up) == 1 and LONG_DESTINATION in up[0], health.stdout


def test_status_words(sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from screener.db.models import Study, utcnow

    make_job(sqlite_settings.database_url, LONG_UID, JobState.COMPLETED)
    with session_scope(sqlite_settings.database_url) as session:
        now = utcnow()
        session.add(  # a second study, still receiving (no job)
            Study(study_instance_uid=LONG_UID + ".2", first_received_at=now, last_received_at=now)
        )
        session.add(
            AuditLog(
                actor="listener",
                action="association.rejected",
                detail={"calling_ae_title": "EVIL", "reason": "called AE title not recognised"},
            )
        )
    runner = _cli(sqlite_settings, monkeypatch)
    done = invoke(runner, "status")
    assert done.exit_code == 0, done.output
    text = done.stdout
    assert "studies assembled" in text and "studies complete " not in text
    assert "studies completed" in text  # a job state: reported, no destination
    assert sum("studies receiving" in line for line in text.splitlines()) == 1
    assert "spool (recorded instances)" in text and "instance files" in text
    errors = done.stderr.splitlines()
    assert "recent errors:" in errors
    rejected = errors[errors.index("recent errors:") + 1]
    assert "association.rejected" in rejected
    assert "calling_ae_title=EVIL reason=called AE title not recognised" in rejected
    assert "{" not in rejected and "'" not in rejected  # no Python dict repr
    as_json = json.loads(invoke(runner, "status", "--json").stdout)
    assert set(as_json["studies"]) == {"total", "complete", "receiving"}  # keys unchanged


def test_retry_says_why_nothing_was_requeued(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered, sending = _deliveries(
        sqlite_settings,
        (LONG_DESTINATION, DeliveryState.DELIVERED.value),
        (OTHER_DESTINATION, DeliveryState.SENDING.value),
    )
    runner = _cli(sqlite_settings, monkeypatch)
    one = invoke(runner, "deliveries", "retry", str(delivered))
    assert one.exit_code == 1, one.output
    assert f"re-queued 0 deliveries: {delivered} is already delivered" in one.stderr
    several = invoke(runner, "deliveries", "retry", str(delivered), str(sending), "999")
    assert several.exit_code == 1
    line = [x for x in several.stderr.splitlines() if x.startswith("re-queued 0")]
    assert len(line) == 1, several.stderr
    assert f"{delivered} is already delivered" in line[0]
    assert f"{sending} is being sent now" in line[0] and "999: no such delivery" in line[0]
    assert invoke(runner, "deliveries", "retry", "--all-dead").exit_code == 1


def test_retry_send_now_summary_and_exit_code(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = f"DOWN@127.0.0.1:{free_port()}"  # nothing listens there
    host, port = down.split("@")[1].split(":")
    destinations = json.dumps([{"ae_title": "DOWN", "host": host, "port": int(port)}])
    (dead,) = _deliveries(sqlite_settings, (down, DeliveryState.DEAD.value))
    runner = _cli(sqlite_settings, monkeypatch, SCREENER_DELIVERY__DESTINATIONS=destinations)
    sent = invoke(runner, "deliveries", "retry", str(dead), "--send-now")
    assert sent.exit_code == 3, sent.output  # nothing delivered: partial, not success
    summary = [line for line in sent.stdout.splitlines() if line.strip()]
    assert len(summary) == 1, sent.stdout
    assert summary[0].startswith("sent now: 1 attempted, 0 delivered, 1 retrying; ")
    assert f"{down}: " in summary[0] and "{" not in summary[0]

    as_json = invoke(runner, "deliveries", "retry", str(dead), "--send-now", "--json")
    assert as_json.exit_code == 3, as_json.output
    body = json.loads(as_json.stdout)
    assert set(body) == {
        "attempted",
        "delivered",
        "retrying",
        "dead",
        "probes",
        "down",
        "errors",
        "jobs_delivered",
    }
    assert body["attempted"] == 1 and body["delivered"] == 0


def test_readme_names_every_command_and_clean_stops() -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    commands = readme.split("## Commands", 1)[1].split("### Exit codes", 1)[0]
    for command in ("screener retention prune", "screener heartbeat", "deliveries destinations"):
        assert command in commands, command
    codes = readme.split("### Exit codes", 1)[1]
    row = next(line for line in codes.splitlines() if line.startswith("| 130 |"))
    assert "SIGTERM" in row and "`demo`" in row
    operations = " ".join((root / "docs" / "operations.md").read_text().split())
    assert "stop cleanly on SIGTERM or SIGINT (Ctrl-C) and then exit 0" in operations


def test_help_text_flows_as_sentences_not_docstring_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """A docstring's line breaks were kept in the command list, which broke sentences
    mid-way ("at the model's embedded" / "(validation) threshold") and left short lines;
    help flows to the terminal's width."""
    from screener.cli import app as cli

    monkeypatch.setenv("COLUMNS", "200")
    listing = CliRunner().invoke(cli, ["--help"], terminal_width=200)
    assert listing.exit_code == 0, listing.output
    assert "at the model's embedded (validation)" in listing.output
    worker = CliRunner().invoke(cli, ["worker", "--help"], terminal_width=200)
    assert "the consumer runs as a child, started again when" in worker.output
