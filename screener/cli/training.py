"""``screener train segmenter|view|classifier`` and ``screener export`` (train extra).

The steps are :mod:`screener.training_runs` and :func:`engines.training.recipe.run_recipe`;
each command prints its metrics as JSON on stdout. Without the train extra, torch's
``ModuleNotFoundError`` reaches the CLI boundary (exit 6, "needs the train extra").
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from screener.cli.app import ExitCode, app
from screener.cli.screening import SchemeName

train_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Train the screener's models on the corpus (needs the 'train' extra).",
)
app.add_typer(train_app, name="train")

WorkDir = Annotated[Path, typer.Option(help="git-ignored folder for caches and results")]
Corpus = Annotated[Path | None, typer.Option(help="corpus folder (default ../shared/data/cxr)")]


@contextmanager
def _missing_inputs() -> Iterator[None]:
    """A missing corpus, trained segmenter or metrics file is a usage error (exit 2): one
    ``error:`` line saying what to run first, not "unexpected error" with exit 1."""
    from screener.training_runs import MissingInputError

    try:
        yield
    except MissingInputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(ExitCode.USAGE) from exc


def _start(threads: int) -> None:
    """torch threads and progress logs on stderr (stdout is the metrics JSON)."""
    from screener.training_runs import use_threads

    use_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)


@train_app.command("segmenter")
def train_segmenter_cmd(
    work_dir: WorkDir = Path("runs/train"),
    corpus: Corpus = None,
    epochs: Annotated[int, typer.Option()] = 40,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """U-Net lung segmenter (frozen ImageNet Lite0 encoder, decoder on cached features)."""
    from screener.training_runs import train_segmenter_step

    _start(threads)
    with _missing_inputs():
        metrics = train_segmenter_step(corpus, work_dir, epochs=epochs, seed=seed)
    typer.echo(json.dumps(metrics))


@train_app.command("view")
def train_view_cmd(
    work_dir: Annotated[Path, typer.Option()] = Path("runs/train"),
    corpus: Annotated[Path | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """Frontal/lateral head on the segmenter encoder's pooled features (needs the segmenter)."""
    from screener.training_runs import train_view_step

    _start(threads)
    with _missing_inputs():
        metrics = train_view_step(corpus, work_dir, seed=seed)
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
    from screener.training_runs import corpus_dir

    _start(threads)
    with _missing_inputs():
        corpus = corpus_dir(corpus)
    metrics = run_recipe(
        corpus,
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
        list[SchemeName] | None,
        typer.Option("--scheme", help="classifiers to ship (default: the production scheme)"),
    ] = None,
    production_scheme: Annotated[
        SchemeName | None,
        typer.Option(
            help="the scheme the manifest names for production; one of the shipped schemes "
            "(default: the one WORK_DIR/metrics.json was trained with)"
        ),
    ] = None,
) -> None:
    """Install trained ONNX models + model card from WORK_DIR into the shipped weights.

    The production scheme must be among the shipped ones (exit 2 otherwise): ship it too
    (--scheme), or name a shipped one with --production-scheme."""
    from screener.training_runs import ExportChoiceError, export_models

    chosen_schemes = [s.value for s in schemes] if schemes else None
    production = None if production_scheme is None else production_scheme.value
    with _missing_inputs():
        try:
            chosen, target = export_models(work_dir, weights_dir, chosen_schemes, production)
        except ExportChoiceError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--scheme'") from exc
    typer.echo(f"installed {', '.join(chosen)} into {target}")
