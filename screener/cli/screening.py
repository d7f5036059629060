"""``screener screen``, ``screener evaluate``, ``screener train ...`` and ``screener export``.

``screen --format jsonl`` prints exactly one JSON object per study on stdout (a public
contract); logs go to stderr. Exit codes: 0 all studies screened or legitimately skipped,
1 at least one study failed, 2 usage error (typer), 3 no models / nothing to screen.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from screener.cli.app import app
from screener.results import StudyResult, ThresholdInfo
from screener.settings import Settings

log = logging.getLogger(__name__)
err_console = Console(stderr=True)

EXIT_FAILED_STUDY = 1
EXIT_NO_INPUT = 3

train_app = typer.Typer(help="Train the screener's models on the corpus (needs the 'train' extra).")
app.add_typer(train_app, name="train")


class OutputFormat(StrEnum):
    table = "table"
    jsonl = "jsonl"


class SchemeName(StrEnum):
    raw = "raw"
    crop = "crop"
    segment = "segment"


def _settings(scheme: SchemeName | None, engine: str | None, heatmap: str | None) -> Settings:
    overrides: dict[str, Any] = {}
    if scheme is not None:
        overrides["scheme"] = scheme.value
    if engine is not None:
        overrides["engine"] = engine
    if heatmap is not None:
        overrides["heatmap"] = heatmap
    settings = Settings()
    if overrides:
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update=overrides)}
        )
    return settings


def _threshold(settings: Settings, value: float | None, models: Any) -> ThresholdInfo:
    from screener.pipeline import default_threshold

    base = default_threshold(settings, models)
    if value is None:
        return base
    return ThresholdInfo(value=value, version=0, operating_point="given on the command line")


def _operating_point(info: ThresholdInfo, models: Any, settings: Settings) -> str:
    """The operating point explained once per run (threshold, validation sensitivity and
    specificity, what a POSITIVE call means), as the SR and the heatmaps state it."""
    from screener.reports.operating_point import statement_for

    return statement_for(info, models.model_info, settings).explanation()


def write_heatmap_pngs(result: StudyResult, out_dir: Path) -> list[Path]:
    """Fallback outputs when the reports package is not installed: CAM over the image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    paths = []
    study_dir = out_dir / result.study_instance_uid
    for image in result.screened_images:
        if image.display_image is None or image.cam is None:
            continue
        gray = image.display_image.astype(np.float32) / 255.0
        heat = colormaps["jet"](image.cam)[..., :3]
        alpha = 0.4 * image.cam[..., None]
        blended = (1 - alpha) * gray[..., None] + alpha * heat
        study_dir.mkdir(parents=True, exist_ok=True)
        path = study_dir / f"{image.source.sop_instance_uid}_heatmap.png"
        Image.fromarray((blended * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_outputs(result: StudyResult, out_dir: Path, settings: Settings) -> list[Path]:
    """SR + SC DICOM via the reports package when present, heatmap PNGs otherwise."""
    try:
        from screener.reports.writer import write_study_outputs
    except ImportError:
        return write_heatmap_pngs(result, out_dir)
    written: list[Path] = write_study_outputs(result, out_dir, settings)
    return written


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
    from screener.logging_setup import configure_logging
    from screener.pipeline import ScreeningModels, screen_paths

    settings = _settings(scheme, engine, heatmap)
    configure_logging(settings.log_level)
    try:
        models = ScreeningModels.from_settings(settings)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        err_console.print(f"[red]cannot load models:[/red] {exc}")
        raise typer.Exit(EXIT_NO_INPUT) from exc
    info = _threshold(settings, threshold, models)
    results: list[StudyResult] = []
    any_failed = False
    stream = screen_paths(list(paths), settings, info, models=models)
    if output_format is OutputFormat.table:
        from rich.progress import Progress

        with Progress(console=err_console, transient=True) as progress:
            task = progress.add_task("screening studies", total=None)
            for result in stream:
                if out is not None:
                    result.outputs = [str(p) for p in write_outputs(result, out, settings)]
                results.append(result)
                progress.advance(task)
        Console().print(_table(results))
        Console().print(
            f"model {models.model_info.ref} ({models.model_info.scheme}). "
            f"{_operating_point(info, models, settings)} {settings.disclaimer}",
            markup=False,
        )
    else:
        # stdout stays one JSON object per line: the explanation goes to stderr, once
        err_console.print(_operating_point(info, models, settings), markup=False)
        for result in stream:
            if out is not None:
                result.outputs = [str(p) for p in write_outputs(result, out, settings)]
            sys.stdout.write(json.dumps(result.to_json()) + "\n")
            sys.stdout.flush()
            results.append(result)
    any_failed = any(r.status == "failed" for r in results)
    if not results:
        err_console.print("no DICOM study found in the given paths")
        raise typer.Exit(EXIT_NO_INPUT)
    if any_failed:
        raise typer.Exit(EXIT_FAILED_STUDY)


# --------------------------------------------------------------------------------------
# evaluate


def read_labels(path: Path) -> dict[str, dict[str, str]]:
    """Labels CSV keyed by ``sop_instance_uid`` (column ``label``; optional view, modality,
    sex, source columns for the subgroup tables)."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames:  # column names and label values match case-insensitively
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
        if not reader.fieldnames or not {"sop_instance_uid", "label"} <= set(reader.fieldnames):
            raise typer.BadParameter("labels CSV needs columns sop_instance_uid,label")
        rows = {row["sop_instance_uid"]: row for row in reader}
    for row in rows.values():
        row["label"] = (row["label"] or "").strip().lower()
    return rows


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as null: ``--json`` output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.3f}"
    )


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
    from screener import evaluation as ev
    from screener.logging_setup import configure_logging
    from screener.pipeline import ScreeningModels, screen_paths

    settings = _settings(scheme, None, None)
    configure_logging(settings.log_level)
    truth = read_labels(labels)
    positive = positive.strip().lower()
    try:
        models = ScreeningModels.from_settings(settings)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        err_console.print(f"[red]cannot load models:[/red] {exc}")
        raise typer.Exit(EXIT_NO_INPUT) from exc
    info = _threshold(settings, threshold, models)
    rows: list[dict[str, Any]] = []
    for study in screen_paths(list(paths), settings, info, models=models):
        for image in study.screened_images:
            row = truth.get(image.source.sop_instance_uid)
            if row is None or image.covid_score is None:
                continue
            rows.append(row | {"score": image.covid_score, "view_screened": image.view})
    if not rows:
        err_console.print("no screened image matched the labels CSV")
        raise typer.Exit(EXIT_NO_INPUT)
    report = evaluation_report(rows, info.value, positive)
    report["model"] = models.model_info.ref
    report["scheme"] = models.model_info.scheme
    report["interval"] = "Wilson score 95%"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        y = [r["label"] == positive for r in rows]
        s = [r["score"] for r in rows]
        report["plots"] = [
            str(ev.plot_roc(y, s, out / "roc.png")),
            str(ev.plot_pr(y, s, out / "pr.png")),
            str(
                ev.plot_histogram(
                    {
                        lab: [r["score"] for r in rows if r["label"] == lab]
                        for lab in sorted({r["label"] for r in rows})
                    },
                    out / "histogram.png",
                    threshold=info.value,
                )
            ),
        ]
    if as_json:
        sys.stdout.write(json.dumps(strict_json(report), default=str, allow_nan=False) + "\n")
        return
    _print_report(report)


def evaluation_report(
    rows: list[dict[str, Any]], threshold: float, positive: str
) -> dict[str, Any]:
    """Everything ``evaluate`` prints, as plain data (pure; tested directly)."""
    from screener import evaluation as ev

    y = np.array([r["label"] == positive for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    summary = ev.summarize(y, s, threshold)
    c = summary.confusion
    report: dict[str, Any] = {
        "n": len(rows),
        "n_positive": summary.n_positive,
        "n_negative": summary.n_negative,
        "threshold": threshold,
        "auc": summary.auc,
        "average_precision": summary.average_precision,
        "sensitivity": c.sensitivity.__dict__,
        "specificity": c.specificity.__dict__,
        "confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn},
        "threshold_table": [
            {
                "threshold": t.threshold,
                "sensitivity": t.sensitivity.__dict__,
                "specificity": t.specificity.__dict__,
            }
            for t in ev.threshold_table(y, s)
        ],
        "subgroups": [],
    }
    for key in ("view", "modality", "sex", "source"):
        if not any(r.get(key) for r in rows):
            continue
        for value in sorted({str(r.get(key) or "unknown") for r in rows}):
            idx = [i for i, r in enumerate(rows) if str(r.get(key) or "unknown") == value]
            sub = ev.summarize(y[idx], s[idx], threshold)
            report["subgroups"].append(
                {
                    "group": key,
                    "value": value,
                    "n": len(idx),
                    "n_positive": sub.n_positive,
                    "auc": sub.auc,
                    "sensitivity": sub.confusion.sensitivity.__dict__,
                    "specificity": sub.confusion.specificity.__dict__,
                }
            )
    return report


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


# --------------------------------------------------------------------------------------
# train / export


def _corpus(corpus: Path | None) -> Path:
    from engines.training.corpus import default_corpus_dir

    return corpus or default_corpus_dir()


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@train_app.command("segmenter")
def train_segmenter_cmd(
    work_dir: Annotated[
        Path, typer.Option(help="git-ignored folder for caches and results")
    ] = Path("runs/train"),
    corpus: Annotated[
        Path | None, typer.Option(help="corpus folder (default ../shared/data/cxr)")
    ] = None,
    epochs: Annotated[int, typer.Option()] = 40,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """U-Net lung segmenter (frozen ImageNet Lite0 encoder, decoder on cached features)."""
    from engines.training.segmenter import train_segmenter

    _torch_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    _, report = train_segmenter(_corpus(corpus), work_dir / "segmenter", epochs=epochs, seed=seed)
    metrics = {
        "epochs": report.epochs,
        "dice_val_mean": float(np.mean(report.dice_val)),
        "n_val": len(report.dice_val),
        "dice_test_mean": float(np.mean(report.dice_test)),
        "n_test": len(report.dice_test),
        "dice_test_median": float(np.median(report.dice_test)),
    }
    (work_dir / "segmenter" / "metrics.json").write_text(json.dumps(metrics, indent=1))
    typer.echo(json.dumps(metrics))


@train_app.command("view")
def train_view_cmd(
    work_dir: Annotated[Path, typer.Option()] = Path("runs/train"),
    corpus: Annotated[Path | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """Frontal/lateral head on the segmenter encoder's pooled features (needs the segmenter)."""
    import torch

    from engines.networks import UNetDecoder
    from engines.training.classifier import train_view_head
    from engines.training.corpus import read_manifest
    from engines.training.recipe import _cached_masks

    _torch_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    decoder = UNetDecoder()
    decoder.load_state_dict(torch.load(work_dir / "segmenter" / "decoder.pt", weights_only=True))
    rows = read_manifest(_corpus(corpus))
    masks = _cached_masks(_corpus(corpus), rows, decoder.eval(), work_dir)
    _, metrics = train_view_head(rows, masks.raw_features, seed=seed)
    typer.echo(json.dumps(metrics))


@train_app.command("classifier")
def train_classifier_cmd(
    work_dir: Annotated[Path, typer.Option()] = Path("runs/train"),
    corpus: Annotated[Path | None, typer.Option()] = None,
    production_scheme: Annotated[SchemeName, typer.Option()] = SchemeName.segment,
    target_sensitivity: Annotated[float, typer.Option()] = 0.95,
    version: Annotated[str, typer.Option()] = "1.0.0",
    finetune: Annotated[
        list[SchemeName] | None,
        typer.Option("--finetune", help="also fine-tune the last Lite0 stage for these schemes"),
    ] = None,
    equalize: Annotated[
        bool, typer.Option(help="histogram-equalise classifier inputs (the papers' schemes)")
    ] = True,
    lung_prior: Annotated[
        list[SchemeName] | None,
        typer.Option(
            "--lung-prior",
            help="also try heads penalised for COVID-CAM magnitude outside the lungs (schemes)",
        ),
    ] = None,
    lung_prior_weight: Annotated[
        list[float] | None,
        typer.Option("--lung-prior-weight", help="penalty strengths compared on validation"),
    ] = None,
    augment: Annotated[
        list[SchemeName] | None,
        typer.Option(
            "--augment",
            help="then fine-tune the last Lite0 stages with augmentation for these schemes",
        ),
    ] = None,
    augment_epochs: Annotated[int, typer.Option(help="augmented fine-tuning epochs")] = 8,
    augment_start_block: Annotated[
        int, typer.Option(help="first trained Lite0 block (0-15); earlier blocks stay frozen")
    ] = 8,
    augment_lung_weight: Annotated[
        float, typer.Option(help="price of COVID-CAM magnitude outside the lungs (0 = off)")
    ] = 0.0,
    augment_min_lung_fraction: Annotated[
        float,
        typer.Option(help="epochs whose val COVID heatmaps fall below this are not eligible"),
    ] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """The full recipe: (cached) segmenter and view head, classifiers for all three schemes,
    ONNX export to WORK_DIR/export and WORK_DIR/metrics.json."""
    from engines.training.augmented import AugmentConfig
    from engines.training.recipe import run_recipe

    _torch_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    metrics = run_recipe(
        _corpus(corpus),
        work_dir,
        production_scheme=production_scheme.value,
        target_sensitivity=target_sensitivity,
        version=version,
        finetune=tuple(s.value for s in finetune or []),
        equalized=equalize,
        lung_prior=tuple(s.value for s in lung_prior or []),
        lung_prior_weights=tuple(lung_prior_weight or (0.1, 0.2, 0.3, 0.5, 1.0)),
        augment=tuple(s.value for s in augment or []),
        augment_config=AugmentConfig(
            epochs=augment_epochs,
            start_block=augment_start_block,
            lung_weight=augment_lung_weight,
            min_lung_fraction=augment_min_lung_fraction,
        ),
        seed=seed,
    )
    summary = {
        s: {k: v for k, v in m.items() if k != "subgroups"} for s, m in metrics["schemes"].items()
    }
    typer.echo(json.dumps(summary, indent=1))


@app.command("export")
def export_cmd(
    work_dir: Annotated[Path, typer.Option()] = Path("runs/train"),
    weights_dir: Annotated[Path | None, typer.Option(help="default: engines/weights")] = None,
    schemes: Annotated[
        list[SchemeName] | None, typer.Option("--scheme", help="classifiers to ship")
    ] = None,
) -> None:
    """Install trained ONNX models + model card from WORK_DIR into the shipped weights."""
    from engines.model_card import write_model_card
    from engines.training.recipe import install_weights
    from screener.pipeline import SHIPPED_WEIGHTS_DIR

    metrics = json.loads((work_dir / "metrics.json").read_text())
    target = weights_dir or SHIPPED_WEIGHTS_DIR
    chosen = [s.value for s in schemes] if schemes else [metrics["production_scheme"]]
    install_weights(work_dir, target, metrics, chosen)
    write_model_card(metrics, target / "MODEL_CARD.md", shipped=chosen)
    typer.echo(f"installed {', '.join(chosen)} into {target}")
