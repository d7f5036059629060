"""``screener deliveries``: what went to which PACS, what is waiting, what is dead."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from screener.cli.app import app
from screener.db.models import DeliveryState
from screener.settings import Settings, get_settings

deliveries_app = typer.Typer(
    help="Deliveries of SRs and heatmaps to the PACS: list, and re-queue dead letters.",
    no_args_is_help=True,
)
app.add_typer(deliveries_app, name="deliveries")

console = Console()
err = Console(stderr=True)
STATES = [s.value for s in DeliveryState]
IDS_HELP = "Delivery ids to re-queue (dead, retrying or pending)."
STATE_HELP = f"Only these states ({', '.join(STATES)}); repeatable."
EXIT_DATABASE_UNAVAILABLE = 4


def _ready_settings() -> Settings:
    """Settings with a migrated database; exit 4 with a clear message when it is unusable."""
    from screener.db.session import DatabaseUnavailableError, ensure_schema

    settings = get_settings()
    try:
        ensure_schema(settings.database_url)
    except DatabaseUnavailableError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_DATABASE_UNAVAILABLE) from None
    return settings


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
        err.print(f"unknown state(s): {', '.join(unknown)}; known: {', '.join(STATES)}")
        raise typer.Exit(2)
    settings = _ready_settings()
    rows = list_deliveries(settings, states=state or None, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        table = Table(title=f"{len(rows)} deliveries")
        for column in (
            "id",
            "state",
            "attempts",
            "kind",
            "destination",
            "study",
            "next / done",
            "last error",
        ):
            table.add_column(column)
        for r in rows:
            when = r.delivered_at or r.next_attempt_at
            table.add_row(
                str(r.id),
                r.state,
                str(r.attempts),
                r.kind,
                r.destination,
                r.study_instance_uid,
                "" if when is None else when.isoformat(timespec="seconds"),
                (r.last_error or "")[:80],
            )
        console.print(table)
    if any(r.state == DeliveryState.DEAD.value for r in rows):
        raise typer.Exit(3)


@deliveries_app.command("retry")
def deliveries_retry(
    ids: list[int] = typer.Argument(None, help=IDS_HELP),  # noqa: B008
    all_dead: bool = typer.Option(False, "--all-dead", help="Re-queue every dead letter."),
    send_now: bool = typer.Option(False, "--send-now", help="Also run one delivery pass here."),
) -> None:
    """Put deliveries back to pending with a fresh attempt budget.

    Exit code 0 when something was re-queued, 1 when nothing matched, 2 on bad usage.
    """
    from screener.delivery import deliver_pending, retry_dead

    if bool(ids) == all_dead:
        err.print("give delivery ids or --all-dead (not both)")
        raise typer.Exit(2)
    settings = _ready_settings()
    count = retry_dead(settings, ids or None)
    err.print(f"re-queued {count} deliveries")
    if send_now and count:
        summary = deliver_pending(settings)
        typer.echo(json.dumps(summary.to_json()))
    if count == 0:
        raise typer.Exit(1)
