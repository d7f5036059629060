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
from rich.markup import escape
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


class EngineName(StrEnum):  # = settings.ModelSettings.engine: a typo is a usage error (2)
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"


class HeatmapName(StrEnum):  # = settings.ModelSettings.heatmap: a typo must not mean CAM
    cam = "cam"
    occlusion = "occlusion"


def _value(choice: StrEnum | None) -> str | None:
    return None if choice is None else choice.value


def _error(message: str) -> None:
    """One ``error:`` line on stderr (not wrapped); ``message`` is printed as text, not rich
    markup: an exception's ``[gpu]`` is part of the message, not a style."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def _load(
    scheme: SchemeName | None,
    engine: EngineName | None,
    heatmap: HeatmapName | None,
    threshold: float | None,
) -> OfflineScreener:
    """Settings with the run's overrides, logging, and the loaded models (exit 3 without)."""
    from screener.logging_setup import configure_logging
    from screener.offline_screening import (
        ModelsUnavailableError,
        OfflineScreener,
        screening_settings,
    )

    settings: Settings = screening_settings(_value(scheme), _value(engine), _value(heatmap))
    configure_logging(settings.log_level)
    try:
        return OfflineScreener.load(settings, threshold)
    except ModelsUnavailableError as exc:
        _error(f"cannot load models: {exc}")
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
            escape(r.status if not r.reason else f"{r.status}: {r.reason}"),
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
        typer.Option(
            min=0.0,
            max=1.0,
            help="use this threshold, in [0, 1], instead of the model's embedded (validation) one",
        ),
    ] = None,
    scheme: Annotated[SchemeName | None, typer.Option(help="pre-processing scheme")] = None,
    engine: Annotated[EngineName | None, typer.Option(help="inference engine")] = None,
    heatmap: Annotated[HeatmapName | None, typer.Option(help="heatmap method")] = None,
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
        typer.Option(
            min=0.0,
            max=1.0,
            help="measure at this threshold, in [0, 1], instead of the model's embedded "
            "(validation) threshold; a threshold set with `threshold set` is not used",
        ),
    ] = None,
    scheme: Annotated[SchemeName | None, typer.Option(help="pre-processing scheme")] = None,
    positive: Annotated[str, typer.Option(help="label value of the positive class")] = "covid",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Sensitivity/specificity (Wilson 95% intervals), ROC AUC, AP, confusion matrix,
    threshold table and subgroup tables on labelled DICOM images, at the model's embedded
    (validation) threshold unless --threshold is given. Rows with an empty label are left
    out; labelled images without a score are counted by reason; exit 1 when a study failed."""
    from screener.offline_evaluation import (
        LabelsError,
        NoLabelledImagesError,
        blank_label_warning,
        evaluate_labelled,
        read_label_file,
        strict_json,
    )

    try:
        truth = read_label_file(labels)
    except LabelsError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--labels'") from exc
    if truth.blank:
        message = f"warning: {blank_label_warning(labels, truth.blank)}"
        err_console.print(message, markup=False, soft_wrap=True)
    screener = _load(scheme, None, None, threshold)
    try:
        report = evaluate_labelled(
            screener, list(paths), truth.rows, positive, out, blank_labels=truth.blank
        )
    except NoLabelledImagesError as exc:
        print_failed_studies(exc.failed_studies)
        err_console.print(str(exc), markup=False)
        raise typer.Exit(ExitCode.FAILED if exc.failed_studies else ExitCode.NO_INPUT) from exc
    if as_json:
        sys.stdout.write(json.dumps(strict_json(report), default=str, allow_nan=False) + "\n")
    else:
        _print_report(report)
    failed = {f["study_instance_uid"]: f["reason"] for f in report["failed_studies"]}
    print_failed_studies(failed)
    if failed:
        raise typer.Exit(ExitCode.FAILED)


def print_failed_studies(failed: dict[str, str], left_out_of: str = "the metrics") -> None:
    """One stderr line per failed study: its labelled images are not in ``left_out_of``
    (``evaluate``'s metrics, ``threshold tune``'s proposal)."""
    for uid, reason in failed.items():
        first = (reason.splitlines() or ["failed"])[0]
        err_console.print(
            f"study {uid} failed ({first}); its labelled images are not in {left_out_of}",
            markup=False,
            soft_wrap=True,
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _prop(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "n/a"
    return f"{p['value']:.3f} [{p['low']:.3f}, {p['high']:.3f}] ({p['k']}/{p['n']})"


def _threshold_line(report: dict[str, Any]) -> str:
    """Where the threshold comes from: evaluate reads no database, so never `threshold set`."""
    if report["threshold_source"] == "command_line":
        return "threshold given on the command line (--threshold)"
    return f"threshold: the model's embedded default; {report['operating_point']}"


def _print_left_out(console: Console, report: dict[str, Any]) -> None:
    """The labelled images the metrics leave out, by reason (nothing when none is)."""
    counts = report["not_scored"]
    if report["n_not_scored"]:
        reasons = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in counts.items() if n)
        console.print(
            f"{report['n_not_scored']} of {report['n_labelled']} labelled images not in the "
            f"metrics: {reasons}",
            markup=False,
        )
    if report["n_blank_labels"]:
        console.print(f"{report['n_blank_labels']} rows with an empty label left out")


def _print_report(report: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"[bold]{escape(report['model'])}[/bold] scheme {report['scheme']}; "
        f"threshold {report['threshold']:.4f}; "
        f"{report['n']} images ({report['n_positive']} positive); intervals: {report['interval']}"
    )
    console.print(_threshold_line(report), markup=False)
    _print_left_out(console, report)
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
