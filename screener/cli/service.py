"""``screener serve | worker | reconcile | demo | reprocess``: running the service."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from screener.cli.app import ExitCode, app, ready_database, stop_if_port_unavailable, stop_with
from screener.settings import Settings
from screener.timeutil import aware

if TYPE_CHECKING:
    from screener.reprocess import ReprocessPlan
    from workers.runner import EmbeddedService, SupervisedChild

WORKER_POOLS = ("solo", "prefork", "threads")
HEARTBEAT_NAMES = ("infer", "reconciler", "delivery-sweep")  # the loops that beat a file

out = Console()
err = Console(stderr=True)
log = logging.getLogger("screener.service")


def _settings(process: str | None = None, settings: Settings | None = None) -> Settings:
    """Settings (default: from the environment), logging to the console (and to
    ``<logging.directory>/<process>.log``), and the data directories."""
    from screener.logging_setup import configure_from_settings

    settings = settings or Settings()
    configure_from_settings(settings, process)
    settings.ensure_dirs()
    return settings


def _require_broker(settings: Settings) -> None:
    """Exit 5 at start when the broker cannot be reached. Celery and kombu would retry
    quietly for minutes, behind a listener that accepts studies nobody screens: a typo in
    SCREENER_BROKER_URL must stop the command, as a wrong database does. (An outage later is
    ridden out by the retries; a container restart policy covers a broker still starting.)
    The embedded broker is a file in the data folder: nothing to reach."""
    from screener.settings import mask_url
    from screener.web.health import check_broker, embedded_broker

    url = settings.broker_url
    if embedded_broker(url):
        return

    problem = check_broker(settings)
    if problem is not None:
        stop_with(
            ExitCode.UNAVAILABLE,
            f"error: the broker at {mask_url(url)} cannot be reached ({problem}); "
            "check SCREENER_BROKER_URL and that the broker runs",
        )


def _worker_log_name(queues: list[str]) -> str:
    from workers.runner import worker_name

    return "worker-" + worker_name(queues)


@app.command("worker")
def worker(
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Comma-separated: prepare,infer,report,deliver")
    ] = "prepare,infer,report,deliver",
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Processes for Celery queues.")
    ] = 1,
    pool: Annotated[str, typer.Option("--pool", "-P", help="solo | prefork | threads")] = "solo",
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Celery node name, e.g. cpu@%h.")
    ] = None,
) -> None:
    """Start a worker. ``infer`` runs the cross-study batching consumer (one per engine);
    the other queues run a Celery worker. Both at once: the consumer runs as a child, started
    again when it exits or is stuck (workers.stuck_after_seconds; more than 5 exits in 10
    minutes: the worker stops, exit 1)."""
    from workers.runner import (
        ConsumerStuck,
        parse_queues,
        run_celery_worker,
        run_infer_consumer,
    )

    try:
        chosen = parse_queues(queues)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--queues'") from exc
    if pool not in WORKER_POOLS:
        raise typer.BadParameter(
            f"{pool!r} is not one of {', '.join(WORKER_POOLS)}", param_hint="'--pool'"
        )
    settings = ready_database(_settings(_worker_log_name(chosen)))
    _require_broker(settings)
    from workers.heartbeat import ProcessBeat

    celery_queues = [q for q in chosen if q != "infer"]
    signal.signal(signal.SIGTERM, _exit_cleanly)  # until Celery or the consumer take over
    # for /healthz: the queues this process serves itself (an infer child beats for infer)
    beat = ProcessBeat(settings.database_url, "worker", ",".join(celery_queues or chosen))
    beat.start()
    given_up = False
    try:
        if not celery_queues:
            try:
                run_infer_consumer(settings)
            except ConsumerStuck as exc:  # exit 1: Docker, systemd or serve start it again
                err.print(f"[red]{escape(str(exc))}[/red]")
                raise typer.Exit(ExitCode.FAILED) from None
            return
        child = _infer_child(settings) if "infer" in chosen else None
        try:
            run_celery_worker(
                celery_queues,
                concurrency=concurrency,
                pool=pool,
                loglevel=settings.log_level,
                name=name,
            )
        finally:
            if child is not None:
                child.stop(timeout=30.0)
                given_up = child.given_up
    finally:
        beat.stop()  # a clean stop is not a dead worker: its row goes
        if given_up:  # also when the stop came as SystemExit (before Celery's handlers)
            err.print("[red]the infer consumer keeps exiting; worker stopped[/red]")
            raise typer.Exit(ExitCode.FAILED)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    """SIGTERM while a worker starts (models loading): a clean stop through the ``finally``
    blocks (its heartbeat row goes), not the default's instant death."""
    raise SystemExit(0)


def _infer_child(settings: Settings) -> SupervisedChild:
    """The infer consumer of a combined worker, as a supervised child: restarted when it
    exits or its heartbeat says it is stuck; when it keeps exiting, SIGTERM to this process
    stops Celery (exit 1 follows)."""
    from celery.signals import worker_shutting_down

    from workers.runner import SupervisedChild, child_env, infer_stuck_watch, worker_command

    child = SupervisedChild(
        "infer consumer",
        worker_command(["infer"]),
        child_env(settings),
        on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM),
        stuck=infer_stuck_watch(settings, "infer consumer"),
    )
    # Celery's SIGTERM/SIGINT handler: from then on an exit of the child is the shutdown
    worker_shutting_down.connect(lambda **_: child.shutting_down(), weak=False)
    return child.start()


@app.command("heartbeat")
def heartbeat(
    name: Annotated[str, typer.Argument(help="infer | reconciler | delivery-sweep")],
    max_age: Annotated[float, typer.Option("--max-age", help="Seconds.")] = 60,
) -> None:
    """Health check: exit 0 while the named loop of this install (SCREENER_DATA_DIR: the
    heartbeat files are keyed by it) has beaten within --max-age seconds."""
    from workers.heartbeat import heartbeat_age

    if name not in HEARTBEAT_NAMES:
        raise typer.BadParameter(
            f"{name!r} is not one of {', '.join(HEARTBEAT_NAMES)}", param_hint="'NAME'"
        )
    age = heartbeat_age(name, Settings().data_dir)
    if age is None or age > max_age:
        err.print(f"{name}: {'no heartbeat' if age is None else f'last beat {age:.0f} s ago'}")
        raise typer.Exit(ExitCode.FAILED)
    typer.echo(f"{name}: alive ({age:.0f} s)")


@app.command("reconcile")
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    assemble: Annotated[
        bool, typer.Option("--assemble/--no-assemble", help="Also complete quiet studies.")
    ] = True,
) -> None:
    """Re-send work the broker lost, dispatch queued jobs, fail jobs that never progress."""
    from workers.celery_app import create_app
    from workers.dispatch import dispatch
    from workers.reconciler import reconcile_once, run_reconciler

    settings = _settings()
    _require_broker(settings)
    celery = create_app(settings)

    def send(stage: str, job_id: int) -> None:
        dispatch(celery, settings, stage, job_id)

    if once:
        from workers.reconciler import sweep_once

        report = reconcile_once(settings, send, assemble=assemble)
        swept = sweep_once(settings, prune=True)
        typer.echo(
            json.dumps(
                {
                    "assembled": report.assembled,
                    "dispatched": report.dispatched,
                    "resent": report.resent,
                    "failed": report.failed,
                    "deliveries_attempted": swept.attempted,
                    "deliveries_delivered": swept.delivered,
                    "pruned_outputs": swept.pruned_outputs,
                }
            )
        )
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_reconciler(settings, send, stop, assemble=assemble)


@app.command("serve")
def serve(
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            help="CPU worker processes: 3 = one per stage (prepare, report, deliver); "
            "2 = prepare+deliver and report; 1 = one for all three.",
        ),
    ] = 3,
) -> None:
    """Listener + workers + reconciler in one command, on the embedded defaults
    (SQLite, onnxruntime, a broker in a SQLite file) unless SCREENER_* say otherwise."""
    from screener.settings import mask_url
    from workers.runner import EmbeddedService

    settings = Settings()
    settings.logging.directory = settings.logging.directory or str(settings.data_dir / "logs")
    settings = _settings("serve", settings)
    _require_broker(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = EmbeddedService(
        settings, worker_concurrency=concurrency, log_dir=Path(settings.logging.directory)
    )
    http = None
    if settings.http.enabled:
        from screener.web.server import keep_alive, start_background

        try:  # before the workers start: a busy HTTP port stops serve at once
            http = start_background(settings, listener_alive=lambda: _listener_alive(service))
        except OSError as exc:
            err.print(
                f"error: cannot start the HTTP service on {escape(settings.http.host)}:"
                f"{settings.http.port}: {escape(str(exc.strerror or exc))}; choose another port "
                "(SCREENER_HTTP__PORT) or set SCREENER_HTTP__ENABLED=false",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(ExitCode.UNAVAILABLE) from None
    try:
        service.start()
    except OSError as exc:  # the listener's port: named, as `listen` names it
        with contextlib.suppress(Exception):
            service.stop()
        if http is not None:
            http.stop()
        stop_if_port_unavailable(
            exc, f"{settings.listener.host}:{settings.listener.port}", "SCREENER_LISTENER__PORT"
        )
        raise
    from workers.heartbeat import ProcessBeat

    beat = ProcessBeat(settings.database_url, "listener").start()
    from screener.startup_heap import freeze_startup_heap

    freeze_startup_heap()
    where = (
        f"AE {settings.listener.ae_title} on {settings.listener.host}:{service.port}, database "
        f"{mask_url(settings.database_url)}, broker {mask_url(settings.broker_url)}, data "
        f"{settings.data_dir}, logs {settings.logging.directory}"
        + (f", web http://{settings.http.host}:{http.port}" if http is not None else "")
    )
    err.print(f"[bold]pacs-screener serving[/bold]: {escape(where)}", soft_wrap=True)
    exit_code = ExitCode.OK
    try:
        while not stop.wait(1.0):
            if http is not None:
                try:
                    http = keep_alive(http, settings, lambda: _listener_alive(service))
                except OSError as exc:  # port taken meanwhile: try again in a second
                    err.print(f"[red]cannot restart the HTTP service: {escape(str(exc))}[/red]")
            if not _supervise(service, escape(str(settings.logging.directory))):
                exit_code = ExitCode.FAILED
                break
    finally:
        beat.stop()
        if http is not None:
            http.stop()
        service.stop()
    raise typer.Exit(exit_code)


def _supervise(service: EmbeddedService, logs: str) -> bool:
    """One look at the service's processes and threads: restart what exited; False when
    serve must stop (one keeps exiting, or the reconciler thread is gone)."""
    restarted, given_up = service.revive()
    for name in restarted:
        err.print(
            f"[yellow]{escape(name)} exited; restarted it (its log: {logs})[/yellow]",
            soft_wrap=True,
        )
    if given_up:
        err.print(
            f"[red]keep exiting: {escape(', '.join(given_up))}; stopping; see the logs in "
            f"{logs}[/red]",
            soft_wrap=True,
        )
        return False
    dead = service.dead_threads()
    if dead:  # without the reconciler no received study becomes a job: stop, loudly
        log.error("the %s thread is no longer running; stopping serve", ", ".join(dead))
        err.print(
            f"[red]the {escape(', '.join(dead))} thread stopped; stopping; see serve.log in "
            f"{logs}[/red]",
            soft_wrap=True,
        )
        return False
    return True


def _listener_alive(service: EmbeddedService) -> bool:
    """True while the embedded listener runs: started, not stopped, and (with
    ``listener.processes > 1``) none of its processes exited."""
    listener = service.listener
    return listener is not None and not listener.stopped and not listener.exited()


UTC_HELP = "UTC unless it carries an offset, e.g. 2026-03-01 is 2026-03-01T00:00Z"


def _parse_date(text: str, option: str) -> datetime:
    """An ISO date/time; a naive one is UTC, the time every receipt is stored in."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not an ISO date/time: {text!r}", param_hint=option) from exc
    return aware(value)


def _reprocess_window(since: str, until: str | None) -> tuple[datetime, datetime | None]:
    """[since, until) as aware datetimes; an empty window is a mistake, not "no studies"."""
    start = _parse_date(since, "'--since'")
    end = _parse_date(until, "'--until'") if until else None
    if end is not None and end <= start:
        raise typer.BadParameter(
            f"{end.isoformat()} is not later than --since {start.isoformat()}; the window "
            "[--since, --until) would be empty",
            param_hint="'--until'",
        )
    return start, end


@app.command("reprocess")
def reprocess(
    since: Annotated[
        str, typer.Option("--since", help=f"Received at or after (ISO date/time; {UTC_HELP}).")
    ],
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help=f"Received before, later than --since (ISO date/time; {UTC_HELP})."
        ),
    ] = None,
    study: Annotated[
        list[str] | None, typer.Option("--study", help="Only this Study Instance UID.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, change nothing.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also studies already screened with this model "
            "and threshold (their outputs are identical).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Re-screen stored studies with the current model and threshold, through the queues.

    Times are UTC, as the database stores them: a plain date is midnight UTC."""
    from screener.reprocess import plan_reprocess, queue_reprocess

    start, end = _reprocess_window(since, until)
    settings = ready_database(_settings(), create=False)
    plan = plan_reprocess(settings, start, end, studies=study or None, force=force)
    planned = {item.study_instance_uid for item in plan.items}
    # a mistyped --study looked like "nothing to do": named, and exit 1 after the rest
    not_found = sorted({uid for uid in study or [] if uid not in planned})
    created: dict[str, int] = {}
    if not dry_run:
        created = queue_reprocess(settings, plan)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "model": plan.model_ref,
                    "threshold_version": plan.threshold_version,
                    "studies": [
                        {**item.to_json(), "job_id": created.get(item.study_instance_uid)}
                        for item in plan.items
                    ],
                    "images_pruned": plan.images_pruned,
                    "not_found": not_found,
                }
            )
        )
        if plan.images_pruned:
            raise typer.Exit(ExitCode.PARTIAL)
        if not_found:
            raise typer.Exit(ExitCode.FAILED)
        return
    _print_plan(plan, created, dry_run)
    err.print(
        f"{sum(1 for i in plan.items if i.action == 'rescreen')} to re-screen, "
        f"{sum(1 for i in plan.items if i.action != 'rescreen')} skipped"
        + (" (dry run: nothing queued)" if dry_run else "")
    )
    _exit_if_pruned(plan.images_pruned)
    if not_found:
        stop_with(
            ExitCode.FAILED,
            f"not found: {', '.join(not_found)}: no complete study with that UID "
            "received in the window (check the UID and --since/--until)",
        )


def _print_plan(plan: ReprocessPlan, created: dict[str, int], dry_run: bool) -> None:
    """The plan as a table; UIDs fold (never cut with "…"), times are UTC and say so."""
    from rich.table import Table

    table = Table(
        title=escape(
            ("would re-screen" if dry_run else "re-screening") + f" with {plan.model_ref}, "
            f"threshold version {plan.threshold_version}"
        )
    )
    for column in ("study", "received (UTC)", "last job", "action", "new job"):
        table.add_column(column, overflow="fold")
    for item in plan.items:
        previous = (
            "-"
            if item.previous_job_id is None
            else f"{item.previous_job_id} ({item.previous_state})"
        )
        cells = (
            item.study_instance_uid,
            item.last_received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            previous,
            item.action,
            str(created.get(item.study_instance_uid, "-")),
        )
        table.add_row(*(escape(cell) for cell in cells))
    out.print(table)
    # why, counted (per study: --json); the table stays readable in 80 columns
    reasons = Counter(item.why for item in plan.items if item.action == "rescreen")
    for why, count in reasons.most_common():
        out.print(f"{count} x re-screen: {escape(why)}", soft_wrap=True)


def _exit_if_pruned(pruned: list[str]) -> None:
    """Exit 3 naming the studies whose images retention removed from the spool."""
    if not pruned:
        return
    err.print(
        f"{len(pruned)} studies cannot be re-screened: their images were pruned from the "
        f"spool (retention.spool_days): {escape(', '.join(pruned))}",
        soft_wrap=True,
    )
    raise typer.Exit(ExitCode.PARTIAL)


@app.command("demo")
def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Where the demo keeps its data (default: a new temp dir)."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for results.")] = 240,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Start the embedded service, send the bundled example studies to it by C-STORE as a
    PACS would, wait for the results and show them. Not for diagnostic use.

    The demo never delivers: destinations from SCREENER_DELIVERY__DESTINATIONS or
    SCREENER_CONFIG are ignored, and the SRs and heatmaps stay in DATA_DIR/outbox."""
    from screener.demo import run_demo

    started = time.monotonic()
    result = run_demo(data_dir=data_dir, timeout_s=timeout, console=err)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
    else:
        result.render(out)
        err.print(f"demo finished in {time.monotonic() - started:.0f} s")
    raise typer.Exit(ExitCode.OK if result.ok else ExitCode.FAILED)
