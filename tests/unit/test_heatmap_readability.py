"""Issue 14 items 3-4: a heatmap a radiologist can read and an operating point stated.

The SC states both calls with their probabilities, the view, a colour scale, the operating
point, model@version and the disclaimer in margins around a film no text covers; the CAM is
drawn only inside the body and the crop box, fading out towards their edges; the lung
contour has at most two components. The SR summary states the threshold with its
validation sensitivity and specificity, each algorithm parameter once; ``screen`` and
``demo`` explain the operating point once per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rich.console import Console
from typer.testing import CliRunner

from engines.manifest import load_manifest
from screener import evaluation as ev
from screener.imaging.components import component_sizes, fill_holes, largest_components
from screener.imaging.views import view_caption, view_label
from screener.reports.heatmap import (
    CONTOUR_RGB,
    _colormap_lut,
    blend_cam,
    body_mask,
    crop_region,
    heatmap_text,
    render,
    render_film,
)
from screener.reports.operating_point import parse_operating_point, statement_for
from screener.reports.writer import write_study_outputs
from screener.results import ImageResult, ModelInfo, SourceImageRef, ThresholdInfo
from screener.settings import Settings
from screener.threshold_tuning import TuneProposal
from screener.thresholds import embedded_info
from tests.dicom_validation import assert_valid
from tests.report_results import THRESHOLD, concept_meaning, content_items, make_result

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def settings_(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _phantom(shape: tuple[int, int] = (300, 260)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air around a body (an ellipse) holding two darker lungs: image, body, lungs."""
    rows, cols = shape
    body = _ellipse(shape, rows * 0.55, cols * 0.5, rows * 0.42, cols * 0.4)
    lungs = _ellipse(shape, rows * 0.5, cols * 0.32, rows * 0.22, cols * 0.1) | _ellipse(
        shape, rows * 0.5, cols * 0.68, rows * 0.22, cols * 0.1
    )
    rng = np.random.default_rng(1)
    image = np.where(body, 150.0, 8.0)
    image = np.where(lungs, 70.0, image) + rng.normal(0, 4, shape)
    return np.clip(image, 0, 255).astype(np.uint8), body, lungs


def _phantom_result(
    image: np.ndarray, lungs: np.ndarray, box: tuple[int, int, int, int] | None
) -> ImageResult:
    return ImageResult(
        source=SourceImageRef("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2"),
        view="PA",
        screened=True,
        probabilities={"covid": 0.6, "pneumonia": 0.3, "normal": 0.1},
        covid_positive=True,
        display_image=image,
        cam=np.ones(image.shape, dtype=np.float32),  # hot everywhere: only the masks limit it
        lung_mask=lungs,
        cam_box=box,
    )


# ------------------------------------------------------------------------------------------
# SC content


def test_sc_text_states_both_calls_view_operating_point_model_and_disclaimer(
    tmp_path: Path, settings_: Settings
) -> None:
    # COVID below the threshold, pneumonia the most probable class: the case where the SR
    # said Pneumonia Present and the SC used to read only NEGATIVE
    result, _ = make_result(tmp_path, ["PA"], scores=[0.2])
    image = result.images[0]
    assert image.probabilities == pytest.approx({"covid": 0.2, "pneumonia": 0.48, "normal": 0.32})
    statement = statement_for(result.threshold, result.model, settings_)
    text = heatmap_text(image, result, statement, settings_.disclaimer)
    header = [line.text for line in text.header]
    assert header[0] == "COVID-19: NEGATIVE, probability 0.200 (threshold 0.4200)"
    assert header[1].startswith("Pneumonia: PRESENT, probability 0.480")
    assert "Normal: probability 0.320" in header[2] and "View: PA (DICOM tags)" in header[2]
    assert text.header[1].colour != text.header[0].colour  # present and absent look different
    footer = " ".join(line.text for line in text.footer)
    assert (
        "COVID-19 threshold 0.4200 (tuning set: sensitivity 0.95, specificity 0.55) - "
        "sensitivity-first screening operating point" in footer
    )
    assert "threshold version 3, set by an administrator" in footer
    assert "cxr-covid-effnetlite0@1.0.0" in footer and settings_.disclaimer in footer
    assert "low" not in header and "CAM" in text.scale_caption

    # the SC written to DICOM says the same as the SR (the burned-in text is also in
    # ImageComments, where a test and a PACS can read it)
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    sr = pydicom.dcmread(paths[0])
    sc = pydicom.dcmread(paths[1])
    assert "Pneumonia: PRESENT, probability 0.480" in sc.ImageComments
    assert "COVID-19: NEGATIVE, probability 0.200" in sc.ImageComments
    evaluations = {
        concept_meaning(i): i.ConceptCodeSequence[0].CodeMeaning
        for i in content_items(list(sr.ContentSequence))
        if i.ValueType == "CODE" and concept_meaning(i) in ("COVID-19", "Pneumonia")
    }
    assert evaluations == {"COVID-19": "Absent", "Pneumonia": "Present"}
    for path in paths:
        assert_valid(path)


def test_film_is_uncovered_and_margins_hold_text_and_colour_scale(
    tmp_path: Path, settings_: Settings
) -> None:
    result, _ = make_result(tmp_path, ["PA"], scores=[0.81])
    image = result.images[0]
    assert image.display_image is not None
    rendering = render(image, result, settings_.disclaimer)
    film = rendering.film
    rows, cols = film.gray.shape
    assert (rows, cols) == image.display_image.shape
    pixels = rendering.film_pixels
    # the film is the overlay blend and the contour, nothing else: no text on it
    expected = blend_cam(film.gray, film.cam)
    changed = np.any(pixels != expected, axis=2)
    assert changed.any()  # the contour is drawn
    assert np.all(pixels[changed] == CONTOUR_RGB)
    assert film.lungs is not None and not changed[~film.lungs].any()  # on the lung boundary
    # where no CAM is drawn and no contour runs, the film is the grey image, exactly
    plain = (film.cam == 0) & ~changed
    assert plain[: rows // 6].mean() > 0.9  # the apices: formerly under a text band
    assert np.all(pixels[plain] == film.gray[plain][:, None])
    # margins above and below (and beside: the film is narrower than the text minimum)
    bottom = rendering.pixels.shape[0] - rendering.top - rows
    assert rendering.top > 0 and bottom > 0
    header = rendering.pixels[: rendering.top]
    footer = rendering.pixels[rendering.top + rows :]
    assert (header.max(axis=2) > 200).any() and (footer.max(axis=2) > 200).any()
    # the colour scale: the colour map's two ends both appear in the bottom margin
    lut = _colormap_lut()
    for end in (lut[10], lut[250]):
        assert np.any(np.all(np.abs(footer.astype(int) - end.astype(int)) <= 2, axis=2))


# ------------------------------------------------------------------------------------------
# Where the CAM is drawn


def test_body_mask_finds_the_patient_and_keeps_dark_lungs() -> None:
    image, body, lungs = _phantom()
    mask = body_mask(image, lungs)
    iou = (mask & body).sum() / (mask | body).sum()
    assert iou > 0.95
    assert mask[lungs].all()  # the dark lungs are inside the body (holes filled)
    # no air around the patient and lungs reaching the top border: still body
    tight = image.copy()
    tight[~body] = 150
    tight[: int(0.5 * image.shape[0])][lungs[: int(0.5 * image.shape[0])]] = 70
    reaching = lungs.copy()
    reaching[:150] |= _ellipse(image.shape, 0, 83, 150, 20)[:150]
    tight[reaching] = 70
    assert body_mask(tight, lungs)[reaching].mean() > 0.99


def test_cam_is_zero_outside_the_body_and_the_crop_box_and_fades_in() -> None:
    image, body, lungs = _phantom()
    box = (30, 20, 250, 240)
    film = render_film(_phantom_result(image, lungs, box))
    region = body_mask(image, lungs) & crop_region(image.shape, box)
    assert np.array_equal(film.region, region)
    assert film.cam[~region].max() == 0
    assert film.cam[~crop_region(image.shape, box)].max() == 0
    assert film.cam[~body].max() < 40  # the true body: at most the fade's first steps
    assert film.cam[150, 130] >= 250  # deep inside: the CAM as computed
    # outside the body and the box the pixels are the grey image (the contour aside)
    contour = np.all(film.rgb == CONTOUR_RGB, axis=2)
    outside = ~region & ~contour
    assert np.all(film.rgb[outside] == image[outside][:, None])
    # no hard edge: the drawn CAM rises gradually at the box and body borders
    steps = max(
        int(np.abs(np.diff(film.cam.astype(int), axis=0)).max()),
        int(np.abs(np.diff(film.cam.astype(int), axis=1)).max()),
    )
    assert steps < 80, steps  # a hard-edged rectangle would jump by 255
    # without a crop box only the body limits it
    whole = render_film(_phantom_result(image, lungs, None))
    assert whole.cam[~whole.region].max() == 0 and whole.region.sum() > film.region.sum()


def test_contour_has_the_two_largest_lung_components_only() -> None:
    image, _, lungs = _phantom()
    noisy = lungs.copy()
    for cy, cx in ((20, 40), (25, 220), (280, 130)):  # shoulder / apex / abdomen islands
        noisy[cy - 3 : cy + 3, cx - 3 : cx + 3] = True
    assert len(component_sizes(noisy)) == 5
    film = render_film(_phantom_result(image, noisy, None))
    assert film.lungs is not None
    assert len(component_sizes(film.lungs)) == 2
    assert np.array_equal(film.lungs, lungs)
    for cy, cx in ((20, 40), (25, 220), (280, 130)):
        assert tuple(film.rgb[cy - 3, cx]) != CONTOUR_RGB
    assert np.any(np.all(film.rgb == CONTOUR_RGB, axis=2)[lungs])


def test_components_and_hole_filling() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:5, 1:5] = True  # 16
    mask[6:11, 6:11] = True  # 25
    mask[5, 5] = True  # touches both diagonally: one 8-connected component
    mask[0, 11] = True
    assert component_sizes(mask) == [42, 1]
    assert largest_components(mask, keep=1).sum() == 42
    ring = np.zeros((9, 9), dtype=bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    assert fill_holes(ring).sum() == 49
    ring[0:4, 4] = False  # a channel to the border: no longer a hole
    assert not fill_holes(ring)[4, 4]


# ------------------------------------------------------------------------------------------
# Views


def test_views_decided_by_the_image_model_are_labelled_frontal_or_lateral(
    tmp_path: Path, settings_: Settings
) -> None:
    assert view_label("UNKNOWN", "image", "FRONTAL") == "FRONTAL"
    assert view_label("UNKNOWN", "image") == "FRONTAL"  # what JSON consumers have
    assert view_label("LATERAL", "image", "LATERAL") == "LATERAL"
    assert view_label("PA", "tag", "FRONTAL") == "PA"
    assert view_label("UNKNOWN", "tag") == "UNKNOWN"
    assert view_caption("UNKNOWN", "image", "FRONTAL") == "FRONTAL (image model)"

    result, _ = make_result(tmp_path, ["PA", None], scores=[0.3, 0.5])
    untagged = result.images[1]
    untagged.view_source = "image"
    untagged.view_image = "FRONTAL"
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    datasets = [pydicom.dcmread(p) for p in paths]
    sr = next(d for d in datasets if d.SOPClassUID == SR_CLASS)
    texts = [i.TextValue for i in content_items(list(sr.ContentSequence)) if i.ValueType == "TEXT"]
    assert any("Image 2 (FRONTAL (image model))" in t for t in texts)
    assert not any("UNKNOWN" in t for t in texts)
    tracking = [
        i.TextValue
        for i in content_items(list(sr.ContentSequence))
        if concept_meaning(i) == "Tracking Identifier"
    ]
    assert "Image 2 (FRONTAL) COVID-19" in tracking
    scs = [d for d in datasets if d.SOPClassUID != SR_CLASS]
    comments = {d.SourceImageSequence[0].ReferencedSOPInstanceUID: d.ImageComments for d in scs}
    assert "View: FRONTAL (image model)" in comments[untagged.source.sop_instance_uid]
    assert "View: PA (DICOM tags)" in comments[result.images[0].source.sop_instance_uid]


# ------------------------------------------------------------------------------------------
# Operating point: SR, statements, screen and demo


def test_sr_states_operating_point_and_each_parameter_once(
    tmp_path: Path, settings_: Settings
) -> None:
    result, _ = make_result(tmp_path, ["PA", "AP"], scores=[0.81, 0.1])
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    sr = pydicom.dcmread(paths[0])
    items = content_items(list(sr.ContentSequence))
    summary = next(i.TextValue for i in items if concept_meaning(i) == "Summary")
    assert (
        "COVID-19 threshold 0.4200 (tuning set: sensitivity 0.95, specificity 0.55) - "
        "sensitivity-first screening operating point" in summary
    )
    params = [i.TextValue for i in items if concept_meaning(i) == "Algorithm Parameters"]
    keys = [p.split("=", 1)[0] for p in params]
    assert len(keys) == len(set(keys)) == 10, keys
    assert {"covid_threshold", "threshold_version", "operating_point", "pneumonia_rule"} <= set(
        keys
    )
    # every measurement group (2 images x 2 findings) still identifies its algorithm
    names = [i.TextValue for i in items if concept_meaning(i) == "Algorithm Name"]
    versions = [i.TextValue for i in items if concept_meaning(i) == "Algorithm Version"]
    assert names == ["cxr-covid-effnetlite0"] * 4 and versions == ["1.0.0"] * 4
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert any("threshold version 3, set by an administrator" in t for t in texts)
    for path in paths:
        assert_valid(path)


def test_model_default_takes_the_manifest_validation_operating_point(
    settings_: Settings,
) -> None:
    manifest = load_manifest()
    scheme = manifest.production_scheme
    point = manifest.operating_point(scheme)
    assert point.sensitivity is not None and point.specificity is not None
    model = ModelInfo(name=manifest.name, version=manifest.version, scheme=scheme)
    statement = statement_for(embedded_info(settings_), model, settings_)
    assert statement.measured and statement.model_default and statement.measured_on == "validation"
    assert statement.sensitivity == pytest.approx(point.sensitivity.value)
    assert statement.specificity == pytest.approx(point.specificity.value)
    assert (
        f"(validation: sensitivity {point.sensitivity.value:.2f}, "
        f"specificity {point.specificity.value:.2f})" in statement.headline()
    )
    assert statement.origin() == "threshold version 0: the model's validation default"
    assert statement.calibration  # the manifest says what the probabilities are
    # another model's numbers are never borrowed
    other = ModelInfo(name=manifest.name, version="0.0.1", scheme=scheme)
    assert not statement_for(embedded_info(settings_), other, settings_).model_default
    # a value given on the command line is not the manifest's operating point
    given = ThresholdInfo(value=0.3, version=0, operating_point="given on the command line")
    stated = statement_for(given, model, settings_)
    assert not stated.measured and "operating point not measured" in stated.headline()


def test_admin_thresholds_carry_what_tune_measured_or_say_not_measured() -> None:
    proposal = TuneProposal(
        model_name="cxr-covid-effnetlite0",
        model_version="1.3.0",
        target_sensitivity=0.9,
        n_positive=40,
        n_negative=60,
        auc=0.9,
        average_precision=0.8,
        threshold=0.2,
        sensitivity=ev.Proportion(37, 40, 0.925, 0.80, 0.97),
        specificity=ev.Proportion(42, 60, 0.7, 0.57, 0.8),
        scheme="crop",
    )
    assert parse_operating_point(proposal.operating_point) == (0.925, 0.7, "tuning set")
    tuned = ThresholdInfo(0.2, 4, 0.9, proposal.operating_point)
    assert "(tuning set: sensitivity 0.93, specificity 0.70)" in statement_for(tuned).headline()
    manual = ThresholdInfo(0.3, 5, None, "set manually; no operating point measured")
    statement = statement_for(manual)
    assert statement.headline() == "COVID-19 threshold 0.3000 (operating point not measured)"
    assert "unknown" in statement.explanation()
    assert statement.origin() == "threshold version 5, set by an administrator"


def test_demo_explains_the_operating_point_once() -> None:
    from screener.demo import DemoResult, DemoStudy

    first = {
        "model": "cxr-covid-effnetlite0@1.3.0",
        "threshold": THRESHOLD.value,
        "threshold_version": THRESHOLD.version,
        "operating_point": THRESHOLD.operating_point,
        "images": [
            {
                "view": "UNKNOWN",
                "view_source": "image",
                "probabilities": {"covid": 0.5, "pneumonia": 0.3, "normal": 0.2},
                "covid_positive": True,
            }
        ],
    }
    studies = [
        DemoStudy(key, f"1.2.{n}", [], "delivered", None, dict(first))
        for n, key in enumerate(("a", "b", "c"))
    ]
    console = Console(record=True, width=200)
    DemoResult(Path("/tmp/demo"), studies, 3, 1.0, False).render(console)
    text = console.export_text()
    assert text.count("Operating point:") == 1
    assert "sensitivity 0.95, specificity 0.55" in text and "false alarms" in text
    assert "FRONTAL (image model)" in text and "UNKNOWN" not in text


def test_screen_explains_the_operating_point_once(cxr_dir: Path, tmp_path: Path) -> None:
    from screener.cli import app
    from screener.testing.dicom_factory import (
        corpus_image,
        make_study,
        pick_images,
        write_datasets,
    )

    rows = pick_images(cxr_dir, 2, label="normal", view="PA")
    datasets = [ds for row in rows for ds in make_study([(corpus_image(cxr_dir, row["id"]), "PA")])]
    write_datasets(datasets, tmp_path / "in")
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        runner = CliRunner()
    out = runner.invoke(app, ["screen", str(tmp_path / "in"), "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    assert len([json.loads(line) for line in out.stdout.splitlines()]) == 2  # stdout: JSON only
    assert out.stderr.count("Operating point:") == 1
    assert "(validation: sensitivity" in out.stderr and "not a diagnosis" in out.stderr


def test_wrapped_margin_lines_fit_the_width() -> None:
    from screener.reports.heatmap import _font, _wrap

    text = (
        "COVID-19 threshold 0.1237 (validation: sensitivity 0.95, specificity 0.55) - "
        "sensitivity-first screening operating point; 1.2.826.0.1.3680043.8.498.1234567890123"
        "4567890123456789012345678901234567890"
    )
    for size, width in ((10, 180), (13, 490), (53, 1990)):
        lines = _wrap(text, size, width)
        assert len(lines) > 1 and "".join(lines).replace(" ", "") == text.replace(" ", "")
        assert all(_font(size).getlength(line) <= width for line in lines)


# ------------------------------------------------------------------------------------------
# Cheaper rendering, the same pixels: each rewritten piece against the formulation it
# replaced, and the film's bytes against those the earlier code drew


def _union_find_loop(
    mask: np.ndarray, diagonal: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run-length union-find with a Python loop over runs (what the vectorised one replaced)."""
    touch = 0 if diagonal else 1
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))
    for r in range(h - 1):
        a, a_end = int(first[r]), int(first[r + 1])
        b, b_end = a_end, int(first[r + 2])
        while a < a_end and b < b_end:
            if starts[b] + touch <= ends[a] and starts[a] + touch <= ends[b]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(len(rows))], dtype=np.int64)
    return rows, starts, ends, roots


def _random_masks(count: int, seed: int) -> list[np.ndarray]:
    """Masks of every density, from 1 x 1 to 40 x 40, plus a few hard shapes: a spiral-like
    snake (one component across many rows), a checkerboard (diagonal contacts only)."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 41, 2))
        masks.append(rng.random((h, w)) < rng.random())
    snake = np.zeros((41, 37), dtype=bool)
    snake[::4] = True
    snake[1::4, -1] = snake[3::4, 0] = True
    checker = (np.add.outer(np.arange(30), np.arange(31)) % 2).astype(bool)
    return [*masks, snake, checker, np.zeros((5, 5), bool), np.ones((5, 5), bool)]


def test_vectorised_run_labelling_matches_the_union_find_loop() -> None:
    from screener.imaging.components import union_find_runs

    for mask in _random_masks(1500, seed=3):
        for diagonal in (True, False):
            got = union_find_runs(mask, diagonal)
            want = _union_find_loop(mask, diagonal)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and np.array_equal(g, w)


def test_painted_runs_match_the_cumulative_sum_formulation() -> None:
    from screener.imaging.components import paint_runs, union_find_runs

    rng = np.random.default_rng(4)
    for mask in _random_masks(500, seed=5):
        rows, starts, ends, _ = union_find_runs(mask)
        assert np.array_equal(paint_runs(mask.shape, rows, starts, ends), mask)
        take = rng.random(rows.size) < 0.5
        marks = np.zeros((mask.shape[0], mask.shape[1] + 1), dtype=np.int8)
        marks[rows[take], starts[take]] = 1
        marks[rows[take], ends[take]] = -1
        want = np.cumsum(marks, axis=1, dtype=np.int8)[:, : mask.shape[1]] > 0
        got = paint_runs(mask.shape, rows[take], starts[take], ends[take])
        assert got.dtype == np.bool_ and np.array_equal(got, want)


def test_box_blur_erosion_and_contour_are_bit_identical_to_their_padded_forms() -> None:
    from screener.reports.heatmap import _box_blur, _erode3, lung_contour

    def blur_cumsum_take(values: np.ndarray, radius: int) -> np.ndarray:
        k = 2 * radius + 1
        out = values.astype(np.float64)
        for axis in (0, 1):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (radius + 1, radius)
            c = np.cumsum(np.pad(out, pad, mode="reflect"), axis=axis)
            hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
            lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
            out = (hi - lo) / k
        return out

    def erode_nine(mask: np.ndarray) -> np.ndarray:
        p = np.pad(mask, 1, constant_values=False)
        h, w = mask.shape
        out = mask.copy()
        for dy in range(3):
            for dx in range(3):
                out &= p[dy : dy + h, dx : dx + w]
        return out

    def contour_padded(mask: np.ndarray, thickness: int) -> np.ndarray:
        p = np.pad(mask, 1)
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        edge = mask & ~eroded
        for _ in range(max(0, thickness - 1)):
            p = np.pad(edge, 1)
            edge = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        return edge

    rng = np.random.default_rng(6)
    masks = _random_masks(300, seed=7) + [rng.random((256, 224)) < 0.8]
    for mask in masks:
        assert np.array_equal(_erode3(mask), erode_nine(mask))
        for thickness in (1, 2, 3):
            assert np.array_equal(lung_contour(mask, thickness), contour_padded(mask, thickness))
        if min(mask.shape) < 2:  # reflection needs two rows and columns
            continue
        for radius in (1, 2, 6, 13):
            got, want = _box_blur(mask, radius), blur_cumsum_take(mask, radius)
            assert got.dtype == want.dtype == np.float64 and np.array_equal(got, want)


def test_blend_into_a_window_of_an_output_equals_the_whole_lookup() -> None:
    from screener.reports.heatmap import _blend_lut

    rng = np.random.default_rng(8)
    gray = rng.integers(0, 256, (90, 70), dtype=np.uint8)
    cam = np.zeros_like(gray)
    cam[20:61, 15:50] = rng.integers(0, 256, (41, 35), dtype=np.uint8)
    whole = _blend_lut()[(gray.astype(np.uint16) << 8) | cam]
    canvas = np.full((100, 90, 3), 7, dtype=np.uint8)
    out = canvas[5:95, 10:80]
    for window in (None, (20, 15, 61, 50), (18, 0, 70, 70), (0, 0, 90, 70)):
        out[:] = 7
        assert blend_cam(gray, cam, window, out) is out
        assert np.array_equal(out, whole) and np.array_equal(blend_cam(gray, cam, window), whole)
    assert (canvas[:5] == 7).all() and (canvas[:, :10] == 7).all()  # nothing outside drawn


def test_film_pixels_are_those_the_earlier_code_drew() -> None:
    """The film's RGB, drawn CAM and contoured lungs, byte for byte as the renderer drew
    them before it was made cheaper (digest recorded with that code): a CAM gradient (every
    blend level), a crop box inside, none, and one reaching past the film; a stray island
    in the lung mask; the film at display size, shrunk, shrunk further."""
    import hashlib

    image, _, lungs = _phantom((300, 260))
    noisy = lungs.copy()
    noisy[10:14, 10:14] = True
    noisy[280:283, 240:244] = True
    rows, cols = np.mgrid[0:300, 0:260]
    digest = hashlib.sha256()
    for box, size in (((40, 30, 270, 240), 2048), (None, 200), ((-5, 20, 150, 400), 128)):
        result = _phantom_result(image, noisy, box)
        result.cam = ((rows * 7 + cols * 3) % 256 / 255.0).astype(np.float32)
        film = render_film(result, size)
        assert film.lungs is not None
        digest.update(film.rgb.tobytes())
        digest.update(film.cam.tobytes())
        digest.update(np.packbits(film.lungs).tobytes())
    assert digest.hexdigest() == "7c2349a27b5f7fa7536a3e9c83bc1df862210777552e89b37999cf4339b7f045"
