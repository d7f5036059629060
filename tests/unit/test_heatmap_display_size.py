"""Issue 11 build item 2: the heatmap is drawn where it is drawn, at film size.

A result carries its maps at the networks' grid (``ResultGrid``) and the display image; the
heatmap brings the CAM, the crop box and the lungs from the grid straight onto the film
(never a display-size copy first), and the SC shows what it showed when drawn from
display-size arrays: same margins and text, the CAM only inside the body and the box, the
same share of it inside the lungs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from engines.manifest import MANIFEST_NAME, SHIPPED_WEIGHTS_DIR
from screener.reports.heatmap import CONTOUR_RGB, Film, crop_region, render, render_film
from screener.reports.writer import write_study_outputs
from screener.results import ImageResult, ResultGrid, SourceImageRef, ThresholdInfo
from screener.screening.cam import (
    attach_display,
    box_on,
    expand_to_display,
    lung_on,
    reach,
    resize_within,
)
from screener.screening.models import ScreeningModels
from screener.screening.prepare import prepare_dataset
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity, corpus_image, make_instance, pick_images
from tests.dicom_validation import assert_valid
from tests.report_results import make_result

WORK = (512, 420)
BOX = (40, 30, 360)  # top, left, size on the working image


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _display(shape: tuple[int, int] = (1000, 820)) -> np.ndarray:
    """Air around a body holding two darker lungs, at display size."""
    rows, cols = shape
    body = _ellipse(shape, rows * 0.55, cols * 0.5, rows * 0.44, cols * 0.42)
    lungs = _ellipse(shape, rows * 0.5, cols * 0.32, rows * 0.24, cols * 0.11) | _ellipse(
        shape, rows * 0.5, cols * 0.68, rows * 0.24, cols * 0.11
    )
    image = np.where(lungs, 70.0, np.where(body, 150.0, 8.0))
    image += np.random.default_rng(2).normal(0, 4, shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _grid() -> ResultGrid:
    """The maps a frontal result carries: the segmenter's lungs (224 px, soft edges) and a
    7 x 7 CAM in the crop square, hottest in the right lung's lower half."""
    lungs = _ellipse((224, 224), 112, 72, 54, 25) | _ellipse((224, 224), 112, 152, 54, 25)
    soft = np.asarray(
        Image.fromarray(lungs.astype(np.uint8) * 255).resize((56, 56), Image.Resampling.BOX)
    )
    lung = np.asarray(Image.fromarray(soft).resize((224, 224), Image.Resampling.BILINEAR))
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[4, 2], cam[3, 2], cam[4, 1], cam[2, 5] = 3.0, 1.5, 1.2, 0.8
    return ResultGrid(lung=lung, work_shape=WORK, cam=cam.astype(np.float16), box=BOX)


def _image(display: np.ndarray, grid: ResultGrid) -> ImageResult:
    image = ImageResult(
        source=SourceImageRef("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2"),
        view="PA",
        screened=True,
        probabilities={"covid": 0.6, "pneumonia": 0.3, "normal": 0.1},
        covid_positive=True,
        grid=grid,
    )
    attach_display(image, display)
    return image


def _lung_share(film: Film) -> float:
    cam = film.cam.astype(np.float64)
    assert film.lung_mask is not None
    return float(cam[film.lung_mask].sum() / cam.sum())


# ------------------------------------------------------------------------------------------
# Maps from the grid


@pytest.mark.parametrize("max_size", [1000, 400])
def test_grid_maps_land_on_the_film_grid(max_size: int) -> None:
    grid = _grid()
    image = _image(_display(), grid)
    assert image.cam is None and image.lung_mask is None  # nothing at display size
    film = render_film(image, max_size)
    shape = film.gray.shape
    assert max(shape) == max_size
    assert film.box == box_on(grid, shape)
    assert film.lung_mask is not None and np.array_equal(film.lung_mask, lung_on(grid, shape))
    # the CAM only inside the body and the box, hot where the grid's peak lies
    assert film.cam[~film.region].max() == 0
    assert film.cam[~crop_region(shape, film.box)].max() == 0
    assert film.cam.max() >= 200
    top, left, bottom, right = film.box  # type: ignore[misc]
    peak = np.unravel_index(np.argmax(film.cam), shape)
    cell = (bottom - top) / 7  # the CAM's cell (4, 2) on the film
    expected = (top + 4.5 * cell, left + 2.5 * cell)
    assert abs(peak[0] - expected[0]) < cell and abs(peak[1] - expected[1]) < cell
    assert np.any(np.all(film.rgb == CONTOUR_RGB, axis=2))
    assert image.cam is None and image.lung_mask is None  # render made none either


def test_grid_and_display_arrays_draw_the_same_heatmap() -> None:
    display = _display()
    from_grid = render_film(_image(display, _grid()))
    arrays = _image(display, _grid())
    expand_to_display(arrays, display)
    arrays.grid = None  # only the display-size arrays: the path of results without a grid
    from_arrays = render_film(arrays)
    assert from_grid.box == from_arrays.box
    assert np.array_equal(from_grid.gray, from_arrays.gray)
    diff = np.abs(from_grid.cam.astype(int) - from_arrays.cam.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())
    assert abs(_lung_share(from_grid) - _lung_share(from_arrays)) < 0.01
    contour = [np.all(f.rgb == CONTOUR_RGB, axis=2) for f in (from_grid, from_arrays)]
    assert (contour[0] ^ contour[1]).sum() <= 0.01 * contour[1].sum()


def test_resize_within_matches_a_whole_resize() -> None:
    rng = np.random.default_rng(5)
    for values_shape, shape in (((224, 224), (1000, 820)), ((256, 210), (2048, 1678))):
        values = np.zeros(values_shape, dtype=np.uint8)
        blob = _ellipse(values_shape, values_shape[0] * 0.4, values_shape[1] * 0.6, 30, 20)
        values[blob] = rng.integers(1, 256, int(blob.sum()))
        for target in (shape, (shape[0] // 9, shape[1] // 9)):  # enlarging and shrinking
            whole = np.asarray(
                Image.fromarray(values).resize(target[::-1], Image.Resampling.BILINEAR)
            )
            window = reach(values > 0, target)
            assert window is not None
            part = resize_within(values, target, window)
            assert int(np.abs(part.astype(int) - whole).max()) <= 1  # zero outside: reached
            top, left, bottom, right = window
            assert (bottom - top) * (right - left) < 0.5 * target[0] * target[1]
    assert reach(np.zeros((4, 4), dtype=bool), (8, 8)) is None


# ------------------------------------------------------------------------------------------
# The SC written from a result that carries only the grid


def test_sc_from_grid_only_result_is_valid_and_one_frame(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.reports.parametric_map = True
    result, _ = make_result(tmp_path, ["PA"], scores=[0.7])
    image = result.images[0]
    display = _display()
    image.cam = image.lung_mask = image.cam_box = None
    image.grid = _grid()
    attach_display(image, display)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    assert [p.name[:3] for p in paths] == ["sr_", "sc_", "pma"]
    sc = pydicom.dcmread(paths[1])
    rendering = render(image, result, settings.disclaimer, settings.reports.heatmap_max_size)
    assert (sc.Rows, sc.Columns) == rendering.pixels.shape[:2]
    assert len(sc.PixelData) == sc.Rows * sc.Columns * 3 and sc.PlanarConfiguration == 0
    assert np.array_equal(sc.pixel_array, rendering.pixels)
    assert rendering.film.gray.shape == display.shape
    for path in paths:
        assert_valid(path)


# ------------------------------------------------------------------------------------------
# Real models, corpus images


@pytest.fixture(scope="module")
def models() -> ScreeningModels:
    if not (SHIPPED_WEIGHTS_DIR / MANIFEST_NAME).exists():
        pytest.skip("no shipped weights")
    return ScreeningModels.from_settings(Settings())


def test_corpus_heatmaps_from_the_grid_keep_their_lung_share(
    cxr_dir: Path, models: ScreeningModels
) -> None:
    settings = Settings()
    rows = pick_images(cxr_dir, 2, label="covid", view="PA", split="val")
    prepared = [
        prepare_dataset(
            make_instance(
                corpus_image(cxr_dir, row["id"]),
                study=StudyIdentity.new(),
                target_size=(1200, 1000),
            ),
            Path(f"{row['id']}.dcm"),
            settings,
        )
        for row in rows
    ]
    results = models.infer(prepared, ThresholdInfo(0.5))
    for result, prep in zip(results, prepared, strict=True):
        assert result.screened and result.grid is not None
        fraction = result.heatmap_lung_fraction
        lean = replace(result, cam=None, lung_mask=None, display_image=None, cam_box=None)
        attach_display(lean, prep.display_image)
        from_grid = render_film(lean, settings.reports.heatmap_max_size)
        arrays = replace(lean)
        expand_to_display(arrays, prep.display_image)
        arrays.grid = None  # drawn from the display-size arrays alone
        from_arrays = render_film(arrays, settings.reports.heatmap_max_size)
        assert from_grid.cam.max() > 0
        assert abs(_lung_share(from_grid) - _lung_share(from_arrays)) < 0.01
        diff = np.abs(from_grid.cam.astype(int) - from_arrays.cam.astype(int))
        assert diff.mean() < 1.0, diff.mean()
        assert lean.heatmap_lung_fraction == fraction  # the result's own share: untouched
