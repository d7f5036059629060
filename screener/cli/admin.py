"""Administration commands: configuration, database, listener, echo and status."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from screener.cli.app import ExitCode, app, ready_database
from screener.settings import Settings

if TYPE_CHECKING:
    from screener.status import Status

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
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
    from screener.db.session import upgrade
    from screener.settings import mask_url

    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.database_url, revision)
    console.print(f"database at {mask_url(settings.database_url)} is at revision {revision}")


@app.command("listen")
def listen(
    port: int | None = typer.Option(None, help="override listener.port"),
    processes: int | None = typer.Option(None, help="override listener.processes"),
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
        _port_error(exc, settings.listener.host, settings.listener.port)
        raise
    finally:
        beat.stop()


def _port_error(exc: OSError, host: str, port: int) -> None:
    """One line for a port that cannot be bound, then exit 5."""
    import errno

    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
        why = "is already in use" if exc.errno == errno.EADDRINUSE else "needs privileges"
        typer.echo(
            f"error: cannot listen on {host}:{port}: the port {why}; stop the other "
            "process or choose another port (--port or SCREENER_LISTENER__PORT)",
            err=True,
        )
        raise typer.Exit(ExitCode.UNAVAILABLE) from None


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
    """C-ECHO a DICOM peer. Exit 0 on success, 2 no association, 3 failure status."""
    from screener.dicom.echo import echo
    from screener.dicom.tls import client_context

    settings = Settings()
    context = None
    if tls:
        tls_settings = settings.listener.tls.model_copy(update={"enabled": True})
        context = client_context(tls_settings, server_ca=ca)
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


@app.command("status")
def status_command(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    check: bool = typer.Option(
        False, "--check", help="exit 1 when something needs attention (cron, Nagios)"
    ),
) -> None:
    """Studies by state (delivered, completed, ignored, failed), jobs, deliveries, spool,
    failures with their reasons. Exit 0; with --check 1 when something needs attention."""
    from screener.status import collect

    status = collect(ready_database(Settings()))
    if as_json:
        typer.echo(json.dumps(status.to_dict(), indent=2, default=str))
    else:
        _print_status(status)
    if check and status.attention:
        raise typer.Exit(ExitCode.FAILED)


def _print_status(status: Status) -> None:
    table = Table(title="pacs-screener status")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("database", status.database_url)
    for key, value in status.studies.items():
        table.add_row(f"studies {key}", str(value))
    for state, count in sorted(status.studies_by_state.items()):
        table.add_row(f"studies {state}", str(count))
    table.add_row("instances", str(status.instances))
    for state, count in sorted(status.jobs_by_state.items()):
        table.add_row(f"jobs {state}", str(count))
    for state, count in sorted(status.deliveries_by_state.items()):
        table.add_row(f"deliveries {state}", str(count))
    for dest in status.destinations:
        table.add_row(f"destination {dest.get('name')}", str(dest.get("state")))
    table.add_row("spool", f"{status.instances} files, {status.spool_bytes / 1e6:.1f} MB")
    table.add_row("spool filesystem", f"{status.spool_filesystem_fill * 100:.1f}% full")
    Console().print(table)
    for f in status.failures:
        console.print(
            f"[red]failed[/red] {f['study_instance_uid']} (job {f['job_id']}): {f['reason']}"
        )
    for i in status.ignored:
        console.print(f"ignored {i['study_instance_uid']} (job {i['job_id']}): {i['reason']}")
    for err in status.last_errors:
        if err["action"] != "job.failed":
            console.print(f"[red]{err['at']} {err['action']}[/red] {err.get('detail')}")
    for line in status.attention:
        console.print(f"[bold red]needs attention:[/bold red] {line}")
