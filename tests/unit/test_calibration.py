"""Calibration: the fitting maths, the shipped parameters, and their use at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines import calibration as cal
from engines.manifest import load_manifest
from screener import evaluation as ev
from screener.settings import Settings
from screener.thresholds import embedded_info
from tests.conftest import CXR_DIR

MANIFEST = load_manifest()


def _synthetic(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores that are over-confident: the truth is sigmoid(logit(p) / 2 - 0.5)."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.01, 0.99, n)
    truth = 1 / (1 + np.exp(-(np.log(raw / (1 - raw)) / 2 - 0.5)))
    return raw, rng.random(n) < truth


@pytest.mark.parametrize("method", cal.METHODS)
def test_every_method_is_strictly_increasing_so_a_carried_threshold_changes_no_call(
    method: cal.Method,
) -> None:
    raw, y = _synthetic()
    fitted = cal.fit(method, raw, y)
    grid = np.linspace(0.0, 1.0, 2001)
    assert np.all(np.diff(fitted.covid(grid)) > 0)
    t_raw = ev.threshold_for_sensitivity(y, raw, 0.95)
    t_cal = ev.threshold_for_sensitivity(y, fitted.covid(raw), 0.95)
    assert t_cal == pytest.approx(float(fitted.covid(t_raw)))
    assert np.array_equal(raw >= t_raw, fitted.covid(raw) >= t_cal)


def test_platt_recovers_a_known_miscalibration_and_lowers_ece() -> None:
    raw, y = _synthetic(20000)
    platt = cal.fit("platt", raw, y)
    assert platt.params["a"] == pytest.approx(0.5, abs=0.05)
    assert platt.params["b"] == pytest.approx(-0.5, abs=0.08)
    assert cal.ece(y, platt.covid(raw)) < 0.02 < cal.ece(y, raw)


def test_choice_is_made_on_held_out_folds_and_refitted_on_all() -> None:
    raw, y = _synthetic(1500)
    chosen, losses = cal.choose(raw, y, "synthetic")
    assert set(losses) == {*cal.METHODS, "identity"}
    assert chosen.method == min(cal.METHODS, key=lambda m: losses[m])
    assert losses[chosen.method] < losses["identity"]  # the raw scores are miscalibrated
    assert chosen.fitted_on == "synthetic"


def test_class_vectors_stay_distributions_and_keep_the_other_classes_ratio() -> None:
    platt = cal.Calibration("platt", {"a": 0.7, "b": 0.4})
    probs = np.array([[0.2, 0.5, 0.3], [0.9, 0.02, 0.08], [0.001, 0.099, 0.9]])
    out = platt.apply(probs)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out[:, 0], platt.covid(probs[:, 0]))
    np.testing.assert_allclose(out[:, 1] / out[:, 2], probs[:, 1] / probs[:, 2])
    assert cal.Calibration.from_json(platt.to_json()) == platt
    np.testing.assert_array_equal(cal.IDENTITY.apply(probs), probs)


def test_ece_counts_bins_by_their_share_of_images() -> None:
    y = np.array([1, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    p = np.array([0.05, 0.05, 0.05, 0.05, 0.95, 0.95, 0.95, 0.95])
    # bin 0: mean 0.05 vs frequency 0.25; bin 9: mean 0.95 vs 1.0 -> (4*0.2 + 4*0.05) / 8
    assert cal.ece(y, p) == pytest.approx(0.125)
    value, low, high = cal.ece_interval(y, p, resamples=200)
    assert low <= high and value == pytest.approx(0.125)


# ------------------------------------------------------------------------------------------
# The shipped calibration (validation split, run-time path)


@pytest.fixture(scope="module")
def validation() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from engines.training.corpus import load_image
    from engines.training.scoring import frontal_split, score_images

    cxr_dir = CXR_DIR
    if not (cxr_dir / "manifest.csv").exists():
        pytest.skip(f"corpus not found at {cxr_dir}")
    rows = frontal_split(cxr_dir, "val")
    images = [load_image(cxr_dir, r) for r in rows]
    labels = np.array([r["label"] == "covid" for r in rows])
    return {
        scheme: (labels, score_images(images, MANIFEST, scheme)["probabilities"])
        for scheme in MANIFEST.schemes
    }


@pytest.mark.parametrize("scheme", sorted(MANIFEST.schemes))
def test_shipped_calibration_changes_no_validation_call(
    scheme: str, validation: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Before (raw score, raw validation threshold) and after (calibrated score, threshold in
    the manifest; for the production scheme also the configured, rounded-down value) the same
    validation images are called COVID positive."""
    labels, probs = validation[scheme]
    entry = MANIFEST.scheme(scheme)
    assert entry.calibration.method != "identity"
    point = entry.operating_point
    assert point.raw_threshold is not None
    raw = probs[:, 0].astype(np.float64)
    before = raw >= point.raw_threshold
    after = entry.calibration.covid(raw) >= point.threshold
    assert np.array_equal(before, after)
    assert before[labels].mean() >= point.target_sensitivity
    assert point.sensitivity is not None and point.specificity is not None
    assert (point.sensitivity.k, point.specificity.k) == (
        int(after[labels].sum()),
        int((~after[~labels]).sum()),
    )
    if scheme == MANIFEST.production_scheme:
        configured = embedded_info(Settings(), scheme).value
        assert np.array_equal(entry.calibration.covid(raw) >= configured, before)


def test_the_run_time_path_reports_the_calibrated_probability(cxr_dir: Path) -> None:
    """ScreeningModels applies the manifest's calibration: JSONL, SR and SC get g(p)."""
    from engines.training.scoring import frontal_split
    from screener.screening.models import ScreeningModels
    from screener.screening.prepare import prepare_dataset
    from screener.testing.dicom_factory import StudyIdentity, corpus_image, make_instance
    from screener.thresholds import embedded_info

    settings = Settings()
    models = ScreeningModels.from_settings(settings)
    assert models.calibration == MANIFEST.calibration(models.scheme)
    rows = frontal_split(cxr_dir, "test")[:6]
    prepared = [
        prepare_dataset(
            make_instance(corpus_image(cxr_dir, r["id"]), study=StudyIdentity.new()),
            Path(f"{i}.dcm"),
            settings,
        )
        for i, r in enumerate(rows)
    ]
    threshold = embedded_info(settings, models.scheme)
    calibrated = models.infer(prepared, threshold)
    shipped = models.calibration
    models.calibration = cal.IDENTITY
    raw = models.infer(prepared, threshold)
    models.calibration = shipped
    for c, r in zip(calibrated, raw, strict=True):
        assert c.probabilities is not None and r.probabilities is not None
        vector = np.array([r.probabilities[k] for k in ("covid", "pneumonia", "normal")])
        expected = shipped.apply(vector)
        got = np.array([c.probabilities[k] for k in ("covid", "pneumonia", "normal")])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert abs(got[0] - vector[0]) > 1e-4  # the calibration really moved the score
        assert c.covid_positive == (got[0] >= threshold.value)
    assert "calibrated" in shipped.description


def test_isotonic_fit_does_not_depend_on_the_order_of_tied_scores() -> None:
    """Two images at 0.9, one COVID: 0.5 at 0.9 whatever the row order (it was 1.0 or 0.5)."""
    scores = np.array([0.1, 0.9, 0.9])
    fits = [
        cal.fit("isotonic", scores, np.array(labels, dtype=bool))
        for labels in ([0, 0, 1], [0, 1, 0])
    ]
    at = [float(f.covid(np.array([0.9]))[0]) for f in fits]
    assert at[0] == pytest.approx(at[1])
    xs, ys = cal._pav(scores, np.array([0.0, 1.0, 0.0]))
    assert xs.tolist() == [0.1, 0.9] and ys.tolist() == [0.0, 0.5]
