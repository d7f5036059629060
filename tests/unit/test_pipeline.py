"""The screening pipeline on synthetic DICOM studies built from real corpus images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR, read_manifest_json
from screener.offline_screening import screen_paths
from screener.results import ThresholdInfo
from screener.screening.cam import expand_to_display, heatmap_lung_fraction
from screener.screening.models import ScreeningModels
from screener.screening.prepare import PreparedImage, prepare_instance
from screener.screening.study_result import assemble_study
from screener.screening.view_decision import decide_view
from screener.settings import Settings
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_instance,
    make_study,
    pick_images,
    write_datasets,
)
from screener.thresholds import embedded_info


@pytest.fixture(scope="module")
def models() -> ScreeningModels:
    if not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists():
        pytest.skip("no shipped weights")
    return ScreeningModels.from_settings(Settings())


def _image(cxr_dir: Path, **kw: str) -> np.ndarray:
    return corpus_image(cxr_dir, pick_images(cxr_dir, 1, **kw)[0]["id"])


def test_prepare_round_trips_through_the_spool(cxr_dir: Path, tmp_path: Path) -> None:
    ds = make_instance(
        _image(cxr_dir, label="covid", view="PA"),
        study=StudyIdentity.new(),
        photometric="MONOCHROME1",
        transfer_syntax=RLELossless,
    )
    (path,) = write_datasets([ds], tmp_path)
    prepared = prepare_instance(path, Settings())
    assert prepared.skip_reason is None
    assert prepared.view_tag == "PA"
    assert prepared.network_input is not None and prepared.network_input.shape == (1, 224, 224)
    assert prepared.display_image is not None and prepared.display_image.dtype == np.uint8
    assert prepared.meta["modality"] == "CR" and prepared.meta["photometric"] == "MONOCHROME1"
    assert "PatientName" not in prepared.meta and ds.PatientID not in str(prepared.meta)
    prepared.save(tmp_path / "p.npz")
    loaded = PreparedImage.load(tmp_path / "p.npz")
    assert loaded.source == prepared.source
    assert loaded.meta == prepared.meta and loaded.view_tag == "PA"
    np.testing.assert_array_equal(loaded.network_input, prepared.network_input)  # type: ignore[arg-type]
    np.testing.assert_array_equal(loaded.display_image, prepared.display_image)  # type: ignore[arg-type]


def test_display_image_respects_heatmap_max_size(cxr_dir: Path, tmp_path: Path) -> None:
    ds = make_instance(
        _image(cxr_dir, label="normal"), study=StudyIdentity.new(), target_size=(600, 500)
    )
    (path,) = write_datasets([ds], tmp_path)
    settings = Settings(reports={"heatmap_max_size": 300})
    prepared = prepare_instance(path, settings)
    assert prepared.display_image is not None and max(prepared.display_image.shape) == 300


def test_bad_inputs_never_raise(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    prepared = prepare_instance(junk, Settings())
    assert prepared.skip_reason and prepared.skip_reason.startswith("decode failed")
    missing = prepare_instance(tmp_path / "absent.dcm", Settings())
    assert missing.skip_reason and "decode failed" in missing.skip_reason


def test_non_chest_body_part_is_skipped(cxr_dir: Path, tmp_path: Path) -> None:
    ds = make_instance(
        _image(cxr_dir, label="normal"), study=StudyIdentity.new(), body_part_examined="HAND"
    )
    (path,) = write_datasets([ds], tmp_path)
    assert "HAND" in (prepare_instance(path, Settings()).skip_reason or "")


@pytest.mark.parametrize(
    ("tag", "p_lateral", "view", "source", "frontal"),
    [
        ("PA", 0.1, "PA", "tag", True),
        ("AP", 0.9, "LATERAL", "image", False),  # tag wrong: the image decides
        ("LATERAL", 0.8, "LATERAL", "tag", False),
        ("LATERAL", 0.2, "UNKNOWN", "image", True),
        (None, 0.3, "UNKNOWN", "image", True),
        (None, 0.7, "LATERAL", "image", False),
    ],
)
def test_decide_view(
    tag: str | None, p_lateral: float, view: str, source: str, frontal: bool
) -> None:
    d = decide_view(tag, p_lateral)
    assert (d.view, d.source, d.frontal) == (view, source, frontal)
    assert 0.5 <= d.image_confidence <= 1.0


def test_heatmap_lung_fraction() -> None:
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 0], cam[3, 3] = 3.0, 1.0
    cam[1, 1] = -5.0  # negative evidence does not count
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    assert heatmap_lung_fraction(cam, mask) == pytest.approx(0.75)
    assert heatmap_lung_fraction(np.zeros((4, 4)), mask) is None


def test_infer_batches_across_studies_and_filters_laterals(
    cxr_dir: Path, tmp_path: Path, models: ScreeningModels
) -> None:
    covid = _image(cxr_dir, label="covid", view="AP")
    lateral = _image(cxr_dir, view="LATERAL", split=None)
    normal = _image(cxr_dir, label="normal", view="PA", source_contains="muhammedtalo")
    study_a = make_study(
        [(covid, "AP"), (lateral, "PA")], transfer_syntax=JPEG2000Lossless
    )  # wrong tag
    study_b = make_study([(normal, None)], photometric="MONOCHROME1", modality="DX")
    paths = write_datasets(study_a + study_b, tmp_path)
    prepared = [prepare_instance(p, Settings()) for p in paths]
    before = models.engine_calls
    results = models.infer(prepared, ThresholdInfo(value=0.5))
    assert (
        models.engine_calls - before == 2
    )  # one segmenter + one classifier call for 3 images, 2 studies
    by_uid = {r.source.sop_instance_uid: r for r in results}
    covid_r = by_uid[study_a[0].SOPInstanceUID]
    lateral_r = by_uid[study_a[1].SOPInstanceUID]
    normal_r = by_uid[study_b[0].SOPInstanceUID]
    assert covid_r.screened and covid_r.view == "AP" and covid_r.view_source == "tag"
    assert (
        not lateral_r.screened and lateral_r.view == "LATERAL" and lateral_r.view_source == "image"
    )
    assert lateral_r.view_tag == "PA" and "lateral" in (lateral_r.skip_reason or "")
    assert normal_r.screened and normal_r.view_source == "image"
    for r in (covid_r, normal_r):
        assert r.probabilities is not None and sum(r.probabilities.values()) == pytest.approx(
            1.0, abs=1e-5
        )
        assert r.grid is not None and r.cam is None  # drawn from the grid, as in the service
        expand_to_display(r, r.display_image)
        assert r.cam is not None and r.lung_mask is not None and r.display_image is not None
        assert r.cam.shape == r.lung_mask.shape == r.display_image.shape
        assert r.cam.max() == pytest.approx(1.0) and r.cam.min() >= 0
        assert 0.0 <= (r.heatmap_lung_fraction or 0.0) <= 1.0
        assert 0.1 < r.lung_mask.mean() < 0.7  # lungs found, not everything
    assert covid_r.probabilities["covid"] > normal_r.probabilities["covid"]  # type: ignore[index]

    study = assemble_study(
        study_a[0].StudyInstanceUID,
        [covid_r, lateral_r],
        models.model_info,
        ThresholdInfo(0.5),
        "NOT FOR DIAGNOSTIC USE",
    )
    assert study.status == "screened"
    assert study.study_covid_score == covid_r.covid_score


def test_screen_paths_groups_studies_and_reports_no_frontal(
    cxr_dir: Path, tmp_path: Path, models: ScreeningModels
) -> None:
    lateral = _image(cxr_dir, view="LATERAL", split=None)
    only_lateral = make_study([(lateral, "LATERAL")])
    frontal = make_study([(_image(cxr_dir, label="pneumonia", view="PA"), "PA")])
    write_datasets(only_lateral, tmp_path / "a")
    write_datasets(frontal, tmp_path / "b" / "c")
    (tmp_path / "b" / "notes.txt").write_text("not dicom")
    settings = Settings()
    results = {r.study_instance_uid: r for r in screen_paths([tmp_path], settings, models=models)}
    assert set(results) == {only_lateral[0].StudyInstanceUID, frontal[0].StudyInstanceUID}
    assert results[only_lateral[0].StudyInstanceUID].status == "no_frontal_image"
    screened = results[frontal[0].StudyInstanceUID]
    assert screened.status == "screened"
    assert screened.threshold == embedded_info(settings)
    assert screened.to_json()["model"] == models.model_info.ref


def test_occlusion_heatmap_is_one_batch_per_image(
    cxr_dir: Path, tmp_path: Path, models: ScreeningModels
) -> None:
    ds = make_instance(_image(cxr_dir, label="covid", view="PA"), study=StudyIdentity.new())
    (path,) = write_datasets([ds], tmp_path)
    prepared = [prepare_instance(path, Settings())]
    occl = ScreeningModels(
        models.segmenter,
        models.classifier,
        models.model_info,
        scheme=models.scheme,
        heatmap="occlusion",
    )
    (result,) = occl.infer(prepared, ThresholdInfo(0.5))
    assert occl.engine_calls == 3  # segmenter, classifier, one batch of occluded copies
    expand_to_display(result, result.display_image)
    assert result.cam is not None and result.cam.shape == result.display_image.shape  # type: ignore[union-attr]


def test_dicom_path_reproduces_the_training_preprocessing(
    cxr_dir: Path, tmp_path: Path, models: ScreeningModels
) -> None:
    """The scores of a DICOM-wrapped corpus image equal the scores of the PNG fed through the
    same pre-processing functions the training recipe uses (decode/VOI/display add nothing)."""
    from screener.imaging.preprocess import limit_size, resize, scheme_input, segmenter_input

    rows = pick_images(cxr_dir, 3, label="covid", view="AP") + pick_images(
        cxr_dir, 2, label="normal", view="PA"
    )
    images = [corpus_image(cxr_dir, r["id"]) for r in rows]
    paths = write_datasets(
        [make_instance(im, study=StudyIdentity.new(), bits_stored=12) for im in images],
        tmp_path,
    )
    results = models.infer([prepare_instance(p, Settings()) for p in paths], ThresholdInfo(0.5))
    seg = models.segmenter.infer(np.stack([segmenter_input(im) for im in images]))
    inputs = []
    for im, prob in zip(images, seg["lung_probability"], strict=True):
        work = limit_size(im, 512)
        mask = resize(prob, *work.shape) >= 0.5
        inputs.append(scheme_input(work, mask, models.scheme, equalized=models.equalized)[0])
    raw = models.classifier.infer(np.stack(inputs))["probabilities"][:, 0]
    expected = models.calibration.covid(raw)  # the run-time score is the calibrated one
    got = np.array([r.covid_score for r in results])
    # 12-bit storage adds sub-level detector noise in the factory: scores agree to 1e-3.
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_another_scheme_uses_its_own_validation_threshold(models: ScreeningModels) -> None:
    settings = Settings()
    production = embedded_info(settings, models.scheme).value
    manifest = read_manifest_json(SHIPPED_WEIGHTS_DIR)
    other = next(s for s in manifest["classifiers"] if s != manifest["production_scheme"])
    alt = ScreeningModels.from_settings(settings, scheme=other)  # type: ignore[arg-type]
    info = embedded_info(settings, alt.scheme)
    assert info.value == manifest["thresholds"][other] != production
    assert other in info.operating_point


def test_shipped_weights_reproduce_their_model_card_on_validation(
    cxr_dir: Path, models: ScreeningModels
) -> None:
    """The card's validation numbers (where every choice was made) come out of the shipped ONNX
    files through the run-time functions: weights, threshold and card cannot drift apart."""
    import json

    from engines.training.corpus import FRONTAL_VIEWS, load_image, read_manifest
    from screener.evaluation import roc_auc
    from screener.imaging.preprocess import paste_back, resize, scheme_input, segmenter_input

    card = json.loads((SHIPPED_WEIGHTS_DIR / "metrics.json").read_text())["schemes"][models.scheme]
    rows = [
        r
        for r in read_manifest(cxr_dir)
        if r["split"] == "val" and (r["view"] in FRONTAL_VIEWS or r["view"] == "UNKNOWN")
    ]
    scores, normal, fractions = [], [], []
    for start in range(0, len(rows), 16):
        images = [load_image(cxr_dir, r) for r in rows[start : start + 16]]
        seg = models.segmenter.infer(np.stack([segmenter_input(im) for im in images]))
        masks = [
            resize(p, *im.shape) >= 0.5
            for im, p in zip(images, seg["lung_probability"], strict=True)
        ]
        prepared = [
            scheme_input(im, m, models.scheme, equalized=models.equalized)
            for im, m in zip(images, masks, strict=True)
        ]
        out = models.classifier.infer(np.stack([x for x, _ in prepared]))
        scores += list(out["probabilities"][:, 0])
        normal += list(out["probabilities"][:, 2])
        for im, m, (_, box), cam in zip(images, masks, prepared, out["cam"][:, 0], strict=True):
            fractions.append(heatmap_lung_fraction(paste_back(cam, box, im.shape), m))
    covid = np.array([r["label"] == "covid" for r in rows])
    source = np.array([r["patient_id"].split(":")[0] for r in rows])
    ieee = source == "ieee8023"
    nih = (source == "nih") & np.isin([r["label"] for r in rows], ["pneumonia", "normal"])
    s, n = np.array(scores), np.array(normal)
    assert roc_auc(covid[ieee], s[ieee]) == pytest.approx(
        card["val"]["ieee8023_covid_vs_other_auc"], abs=0.005
    )
    pneumonia = np.array([r["label"] == "pneumonia" for r in rows])
    assert roc_auc(pneumonia[nih], 1 - n[nih]) == pytest.approx(
        card["val"]["nih_pneumonia_vs_normal_auc"], abs=0.005
    )
    covid_fractions = [f for f, c in zip(fractions, covid, strict=True) if c and f is not None]
    assert len(covid_fractions) == card["heatmap_lung_fraction_covid_val"]["n"]
    assert np.mean(covid_fractions) == pytest.approx(
        card["heatmap_lung_fraction_covid_val"]["mean_vs_predicted_mask"], abs=0.01
    )
    # The shipped default threshold keeps the validation sensitivity it was chosen for.
    threshold = embedded_info(Settings(), models.scheme).value  # on the calibrated scale
    assert (models.calibration.covid(s[covid]) >= threshold).mean() >= 0.95
