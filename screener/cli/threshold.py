"""``screener threshold show|history|set|tune``: the operating point, versioned and audited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from screener.cli.app import ExitCode, app, ready_database
from screener.settings import Settings
from screener.thresholds import (
    ThresholdRecord,
    active_record,
    history,
    set_threshold,
)

if TYPE_CHECKING:
    from screener.threshold_tuning import TuneProposal

threshold_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Show, change and tune the COVID-19 score threshold (versioned, audited).",
    no_args_is_help=True,
)
app.add_typer(threshold_app, name="threshold")

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    """Settings on the installation's existing database (a mistyped URL is refused before
    anything, folders included, is created)."""
    settings = ready_database(Settings(), create=False)
    settings.ensure_dirs()
    return settings


def _when(record: ThresholdRecord) -> str:
    return "-" if record.created_at is None else record.created_at.strftime("%Y-%m-%d %H:%M:%SZ")


@threshold_app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The active threshold: value, version, operating point, who set it, when and why."""
    record = active_record(_settings())
    if as_json:
        typer.echo(json.dumps(record.to_json()))
        return
    table = Table(title="Active COVID-19 threshold", show_header=False)
    table.add_row("value", f"{record.value:.4f}")
    table.add_row("version", str(record.version))
    table.add_row(
        "target sensitivity",
        "-" if record.target_sensitivity is None else f"{record.target_sensitivity:.3f}",
    )
    table.add_row("operating point", record.operating_point)
    table.add_row("set by", record.set_by)
    table.add_row("when", _when(record))
    table.add_row("why", record.reason)
    out.print(table)


@threshold_app.command("history")
def show_history(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Every threshold version, newest first."""
    records = history(_settings())
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in records]))
        return
    table = Table(title="Threshold history")
    for column in ("version", "value", "active", "target sens.", "set by", "when", "why"):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r.version),
            f"{r.value:.4f}",
            "yes" if r.is_active else "",
            "-" if r.target_sensitivity is None else f"{r.target_sensitivity:.3f}",
            r.set_by,
            _when(r),
            r.reason,
        )
    out.print(table)


@threshold_app.command("set")
def set_value(
    value: float = typer.Argument(..., min=0.0, max=1.0, help="New threshold in [0, 1]."),
    reason: str = typer.Option(..., "--reason", help="Why (kept in the audit log)."),
    target_sensitivity: float | None = typer.Option(
        None,
        "--target-sensitivity",
        min=0.0,
        max=1.0,
        help="The sensitivity this value was chosen for, in (0, 1].",
    ),
    operating_point: str = typer.Option("", "--operating-point", help="How it was measured."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Make VALUE the active threshold (a new version); running workers use it for the next job."""
    try:
        record = set_threshold(
            _settings(),
            value,
            reason=reason,
            target_sensitivity=target_sensitivity,
            operating_point=operating_point,
        )
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc
    if as_json:
        typer.echo(json.dumps(record.to_json()))
    else:
        out.print(f"threshold {record.value:.4f} is active as version {record.version}")


@threshold_app.command("tune")
def tune(
    paths: Annotated[list[Path], typer.Argument(exists=True, help="DICOM files or folders.")],
    labels: Annotated[
        Path,
        typer.Option("--labels", exists=True, dir_okay=False, help="CSV: sop_instance_uid,label"),
    ],
    target_sensitivity: Annotated[
        float, typer.Option("--target-sensitivity", min=0.0, max=1.0, help="Sensitivity to reach.")
    ] = 0.98,
    plots: Annotated[Path, typer.Option("--plots", help="Folder for the PNGs.")] = Path(
        "threshold-tune"
    ),
    apply: Annotated[bool, typer.Option("--apply", help="Set the proposed threshold.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Reason recorded with --apply.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Score labelled images, print the threshold table, propose (and --apply) a threshold."""
    from screener.cli.screening import print_failed_studies
    from screener.threshold_tuning import propose_threshold

    settings = _settings()
    try:
        proposal = propose_threshold(settings, paths, labels, target_sensitivity, plots)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(ExitCode.USAGE) from exc
    if as_json:
        typer.echo(json.dumps(proposal.to_json()))
    else:
        _print_proposal(proposal)
    if proposal.failed_studies:  # tuned without some labelled images: never applied
        print_failed_studies(dict(sorted(proposal.failed_studies.items())), "the proposal")
        left_out = proposal.not_scored.get("study_failed", 0)
        err.print(
            f"error: {len(proposal.failed_studies)} studies failed ({left_out} labelled images "
            "not scored); the proposal leaves them out" + (" and is not applied" if apply else ""),
            markup=False,
        )
        raise typer.Exit(ExitCode.FAILED)
    if proposal.threshold is None:
        err.print("[red]no threshold reaches the target sensitivity on these labels[/red]")
        raise typer.Exit(ExitCode.FAILED)
    if apply:
        record = set_threshold(
            settings,
            proposal.threshold,
            reason=reason or f"tuned for sensitivity >= {target_sensitivity} on {labels.name}",
            target_sensitivity=target_sensitivity,
            operating_point=proposal.operating_point,
            model_name=proposal.model_name,
            model_version=proposal.model_version,
        )
        err.print(f"applied: threshold {record.value:.4f} is active as version {record.version}")


def _print_proposal(proposal: TuneProposal) -> None:
    table = Table(
        title=f"{proposal.model_name}@{proposal.model_version}: {proposal.n_positive} positive, "
        f"{proposal.n_negative} negative; ROC AUC {proposal.auc:.3f}, "
        f"AP {proposal.average_precision:.3f} (Wilson 95% intervals)"
    )
    for column in ("threshold", "sensitivity", "95% CI", "specificity", "95% CI"):
        table.add_column(column, justify="right")
    for row in proposal.table:
        se, sp = row.sensitivity, row.specificity
        mark = (
            " <" if proposal.threshold is not None and row.threshold == proposal.threshold else ""
        )
        table.add_row(
            f"{row.threshold:.4f}{mark}",
            f"{se.value:.3f}",
            f"{se.low:.3f}-{se.high:.3f}",
            f"{sp.value:.3f}",
            f"{sp.low:.3f}-{sp.high:.3f}",
        )
    out.print(table)
    if proposal.threshold is not None:
        out.print(f"proposed threshold {proposal.threshold:.4f}: {proposal.operating_point}")
    for plot in proposal.plots:
        out.print(f"wrote {plot}")
