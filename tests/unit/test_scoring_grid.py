"""Scores must not depend on how large the heatmap is drawn: the networks' images come from
the film through a fixed grid (prepare.SCORING_GRID), not from the display image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from screener.imaging.preprocess import WORK_SIZE, limit_size
from screener.screening.prepare import SCORING_GRID, prepare_instance
from screener.settings import Settings
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_instance,
    pick_images,
    write_datasets,
)


@pytest.mark.parametrize("film", [(2048, 2048), (2500, 2048), (700, 600)])
def test_network_inputs_do_not_depend_on_the_display_size(
    cxr_dir: Path, tmp_path: Path, film: tuple[int, int]
) -> None:
    row = pick_images(cxr_dir, 1, view="PA", split="val")[0]
    ds = make_instance(
        corpus_image(cxr_dir, row["id"]), study=StudyIdentity.new(), target_size=film
    )
    (path,) = write_datasets([ds], tmp_path)
    prepared = {
        size: prepare_instance(path, Settings(reports={"heatmap_max_size": size}))
        for size in (2048, 1024, 300)
    }
    for size, p in prepared.items():
        assert p.skip_reason is None
        assert p.display_image is not None and max(p.display_image.shape) == min(size, max(film))
    reference = prepared[2048]
    assert reference.work_image is not None and reference.network_input is not None
    # what the shipped model was validated with when the display size was 2048
    assert reference.display_image is not None
    np.testing.assert_array_equal(
        reference.work_image, limit_size(reference.display_image, WORK_SIZE)
    )
    for size in (1024, 300):
        np.testing.assert_array_equal(prepared[size].work_image, reference.work_image)
        np.testing.assert_array_equal(prepared[size].network_input, reference.network_input)


def test_scoring_grid_is_the_validated_display_size() -> None:
    assert SCORING_GRID == 2048
    assert Settings().reports.heatmap_max_size <= SCORING_GRID
