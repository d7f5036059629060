"""Threshold store and `screener threshold` CLI on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from engines.manifest import load_manifest
from engines.model_card import shipped_threshold
from screener.cli import app
from screener.db.models import AuditLog
from screener.db.session import session_scope
from screener.settings import Settings
from screener.thresholds import (
    active_record,
    active_threshold,
    embedded_info,
    history,
    set_threshold,
    threshold_by_version,
)


def test_embedded_default_until_set(settings: Settings) -> None:
    from screener.thresholds import embedded_info

    info = active_threshold(settings)
    assert info.version == 0
    # version 0 is exactly what the offline `screener screen` applies
    assert info == embedded_info(settings)
    assert [r.version for r in history(settings)] == [0]


def test_set_creates_version_and_audit_row(settings: Settings) -> None:
    first = set_threshold(settings, 0.42, reason="validation run 1", set_by="alice")
    second = set_threshold(
        settings,
        0.37,
        reason="target 0.98",
        set_by="bob",
        target_sensitivity=0.98,
        operating_point="sensitivity 0.98 (Wilson 95% CI 0.93-0.99) on val",
    )
    assert second.version is not None and first.version is not None
    assert second.version > first.version
    active = active_record(settings)
    assert (active.version, active.value, active.set_by) == (second.version, 0.37, "bob")
    assert active.target_sensitivity == 0.98
    assert "Wilson" in active.operating_point
    versions = history(settings)
    assert [r.version for r in versions] == [second.version, first.version, 0]
    assert [r.is_active for r in versions] == [True, False, False]
    # An old version stays readable: results that used it can be re-rendered exactly.
    assert threshold_by_version(settings, first.version).value == 0.42
    with session_scope(settings.database_url) as session:
        audits = session.exec(select(AuditLog).where(AuditLog.action == "threshold.set")).all()
    assert [a.detail["value"] for a in audits if a.detail] == [0.42, 0.37]
    assert audits[1].detail is not None and audits[1].detail["previous_value"] == 0.42
    assert audits[0].detail is not None and audits[0].detail["previous_version"] is None
    assert audits[0].detail["previous_value"] == embedded_info(settings).value
    assert [a.actor for a in audits] == ["alice", "bob"]  # as the caller names itself


def test_the_first_change_names_the_configured_schemes_threshold_as_previous(
    sqlite_settings: Settings,
) -> None:
    """Version 0 of the segment scheme is its own manifest value, not a site's
    threshold.default_value (the production scheme's); the CLI's actor is its shell user."""
    sqlite_settings.model.scheme = "segment"
    sqlite_settings.threshold.default_value = 0.1237
    before = embedded_info(sqlite_settings).value
    assert before != sqlite_settings.threshold.default_value
    set_threshold(sqlite_settings, 0.5, reason="site policy")
    with session_scope(sqlite_settings.database_url) as session:
        audit = session.exec(select(AuditLog).where(AuditLog.action == "threshold.set")).one()
    assert audit.detail is not None and audit.detail["previous_value"] == before
    assert audit.actor.startswith("cli:") and not audit.actor.startswith("cli:web:")


@pytest.mark.parametrize("value,reason", [(1.5, "x"), (-0.1, "x"), (0.5, "  ")])
def test_set_rejects_bad_input(sqlite_settings: Settings, value: float, reason: str) -> None:
    with pytest.raises(ValueError):
        set_threshold(sqlite_settings, value, reason=reason)
    assert active_threshold(sqlite_settings).version == 0


def test_cli_set_show_history(sqlite_settings: Settings) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["threshold", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == 0

    result = runner.invoke(app, ["threshold", "set", "0.31", "--reason", "pilot", "--json"])
    assert result.exit_code == 0, result.output
    set_version = json.loads(result.stdout)["version"]

    shown = json.loads(runner.invoke(app, ["threshold", "show", "--json"]).stdout)
    assert shown["version"] == set_version and shown["value"] == 0.31
    assert shown["reason"] == "pilot"

    rows = json.loads(runner.invoke(app, ["threshold", "history", "--json"]).stdout)
    assert [r["version"] for r in rows] == [set_version, 0]

    human = runner.invoke(app, ["threshold", "show"])
    assert human.exit_code == 0 and "0.3100" in human.stdout and "pilot" in human.stdout


def test_cli_set_requires_reason_and_range(sqlite_settings: Settings) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["threshold", "set", "0.3"]).exit_code == 2
    assert runner.invoke(app, ["threshold", "set", "1.3", "--reason", "x"]).exit_code == 2
    assert active_threshold(sqlite_settings).version == 0


def test_tuning_proposes_highest_threshold_meeting_target(tmp_path: Path) -> None:
    from screener.threshold_tuning import proposal_from_scores

    # 10 positives, 10 negatives; positives' scores 0.55..1.00, negatives' 0.05..0.60.
    positives = [0.55 + 0.05 * i for i in range(10)]
    negatives = [0.05 + 0.0633 * i for i in range(10)]  # the top one is 0.62
    labels = [True] * 10 + [False] * 10
    scores = positives + negatives
    proposal = proposal_from_scores(
        labels, scores, 0.9, model=("m", "1"), plots_dir=tmp_path / "plots"
    )
    # 9 of 10 positives must be caught: the 9th highest positive score is 0.60.
    assert proposal.threshold == pytest.approx(0.60)
    assert proposal.sensitivity is not None and proposal.sensitivity.value == pytest.approx(0.9)
    assert proposal.specificity is not None and proposal.specificity.value == pytest.approx(0.9)
    assert proposal.sensitivity.low < 0.9 < proposal.sensitivity.high  # Wilson interval
    assert "Wilson" in proposal.operating_point
    assert any(row.threshold == proposal.threshold for row in proposal.table)
    for plot in proposal.plots:
        assert Path(plot).stat().st_size > 1000
    assert len(proposal.plots) == 2


def test_tuning_needs_both_classes() -> None:
    from screener.threshold_tuning import proposal_from_scores

    with pytest.raises(ValueError):
        proposal_from_scores([True, True], [0.2, 0.9], 0.95, model=("m", "1"))


def test_cli_tune_scores_labelled_images_and_applies(
    sqlite_settings: Settings, cxr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from screener.testing.dicom_factory import corpus_image, make_study, pick_images, write_datasets
    from tests.workers_support import require_models

    model_dir = require_models()
    if model_dir:
        monkeypatch.setenv("SCREENER_MODEL__MODEL_DIR", model_dir)
    rows = pick_images(cxr_dir, 3, label="covid", view="AP", split="val") + pick_images(
        cxr_dir, 3, label="normal", view="PA", split="val"
    )
    lines = ["sop_instance_uid,label"]
    for row in rows:
        (ds,) = make_study([(corpus_image(cxr_dir, row["id"]), row["view"])])
        write_datasets([ds], tmp_path / "images")
        lines.append(f"{ds.SOPInstanceUID},{row['label']}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    args = ["threshold", "tune", str(tmp_path / "images"), "--labels", str(labels)]
    args += ["--target-sensitivity", "0.6", "--plots", str(tmp_path / "plots"), "--json"]
    result = CliRunner().invoke(app, [*args, "--apply", "--reason", "validation subset"])
    assert result.exit_code == 0, result.output
    proposal = json.loads(result.stdout)
    assert proposal["n_positive"] + proposal["n_negative"] >= 4
    assert proposal["sensitivity"]["value"] >= 0.6
    assert {Path(p).name for p in proposal["plots"]} == {"roc.png", "pr.png"}
    active = active_record(sqlite_settings)
    assert active.version == 1 and active.value == pytest.approx(proposal["threshold"])
    assert active.reason == "validation subset" and "Wilson" in active.operating_point
    # the operating point measured by `tune` is recorded with the threshold it sets
    assert f"sensitivity {proposal['sensitivity']['value']:.3f}" in active.operating_point
    assert f"specificity {proposal['specificity']['value']:.3f}" in active.operating_point
    assert proposal["scheme"] == "crop" and "crop scheme" in active.operating_point


@pytest.mark.parametrize("scheme", ["crop", "segment"])
def test_one_threshold_per_shipped_scheme_everywhere(
    sqlite_settings: Settings, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Service (workers, reprocess: active_threshold), offline screening (embedded_info, and
    what OfflineScreener.load applies with its loaded models) and the console (`threshold
    show`) apply the scheme's own validation threshold from the model manifest (issue 14:
    segment was judged by crop's)."""
    from engines.manifest import load_manifest
    from screener.offline_screening import OfflineScreener
    from screener.thresholds import embedded_info

    manifest = load_manifest()
    if scheme not in manifest.schemes:
        pytest.skip(f"{scheme} is not shipped")
    monkeypatch.setenv("SCREENER_MODEL__SCHEME", scheme)
    settings = Settings()
    assert settings.model.scheme == scheme
    point = manifest.operating_point(scheme)
    service = active_threshold(settings)
    assert settings.threshold.default_value is None  # nothing pinned: the manifest's own
    if scheme == manifest.production_scheme:  # as the model card states it: rounded down
        assert service.value == shipped_threshold(point.threshold)
        assert point.threshold - 1e-4 < service.value <= point.threshold
    else:
        assert service.value == point.threshold
    assert service == embedded_info(settings)
    offline = OfflineScreener.load(settings)
    assert offline.scheme == scheme and offline.threshold == service
    assert f"{scheme} scheme" in service.operating_point
    assert "specificity" in service.operating_point
    shown = json.loads(CliRunner().invoke(app, ["threshold", "show", "--json"]).stdout)
    assert (shown["version"], shown["value"]) == (0, service.value)


def test_an_admin_threshold_keeps_priority_over_the_manifest(sqlite_settings: Settings) -> None:
    set_threshold(sqlite_settings, 0.5, reason="site policy", set_by="alice")
    assert active_threshold(sqlite_settings).value == 0.5
    manifest_value = load_manifest().operating_point(sqlite_settings.model.scheme).threshold
    assert threshold_by_version(sqlite_settings, 0).value == shipped_threshold(manifest_value)


def test_report_accessors_give_the_operating_point_and_calibration(
    sqlite_settings: Settings,
) -> None:
    from screener.thresholds import probability_calibration, validation_operating_point

    point = validation_operating_point(sqlite_settings, "segment")
    assert point.sensitivity is not None and point.specificity is not None
    assert point.sensitivity.value is not None and point.sensitivity.value >= 0.95
    assert 0.0 < (point.specificity.value or 0.0) < 1.0
    assert "calibrated by" in probability_calibration(sqlite_settings)


def test_a_site_default_is_not_described_by_the_validation_figures() -> None:
    """A configured default_value other than the shipped one is 'not measured'."""
    from screener.settings import Settings
    from screener.thresholds import embedded_info

    shipped = embedded_info(Settings())
    assert "specificity" in shipped.operating_point
    settings = Settings()
    settings.threshold.default_value = 0.5
    own = embedded_info(settings)
    assert own.value == 0.5 and "operating point not measured" in own.operating_point
    assert "specificity" not in own.operating_point


@pytest.mark.parametrize("target", [98.0, -1.0, 0.0, float("nan")])
def test_a_target_sensitivity_outside_zero_one_is_refused(
    sqlite_settings: Settings, target: float
) -> None:
    """98 was stored and printed in the SR's operating point; NaN made `--json` invalid."""
    with pytest.raises(ValueError, match="target sensitivity"):
        set_threshold(sqlite_settings, 0.3, reason="x", target_sensitivity=target)
    assert active_threshold(sqlite_settings).version == 0  # nothing was stored
    done = CliRunner().invoke(
        app, ["threshold", "set", "0.3", "--reason", "x", "--target-sensitivity", str(target)]
    )
    assert done.exit_code == 2, done.output
