"""The model card is generated from metrics.json, and metrics, manifest and config agree."""

from __future__ import annotations

import json
import re

import pytest

from engines.manifest import SHIPPED_WEIGHTS_DIR, load_manifest
from engines.model_card import render_model_card, shipped_threshold
from screener.settings import Settings
from screener.thresholds import embedded_info

METRICS = json.loads((SHIPPED_WEIGHTS_DIR / "metrics.json").read_text())
CARD = (SHIPPED_WEIGHTS_DIR / "MODEL_CARD.md").read_text()
MANIFEST = load_manifest()


def test_the_card_is_exactly_what_metrics_json_renders() -> None:
    """Any hand edit of the card, or a metrics change without re-rendering, fails here."""
    assert CARD == render_model_card(METRICS, shipped=list(MANIFEST.schemes))


def test_a_changed_number_changes_the_card() -> None:
    changed = json.loads(json.dumps(METRICS))
    prod = changed["production_scheme"]
    changed["schemes"][prod]["calibration"]["test"]["ece_calibrated"]["value"] += 0.1
    assert render_model_card(changed, shipped=list(MANIFEST.schemes)) != CARD


def test_card_metrics_manifest_and_config_state_the_same_threshold() -> None:
    prod = MANIFEST.production_scheme
    configured = embedded_info(Settings()).value  # version 0 as the service applies it
    for scheme, entry in MANIFEST.schemes.items():
        block = METRICS["schemes"][scheme]["calibration"]
        point = entry.operating_point
        assert block["threshold"] == point.threshold
        assert block["raw_threshold"] == point.raw_threshold
        assert block["method"] == entry.calibration.method
        assert block["params"] == entry.calibration.params
        assert f"{shipped_threshold(point.threshold):.4f} (raw " in CARD
        assert point.sensitivity is not None
        assert block["val_sensitivity"].endswith(f"({point.sensitivity.k}/{point.sensitivity.n})")
    assert configured == shipped_threshold(MANIFEST.operating_point(prod).threshold)
    assert f"**{configured:.4f}**" in CARD
    assert METRICS["version"] == MANIFEST.version
    assert f"@{MANIFEST.version}" in CARD.splitlines()[0]


def test_no_stale_reasoning_and_no_unlabelled_old_numbers() -> None:
    choice = CARD.split("## Choice of the production scheme", 1)[1].split("### History", 1)[0]
    crop = METRICS["schemes"]["crop"]["val"]
    assert f"{crop['ieee8023_covid_vs_other_auc']:.3f}" in choice
    assert "0.753" not in choice and "1.0.0" not in choice  # v1.0.0 numbers lived here
    assert "Warning" not in choice  # the stated rule picks the scheme that ships
    history = CARD.split("### History", 1)[1]
    for paragraph in history.split("\n\n")[1:]:
        if paragraph.startswith("## "):
            break
        if re.search(r"\d\.\d{3}", paragraph):  # numbers: the version they belong to comes first
            assert re.search(r"v\d+\.\d+\.\d+", paragraph[:120]), paragraph[:80]


@pytest.mark.parametrize("section", ["## Calibration", "## Robustness", "## Leave-one-source-out"])
def test_the_issue_sections_are_present(section: str) -> None:
    assert section in CARD
    for figure in re.findall(r"\]\(([\w.-]+\.png)\)", CARD):
        assert (SHIPPED_WEIGHTS_DIR / figure).exists(), figure


def test_every_robust_fine_tune_that_was_run_is_in_the_card() -> None:
    """What was tried for robustness (issue 14, point 5) is stated, shipped or not, with the
    validation figures it was judged on."""
    runs = METRICS.get("experiments") or []
    assert runs, "no archive-robust fine-tune recorded in metrics.json"
    section = CARD.split("## Archive-robust fine-tuning", 1)[1].split("\n## ", 1)[0]
    shipped = (METRICS["schemes"]["crop"].get("robust_finetune") or {}).get("name")
    for run in runs:
        assert f"Run `{run['name']}`" in section
        chosen = run["history"][int(run["chosen_epoch"])]
        j2k = chosen["copies"]["jpeg2000_10to1"]
        assert f"{j2k['mean_abs_delta']:.4f} ({j2k['flips']})" in section
        assert ("**shipped**" in section) == (shipped is not None)
        assert run["ships"] or run["name"] != shipped  # only a run that met the rule ships


def test_the_crop_square_experiment_is_in_the_card_and_its_verdict_is_what_runs() -> None:
    """Issue 14, point 5: every box rule tried is stated with the validation figures it was
    judged on, and the rule the run time applies is the one the verdict names."""
    from screener.imaging.lung_box import BoxRule
    from screener.imaging.preprocess import BOX_RULE

    block = METRICS.get("crop_box")
    assert block, "no crop-square experiment recorded in metrics.json"
    section = CARD.split("## Crop square placement", 1)[1].split("\n## ", 1)[0]
    for entry in block["val"]:
        j2k = entry["copies"]["jpeg2000_10to1"]
        assert f"| `{entry['rule']}` |" in section
        assert f"{j2k['mean_abs_delta']:.4f} ({j2k['flips']})" in section
    chosen = block["chosen"]
    assert (chosen is None) == ("**No rule met it**" in section)
    assert BOX_RULE.name == (chosen or BoxRule().name)
    if chosen is not None:  # only a rule that met the validation rule may run
        assert next(e for e in block["val"] if e["rule"] == chosen)["passes"]


def test_the_input_variant_experiment_is_in_the_card_with_its_numbers() -> None:
    """Issue 14: every input-building variant measured on validation is stated with its
    figures, and the verdict agrees with them (no variant stated as meeting a target it
    misses)."""
    block = METRICS.get("input_variants")
    assert block, "no input-variant experiment recorded in metrics.json"
    assert block["split"] == "val"
    section = CARD.split("## Where the change under compression comes from", 1)[1].split("\n## ")[0]
    target = block["target_mean_abs_delta"]
    met = []
    for key, v in block["variants"].items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{key}`"))
        for c in v["copies"].values():
            assert f"{c['mean_abs_delta']:.4f} / {c['p95_abs_delta']:.4f}" in row
            assert f"{c['max_abs_delta']:.4f} ({c['flips']})" in row
        if all(c["mean_abs_delta"] <= target and c["flips"] == 0 for c in v["copies"].values()):
            met.append(key)
    assert ("**No variant reaches the target**" in section) == (not met)
    shipped = [k for k, v in block["variants"].items() if v.get("shipped")]
    assert shipped == ["A"]


def test_the_floor_under_the_lossy_target_is_stated_with_its_numbers() -> None:
    """Issue 14, point 5: the copies smaller than any codec, and the scores near the threshold,
    are in the card as metrics.json has them; the verdict follows from them."""
    r = METRICS["robustness"]
    section = CARD.split("## Robustness to how archives store the film", 1)[1].split("\n## ")[0]
    floor = " ".join(section.split("**The floor under the lossy target.**", 1)[1].split())
    for name in ("noise_one_grey_level", "shift_one_pixel"):
        v = r["perturbations"][name]
        assert f"{v['mean_abs_delta']:.4f} ({v['flips']} flips)" in floor
    for distance, count in r["near_threshold"].items():
        assert f"{count} within {distance}" in floor
    assert f"({r['threshold']:.4f})" in floor
    over = any(
        r["perturbations"][n]["mean_abs_delta"] > 0.02 or r["perturbations"][n]["flips"] > 0
        for n in ("noise_one_grey_level", "shift_one_pixel")
    )
    assert ("lies below what this network does" in floor) == over


def test_the_seed_ensemble_experiment_is_in_the_card_and_its_verdict_follows_the_rule() -> None:
    """Issue 14, point 5: the seed ensemble tried is stated with its validation figures,
    and the verdict is the rule applied to them (nothing ships that did not meet it)."""
    pytest.importorskip("torch")  # the rule lives in the training module
    from engines.training.seed_ensemble import verdict

    block = METRICS.get("seed_ensemble")
    assert block, "no seed-ensemble experiment recorded in metrics.json"
    assert block["split"] == "val"
    section = CARD.split("## Seed ensemble (validation split)", 1)[1].split("\n## ")[0]
    single = block["ensembles"][0]
    for e in block["ensembles"][1:]:
        label = "+".join(str(s) for s in e["seeds"])
        row = next(line for line in section.splitlines() if f"ensemble of seeds {label} |" in line)
        for c in e["copies"].values():
            assert f"{c['mean_abs_delta']:.4f} ({c['flips']})" in row
        assert e["ships"] == verdict(e, single)
        assert row.endswith("| met |" if e["ships"] else "| not met |")
    for m in block["members"]:
        assert f"seed {m['seed']} alone (epoch {m['chosen_epoch']})" in section
    chosen = block["chosen"]
    assert ("**No ensemble met the rule**" in section) == (chosen is None)
