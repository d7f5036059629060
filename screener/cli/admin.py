"""Administration commands: configuration, database, listener, echo and status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from screener.cli.app import (
    ExitCode,
    app,
    ready_database,
    stop_if_port_unavailable,
    usage_error,
)
from screener.settings import Settings

if TYPE_CHECKING:
    import ssl

    from alembic.script import ScriptDirectory

    from screener.settings import TlsSettings
    from screener.status import Status

config_app = typer.Typer(
    rich_markup_mode="markdown", help="Show the effective configuration.", no_args_is_help=True
)
db_app = typer.Typer(
    rich_markup_mode="markdown", help="Database schema management.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")

console = Console(stderr=True)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (defaults < SCREENER_CONFIG < SCREENER_* env), masked."""
    settings = Settings()
    typer.echo(json.dumps(settings.masked(), indent=2, default=str))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("heads", help="Alembic revision")) -> None:
    """Create or migrate the database schema to the latest revision."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from screener.db.session import MIGRATIONS_DIR, upgrade
    from screener.settings import mask_url

    settings = Settings()
    settings.ensure_dirs()
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    before = _database_revision(settings.database_url)
    try:
        if before is not None and revision not in ("head", "heads"):
            _refuse_downgrade(script, before, revision)
        upgrade(settings.database_url, revision)
    except CommandError as exc:  # an unknown or ambiguous revision: the operator's argument
        detail = (str(exc).splitlines() or ["unknown revision"])[0]
        usage_error(
            f"cannot upgrade the database to revision {revision!r}: {detail}; "
            "omit REVISION to upgrade to the latest schema"
        )
    after = _database_revision(settings.database_url)
    latest = " (latest)" if after == head else ""
    done = (
        f"already at {after}{latest}"
        if after == before
        else f"migrated {before or 'base'} -> {after}{latest}"
    )
    console.print(
        f"database {escape(mask_url(settings.database_url))}: {escape(done)}", soft_wrap=True
    )


def _database_revision(url: str) -> str | None:
    """The Alembic revision the database is at (None: no schema yet)."""
    from alembic.runtime.migration import MigrationContext

    from screener.db.session import get_engine

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _refuse_downgrade(script: ScriptDirectory, current: str, revision: str) -> None:
    """Exit 2 when ``revision`` is older than ``current`` (Alembic's upgrade would silently
    do nothing; this command only migrates forward)."""
    from alembic.util import CommandError

    try:
        target = script.get_revision(revision)
    except CommandError:  # unknown, ambiguous or relative (+1): the upgrade itself decides
        return
    if target is None or target.revision == current:
        return
    older = {r.revision for r in script.iterate_revisions(current, "base")}
    if target.revision in older:
        usage_error(
            f"the database is at {current}, newer than {target.revision}; "
            "downgrades are not supported"
        )


@app.command("listen")
def listen(
    port: int | None = typer.Option(
        None, min=0, max=65535, help="override listener.port (0: any free port)"
    ),
    processes: int | None = typer.Option(
        None, min=1, max=64, help="override listener.processes (1-64)"
    ),
) -> None:
    """Run the DICOM listener (C-ECHO, C-STORE) until SIGTERM; studies become screening jobs."""
    from screener.dicom.listener import start_listener
    from screener.logging_setup import configure_logging

    settings = Settings()
    if port is not None:
        settings.listener.port = port
    if processes is not None:
        settings.listener.processes = processes
    configure_logging(settings.log_level, fmt=settings.logging.format)
    settings.ensure_dirs()
    from workers.heartbeat import ProcessBeat

    ready_database(settings)
    beat = ProcessBeat(settings.database_url, "listener").start()
    from screener.startup_heap import freeze_startup_heap

    freeze_startup_heap()
    try:
        start_listener(settings, block=True)
    except OSError as exc:
        stop_if_port_unavailable(
            exc,
            f"{settings.listener.host}:{settings.listener.port}",
            "--port or SCREENER_LISTENER__PORT",
        )
        raise
    finally:
        beat.stop()


@app.command("echo")
def echo_command(
    host: str = typer.Argument(..., help="peer host"),
    port: int = typer.Argument(..., min=1, max=65535, help="peer port (1-65535)"),
    aet: str = typer.Option(..., "--aet", help="the peer's (called) AE title"),
    calling_aet: str = typer.Option("", help="our AE title (default: listener.ae_title)"),
    timeout: float = typer.Option(10.0, help="seconds"),
    tls: bool = typer.Option(False, help="use TLS (listener.tls certificate as client cert)"),
    ca: str = typer.Option("", help="CA file to verify the peer's certificate"),
) -> None:
    """C-ECHO a DICOM peer. Exit 0 on success, 2 no association (or an invalid AE title, a
    missing or unreadable TLS file), 3 failure status."""
    from screener.dicom.echo import echo

    settings = Settings()
    _check_ae_title(aet, "'--aet'")
    if calling_aet:
        _check_ae_title(calling_aet, "'--calling-aet'")
    else:  # the configured title, until the settings check it by the same rule
        _check_ae_title(
            settings.listener.ae_title, "listener.ae_title (SCREENER_LISTENER__AE_TITLE)"
        )
    context = _echo_tls_context(settings.listener.tls, ca) if tls else None
    result = echo(
        host,
        port,
        aet,
        calling_aet=calling_aet or settings.listener.ae_title,
        timeout=timeout,
        ssl_context=context,
        server_hostname=host if context else None,
    )
    typer.echo(result.detail)
    raise typer.Exit(int(result.outcome))


def _check_ae_title(value: str, option: str) -> None:
    """Refuse an AE title DICOM does not allow (:func:`ae_title_problem`, PS3.5 VR AE) as a
    usage error (exit 2), before any association."""
    from screener.dicom.ae_title import ae_title_problem

    problem = ae_title_problem(value)
    if problem:
        raise typer.BadParameter(problem, param_hint=option)


def _echo_tls_context(tls: TlsSettings, ca: str) -> ssl.SSLContext | None:
    """The client TLS context for ``echo --tls``; a missing or unreadable certificate, key or
    CA file is a usage error that names the file (exit 2), not a bare FileNotFoundError."""
    import ssl

    from screener.dicom.tls import client_context

    if ca and not Path(ca).is_file():
        raise typer.BadParameter(f"CA file {ca} does not exist", param_hint="'--ca'")
    named = {
        "listener.tls.certificate": tls.certificate,
        "listener.tls.private_key": tls.private_key,
        "listener.tls.client_ca": "" if ca else tls.client_ca,
    }
    for setting, path in named.items():
        if path and not Path(path).is_file():
            usage_error(f"{setting} file {path} does not exist; fix the setting or the path")
    try:
        return client_context(tls.model_copy(update={"enabled": True}), server_ca=ca)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(p for p in (ca, *named.values()) if p) or "the system CA store"
        usage_error(f"cannot load the TLS files ({files}): {exc}")


@app.command("status")
def status_command(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    check: bool = typer.Option(
        False, "--check", help="exit 1 when something needs attention (cron, Nagios)"
    ),
) -> None:
    """Studies by state (delivered, completed, ignored, failed), jobs, deliveries, spool,
    broker, failures with their reasons. Exit 0; with --check 1 when something needs
    attention."""
    from screener.status import collect

    status = collect(ready_database(Settings(), create=False))
    if as_json:
        typer.echo(json.dumps(status.to_dict(), indent=2, default=str))
    else:
        _print_status(status)
    if check and status.attention:
        raise typer.Exit(ExitCode.FAILED)


def _print_status(status: Status) -> None:
    """The status as a table and lines; every value is escaped, since reasons, audit details
    and AE titles come from the database and from network peers, not from us."""
    from screener.cli.tables import print_table

    table = Table(title="pacs-screener status")
    table.add_column("what", no_wrap=True)  # one line each: `screener status | grep`
    table.add_column("value", justify="right", no_wrap=True)
    rows = _status_rows(status)
    for what, value in rows:
        table.add_row(escape(what), escape(value))
    print_table(Console(), table, [list(row) for row in rows], wrapped=False)
    for f in status.failures:
        console.print(
            f"[red]failed[/red] {escape(str(f['study_instance_uid']))} (job {f['job_id']}): "
            f"{escape(str(f['reason']))}",
            soft_wrap=True,
        )
    for i in status.ignored:
        console.print(
            f"ignored {escape(str(i['study_instance_uid']))} (job {i['job_id']}): "
            f"{escape(str(i['reason']))}",
            soft_wrap=True,
        )
    errors = [e for e in status.last_errors if e["action"] != "job.failed"]
    if errors:
        console.print("recent errors:")
    for error in errors:
        console.print(_error_line(error), soft_wrap=True)
    for line in status.attention:
        console.print(f"[bold red]needs attention:[/bold red] {escape(line)}", soft_wrap=True)


def _status_rows(status: Status) -> list[tuple[str, str]]:
    """(what, value) rows of the status table, unescaped. "assembled" (the listener's
    quiet period passed: a job was made) is not "completed" (a job state: reported, no
    destination to deliver to); "receiving" is shown once."""
    names = {"complete": "assembled"}
    rows = [("database", status.database_url), ("broker", status.broker)]
    rows += [
        (f"studies {names.get(key, key)}", str(value)) for key, value in status.studies.items()
    ]
    rows += [
        (f"studies {s}", str(n))
        for s, n in sorted(status.studies_by_state.items())
        if s not in status.studies  # "receiving": already a row above
    ]
    rows.append(("instances", str(status.instances)))
    rows += [(f"jobs {s}", str(n)) for s, n in sorted(status.jobs_by_state.items())]
    rows += [(f"deliveries {s}", str(n)) for s, n in sorted(status.deliveries_by_state.items())]
    rows += [(f"destination {d.get('name')}", str(d.get("state"))) for d in status.destinations]
    rows.append(
        (
            "spool (recorded instances)",
            f"{status.instances} instance files, {status.spool_bytes / 1e6:.1f} MB",
        )
    )
    rows.append(("spool filesystem", f"{status.spool_filesystem_fill * 100:.1f}% full"))
    return rows


def _error_line(err: dict[str, Any]) -> str:
    """One audit error as rich markup: its time, action, study and detail as key=value
    pairs, the (peer-controlled) text escaped."""
    head = escape(f"{err['at']} {err['action']}")
    detail = err.get("detail")
    pairs = (
        [f"{key}={value}" for key, value in detail.items()]
        if isinstance(detail, dict)
        else ([] if detail is None else [str(detail)])
    )
    if err.get("study_instance_uid"):
        pairs.insert(0, f"study={err['study_instance_uid']}")
    return f"  [red]{head}[/red] {escape(' '.join(pairs))}".rstrip()
