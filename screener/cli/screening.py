"""``screener screen`` and ``screener evaluate``: offline screening of DICOM files.

``screen --format jsonl`` prints exactly one JSON object per study on stdout (a public
contract); logs go to stderr. Exit codes: 0 all studies screened or legitimately skipped,
1 at least one study failed, 2 usage error (typer), 3 no models / nothing to screen.
The work is :mod:`screener.offline_screening` and :mod:`screener.offline_evaluation`.
"""

from __future__ import annotations

import json
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from screener.cli.app import ExitCode, app

if TYPE_CHECKING:
    from screener.offline_screening import OfflineScreener
    from screener.results import StudyResult
    from screener.settings import Settings

err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    jsonl = "jsonl"


class SchemeName(StrEnum):
    raw = "raw"
    crop = "crop"
    segment = "segment"


def _load(
    scheme: SchemeName | None, engine: str | None, heatmap: str | None, threshold: float | None
) -> OfflineScreener:
    """Settings with the run's overrides, logging, and the loaded models (exit 3 without)."""
    from screener.logging_setup import configure_logging
    from screener.offline_screening import (
        ModelsUnavailableError,
        OfflineScreener,
        screening_settings,
    )

    settings: Settings = screening_settings(
        None if scheme is None else scheme.value, engine, heatmap
    )
    configure_logging(settings.log_level)
    try:
        return OfflineScreener.load(settings, threshold)
    except ModelsUnavailableError as exc:
        err_console.print(f"[red]cannot load models:[/red] {exc}")
        raise typer.Exit(ExitCode.NO_INPUT) from exc


def _table(results: list[StudyResult]) -> Table:
    table = Table(title="Screening results (NOT FOR DIAGNOSTIC USE)")
    for column in ("study", "status", "score", "positive", "images", "heatmap in lungs"):
        table.add_column(column)
    for r in results:
        score = r.study_covid_score
        fractions = [
            im.heatmap_lung_fraction
            for im in r.screened_images
            if im.heatmap_lung_fraction is not None
        ]
        table.add_row(
            r.study_instance_uid[-24:],
            r.status if not r.reason else f"{r.status}: {r.reason}",
            "-" if score is None else f"{score:.3f}",
            "-" if r.study_covid_positive is None else ("YES" if r.study_covid_positive else "no"),
            f"{len(r.screened_images)}/{len(r.images)}",
            "-" if not fractions else f"{min(fractions):.2f}",
        )
    return table


@app.command()
def screen(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files and/or folders")],
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for SR/SC (or heatmap PNG) outputs")
    ] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="table or jsonl")
    ] = OutputFormat.table,
    threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="override the default threshold, in [0, 1]"),
    ] = None,
    scheme: Annotated[SchemeName | None, typer.Option(help="pre-processing scheme")] = None,
    engine: Annotated[str | None, typer.Option(help="onnxruntime | tensorrt | torch")] = None,
    heatmap: Annotated[str | None, typer.Option(help="cam | occlusion")] = None,
) -> None:
    """Screen DICOM files offline, in-process: one result per study. Not for diagnostic use."""
    from screener.allocator import keep_freed_memory
    from screener.blas_threads import single_threaded_blas
    from screener.startup_heap import STAGE_MODULES, frozen_heap

    keep_freed_memory()  # each image's arrays reuse the last one's memory
    single_threaded_blas()  # BLAS threads spin between the glue's small products
    screener = _load(scheme, engine, heatmap, threshold)
    with frozen_heap(STAGE_MODULES):  # the run's collections skip the loaded models (-3%)
        results = _screen(screener, paths, out, output_format)
    if not results:
        err_console.print("no DICOM study found in the given paths")
        raise typer.Exit(ExitCode.NO_INPUT)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(ExitCode.FAILED)


def _screen(
    screener: OfflineScreener, paths: list[Path], out: Path | None, output_format: OutputFormat
) -> list[StudyResult]:
    """Run and print (a table, or JSON lines on stdout); returns the results."""
    results: list[StudyResult] = []
    stream = screener.screen(list(paths), out)
    if output_format is OutputFormat.table:
        from rich.progress import Progress

        with Progress(console=err_console, transient=True) as progress:
            task = progress.add_task("screening studies", total=None)
            for result in stream:
                results.append(result)
                progress.advance(task)
        Console().print(_table(results))
        Console().print(
            f"model {screener.model_ref} ({screener.scheme}). "
            f"{screener.operating_point()} {screener.settings.disclaimer}",
            markup=False,
        )
    else:
        # stdout stays one JSON object per line: the explanation goes to stderr, once
        err_console.print(screener.operating_point(), markup=False)
        for result in stream:
            sys.stdout.write(json.dumps(result.to_json()) + "\n")
            sys.stdout.flush()
            results.append(result)
    return results


@app.command()
def evaluate(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files and/or folders")],
    labels: Annotated[
        Path,
        typer.Option(
            "--labels",
            exists=True,
            dir_okay=False,
            help="CSV: sop_instance_uid,label[,view,modality,sex,source]; labels match "
            "case-insensitively",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for ROC / PR / histogram PNGs")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="override the active threshold, in [0, 1]"),
    ] = None,
    scheme: Annotated[SchemeName | None, typer.Option(help="pre-processing scheme")] = None,
    positive: Annotated[str, typer.Option(help="label value of the positive class")] = "covid",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Sensitivity/specificity (Wilson 95% intervals), ROC AUC, AP, confusion matrix,
    threshold table and subgroup tables on labelled DICOM images."""
    from screener.offline_evaluation import (
        LabelsError,
        NoLabelledImagesError,
        evaluate_labelled,
        read_labels,
        strict_json,
    )

    try:
        truth = read_labels(labels)
    except LabelsError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--labels'") from exc
    screener = _load(scheme, None, None, threshold)
    try:
        report = evaluate_labelled(screener, list(paths), truth, positive, out)
    except NoLabelledImagesError as exc:
        err_console.print(str(exc))
        raise typer.Exit(ExitCode.NO_INPUT) from exc
    if as_json:
        sys.stdout.write(json.dumps(strict_json(report), default=str, allow_nan=False) + "\n")
        return
    _print_report(report)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _prop(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "n/a"
    return f"{p['value']:.3f} [{p['low']:.3f}, {p['high']:.3f}] ({p['k']}/{p['n']})"


def _print_report(report: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"[bold]{report['model']}[/bold] scheme {report['scheme']}; "
        f"threshold {report['threshold']:.4f}; "
        f"{report['n']} images ({report['n_positive']} positive); intervals: {report['interval']}"
    )
    console.print(
        f"sensitivity {_prop(report['sensitivity'])}   specificity {_prop(report['specificity'])}"
    )
    console.print(
        f"ROC AUC {_fmt(report['auc'])}   average precision {_fmt(report['average_precision'])}"
    )
    c = report["confusion"]
    cm = Table(title="confusion matrix")
    cm.add_column("")
    cm.add_column("predicted positive")
    cm.add_column("predicted negative")
    cm.add_row("positive", str(c["tp"]), str(c["fn"]))
    cm.add_row("negative", str(c["fp"]), str(c["tn"]))
    console.print(cm)
    tt = Table(title="threshold table")
    for col in ("threshold", "sensitivity", "specificity"):
        tt.add_column(col)
    for row in report["threshold_table"]:
        tt.add_row(f"{row['threshold']:.2f}", _prop(row["sensitivity"]), _prop(row["specificity"]))
    console.print(tt)
    if report["subgroups"]:
        sg = Table(title="subgroups")
        for col in ("group", "value", "n", "positive", "AUC", "sensitivity", "specificity"):
            sg.add_column(col)
        for row in report["subgroups"]:
            sg.add_row(
                row["group"],
                row["value"],
                str(row["n"]),
                str(row["n_positive"]),
                _fmt(row["auc"]),
                _prop(row["sensitivity"]),
                _prop(row["specificity"]),
            )
        console.print(sg)
    for plot in report.get("plots", []):
        console.print(f"wrote {plot}")
