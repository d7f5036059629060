"""``screener deliveries``: what went to which PACS, what is waiting, what is dead."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from screener.cli.app import ExitCode, app, ready_database
from screener.cli.tables import print_table
from screener.db.models import DeliveryState
from screener.settings import Settings, get_settings

if TYPE_CHECKING:
    from screener.delivery import DeliverySummary

deliveries_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Deliveries of SRs and heatmaps to the PACS: list, re-queue dead letters, destinations.",
    no_args_is_help=True,
)
app.add_typer(deliveries_app, name="deliveries")

console = Console()
err = Console(stderr=True)
STATES = [s.value for s in DeliveryState]
IDS_HELP = "Delivery ids to re-queue (dead, retrying or pending)."
STATE_HELP = f"Only these states ({', '.join(STATES)}); repeatable."
DELIVERY_COLUMNS: tuple[str, ...] = (
    "id",
    "state",
    "attempts",
    "kind",
    "destination",
    "study",
    "next / done",
    "last error",
)
DESTINATION_COLUMNS: tuple[str, ...] = (
    "destination",
    "state",
    "failures",
    "down since",
    "pending",
    "dead",
    "last error",
)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """A table whose values stay on one line each: ``deliveries list | grep delivered`` and
    a copied UID or destination need the whole word. Only the free-text last column (the
    last error) wraps."""
    table = Table(title=title)
    for column in columns[:-1]:
        table.add_column(column, no_wrap=True)
    table.add_column(columns[-1], overflow="fold")
    return table


def _cells(*values: str) -> list[str]:
    """Row cells escaped: destinations and errors come from settings and peers, not markup."""
    return [escape(value) for value in values]


@deliveries_app.command("list")
def deliveries_list(
    state: list[str] = typer.Option([], "--state", "-s", help=STATE_HELP),  # noqa: B006, B008
    as_json: bool = typer.Option(False, "--json", help="One JSON array for machines."),
    limit: int = typer.Option(1000, help="At most this many rows."),
) -> None:
    """List deliveries (output x destination) with state, attempts and last error.

    Exit code 0; 2 for an unknown state; 3 when dead letters are listed (for monitoring).
    """
    from screener.delivery import list_deliveries

    unknown = sorted(set(state) - set(STATES))
    if unknown:
        raise typer.BadParameter(
            f"unknown state(s) {', '.join(unknown)}; known: {', '.join(STATES)}",
            param_hint="'--state'",
        )
    settings = ready_database(get_settings(), create=False)
    rows = list_deliveries(settings, states=state or None, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        table = _table(f"{len(rows)} deliveries", DELIVERY_COLUMNS)
        cells = []
        for r in rows:
            when = r.delivered_at or r.next_attempt_at
            cells.append(
                [
                    str(r.id),
                    r.state,
                    str(r.attempts),
                    r.kind,
                    r.destination,
                    r.study_instance_uid,
                    "" if when is None else when.isoformat(timespec="seconds"),
                    (r.last_error or "")[:80],
                ]
            )
            table.add_row(*_cells(*cells[-1]))
        print_table(console, table, cells)
    if any(r.state == DeliveryState.DEAD.value for r in rows):
        raise typer.Exit(ExitCode.PARTIAL)


@deliveries_app.command("retry")
def deliveries_retry(
    ids: list[int] = typer.Argument(None, help=IDS_HELP),  # noqa: B008
    all_dead: bool = typer.Option(False, "--all-dead", help="Re-queue every dead letter."),
    send_now: bool = typer.Option(
        False, "--send-now", help="Also send them here, now (default: the delivery sweep)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object for machines (with --send-now: the send summary)."
    ),
) -> None:
    """Put deliveries back to pending with a fresh give-up horizon; they are sent.

    Without --send-now the delivery sweep of `screener serve` / `screener reconcile` sends
    them within delivery.sweep_interval_seconds; a destination marked down is probed at
    once. Jobs follow: a study whose redelivery succeeded becomes delivered.
    Exit code 0 when something was re-queued (and, with --send-now, every attempt was
    delivered), 1 when nothing was re-queued, 2 on bad usage, 3 when --send-now delivered
    fewer than it attempted.
    """
    from screener.delivery import (
        UNCONFIGURED,
        deliver_pending,
        destination_health,
        retry_dead,
        settle_jobs,
    )

    if bool(ids) == all_dead:
        raise typer.BadParameter("give delivery ids or --all-dead (not both)", param_hint="IDS")
    settings = ready_database(get_settings(), create=False)
    skipped = _not_requeueable(settings, ids) if ids else ""
    count = retry_dead(settings, ids or None)
    if not count:
        if as_json:
            typer.echo(json.dumps({"requeued": 0}))
        err.print(
            f"re-queued 0 deliveries: {skipped or 'there are no dead letters'}", soft_wrap=True
        )
        raise typer.Exit(ExitCode.FAILED)
    if skipped:
        err.print(f"not re-queued: {skipped}", soft_wrap=True)
    code = ExitCode.OK
    if send_now:
        err.print(f"re-queued {count} deliveries; sending now")
        summary = deliver_pending(settings)
        settled = settle_jobs(settings)
        if as_json:
            typer.echo(json.dumps({**summary.to_json(), "jobs_delivered": settled.delivered}))
        else:
            typer.echo(_sent_line(summary, len(settled.delivered)))
        if summary.delivered < summary.attempted:
            code = ExitCode.PARTIAL
    else:
        if as_json:
            typer.echo(json.dumps({"requeued": count}))
        err.print(
            f"re-queued {count} deliveries; the delivery sweep (screener serve or screener "
            f"reconcile) sends them within {settings.delivery.sweep_interval_seconds:g} s",
            soft_wrap=True,
        )
    for health in destination_health(settings):
        if health.state != UNCONFIGURED:
            continue
        err.print(
            f"warning: {health.pending} deliveries wait for {health.name}, which "
            "delivery.destinations does not name here: they are not sent until it is "
            "configured again",
            soft_wrap=True,  # one line, for grep and cron mail
        )
    if code != ExitCode.OK:
        raise typer.Exit(code)


def _not_requeueable(settings: Settings, ids: list[int]) -> str:
    """Why some of the given ids cannot be re-queued (unknown, delivered, being sent), as
    one clause for the operator ("" when every id can be)."""
    from screener.delivery import delivery_states

    states = delivery_states(settings, ids)
    unknown = sorted({i for i in ids if i not in states})
    why = {
        DeliveryState.DELIVERED.value: "already delivered",
        DeliveryState.SENDING.value: "being sent now (try again when it settles)",
    }
    by_state: dict[str, list[int]] = {}
    for delivery_id, state in sorted(states.items()):
        if state in why:
            by_state.setdefault(state, []).append(delivery_id)
    clauses = [
        f"{_ids(found)} {'is' if len(found) == 1 else 'are'} {why[state]}"
        for state, found in sorted(by_state.items())
    ]
    if unknown:
        clauses.append(f"{_ids(unknown)}: no such delivery")
    return "; ".join(clauses)


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _sent_line(summary: DeliverySummary, jobs_delivered: int) -> str:
    """One line for what ``--send-now`` did, each destination's last error with it."""
    parts = [
        f"sent now: {summary.attempted} attempted, {summary.delivered} delivered, "
        f"{summary.retrying} retrying"
    ]
    if summary.dead:
        parts[0] += f", {summary.dead} dead"
    if jobs_delivered:
        parts[0] += f"; {jobs_delivered} jobs delivered"
    if summary.down:
        parts.append(f"down, not sent: {', '.join(summary.down)}")
    parts += [f"{name}: {error}" for name, error in sorted(summary.errors.items())]
    return "; ".join(parts)


@deliveries_app.command("destinations")
def deliveries_destinations(
    as_json: bool = typer.Option(False, "--json", help="One JSON array for machines."),
) -> None:
    """Each destination's circuit breaker (up, down, probing) and its backlog.

    Exit code 0 when every destination is up, 3 when one is down or probing, or when
    deliveries wait for a destination the settings do not name (state unconfigured).
    """
    from screener.delivery import destination_health

    settings = ready_database(get_settings(), create=False)
    rows = destination_health(settings)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        table = _table(f"{len(rows)} destinations", DESTINATION_COLUMNS)
        cells = []
        for r in rows:
            cells.append(
                [
                    r.name,
                    r.state,
                    str(r.consecutive_failures),
                    "" if r.down_since is None else r.down_since.isoformat(timespec="seconds"),
                    str(r.pending),
                    str(r.dead),
                    (r.last_error or "")[:80],
                ]
            )
            table.add_row(*_cells(*cells[-1]))
        print_table(console, table, cells)
    if any(r.state != "up" for r in rows):
        raise typer.Exit(ExitCode.PARTIAL)


retention_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Retention: delivered outputs and (optionally) old spool images.",
    no_args_is_help=True,
)
app.add_typer(retention_app, name="retention")


@retention_app.command("prune")
def retention_prune(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would go."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object for machines."),
) -> None:
    """Delete outputs delivered to every destination more than retention.outputs_days ago,
    and, when retention.spool_days > 0, the images of older finished studies; and outbox
    files no output names (old copies of re-screened outputs, writes of failed jobs).

    The delivery sweep runs this hourly; never an output that is not yet delivered.
    """
    from screener.retention import prune

    settings = ready_database(get_settings(), create=False)
    report = prune(settings, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(report.to_json()))
        return
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {len(report.outputs)} delivered outputs, {len(report.spool)} spool files "
        f"({len(report.studies)} studies) and {len(report.orphaned)} orphaned outbox files, "
        f"{report.bytes_freed / 1e6:.1f} MB"
    )
