"""Score stability under what archives do to a film, through the whole run-time path.

A subset of the test split (the first 40 frontal images) keeps this quick; the model card's
figures come from the full split (``python -m engines.training.robustness``). Lossless changes
(MONOCHROME1, 8 to 16 bits stored) must not move the score at all. Lossy compression and
rotation are held to the bounds measured for model 1.3.0 (a regression guard); the issue's
target for lossy compression (mean |change| <= 0.02, no flip) is not met by the shipped
network, recorded as strict expected failures so meeting it is noticed. Fine-tuning for
archive copies (``engines.training.robust``) was tried on validation and did not meet its
shipping rule (model card, "Archive-robust fine-tuning"), and so did steadier placements of
the lung crop square (``engines.training.box_stability``; model card, "Crop square
placement"), so the target stays unmet. Two copies smaller than any codec (one grey level
of noise, a one-pixel shift) already move the score more than the target allows (model card,
"The floor under the lossy target").
"""

from __future__ import annotations

import pytest

from engines.training.robustness import PERTURBATIONS, Stability, measure
from tests.conftest import CXR_DIR

N_IMAGES = 40


@pytest.fixture(scope="module")
def stability() -> dict[str, Stability]:
    from engines.training.scoring import frontal_split

    if not (CXR_DIR / "manifest.csv").exists():
        pytest.skip(f"corpus not found at {CXR_DIR}")
    return measure(CXR_DIR, frontal_split(CXR_DIR, "test")[:N_IMAGES]).perturbations


@pytest.mark.parametrize("name", ["monochrome1", "bits_8", "bits_14", "bits_16"])
def test_lossless_storage_changes_nothing(name: str, stability: dict[str, Stability]) -> None:
    s = stability[name]
    assert s.n >= N_IMAGES - 2
    assert s.max_abs_delta <= 1e-3
    assert s.flips == 0


# Measured on the full test split for 1.3.0: mean |change| 0.035 (J2K 10:1), 0.039 (JPEG q90),
# 0.060-0.063 (rotations), 0.026 (one grey level of noise), 0.030 (one pixel shift); the
# guards leave room for the subset's sampling noise.
GUARDS = {
    "jpeg2000_10to1": 0.06,
    "jpeg_baseline_q90": 0.06,
    "rotate_minus_5": 0.12,
    "rotate_plus_5": 0.12,
    "noise_one_grey_level": 0.06,
    "shift_one_pixel": 0.06,
}


@pytest.mark.parametrize("name", sorted(GUARDS))
def test_lossy_and_rotated_films_stay_within_the_measured_bounds(
    name: str, stability: dict[str, Stability]
) -> None:
    s = stability[name]
    assert s.n >= N_IMAGES - 2
    assert s.mean_abs_delta <= GUARDS[name]
    assert s.flips <= 0.15 * s.n


@pytest.mark.xfail(
    strict=True,
    reason=(
        "issue 14 target not met by model 1.3.0; robust fine-tunes and crop-square rules tried"
        " did not ship (card)"
    ),
)
@pytest.mark.parametrize("name", ["jpeg2000_10to1", "jpeg_baseline_q90"])
def test_lossy_compression_meets_the_issue_target(
    name: str, stability: dict[str, Stability]
) -> None:
    s = stability[name]
    assert s.mean_abs_delta <= 0.02 and s.flips == 0


def test_every_perturbation_is_a_different_file() -> None:
    """The variants really are what they claim (transfer syntax, photometric, bits)."""
    import numpy as np

    from engines.training.robustness import as_received, corpus_instance

    row = {"modality": "CR", "sex": "F", "view": "PA"}
    pixels = (np.add.outer(np.arange(256), np.arange(256)) % 256).astype(np.uint8)
    seen = {}
    for name, make in PERTURBATIONS.items():
        ds = as_received(make(pixels, row))
        seen[name] = (str(ds.file_meta.TransferSyntaxUID), ds.PhotometricInterpretation)
        if name.startswith("bits_"):
            assert ds.BitsStored == int(name.split("_")[1])
    reference = as_received(corpus_instance(pixels, row, bits_stored=12)).pixel_array.astype(int)
    noisy = as_received(PERTURBATIONS["noise_one_grey_level"](pixels, row)).pixel_array
    change = noisy.astype(int) - reference
    assert np.abs(change).max() == 16 and np.mean(change != 0) > 0.9  # one 8-bit grey level
    moved = as_received(PERTURBATIONS["shift_one_pixel"](pixels, row)).pixel_array
    assert np.array_equal(moved[:, 1:], reference[:, :-1])
    assert np.array_equal(moved[:, 0], reference[:, 0])
    assert seen["jpeg2000_10to1"][0] == "1.2.840.10008.1.2.4.91"
    assert seen["jpeg_baseline_q90"][0] == "1.2.840.10008.1.2.4.50"
    assert seen["monochrome1"][1] == "MONOCHROME1"


def test_near_threshold_counts_scores_closer_than_each_distance() -> None:
    import numpy as np

    from engines.training.robustness import near_threshold

    scores = np.array([0.5, 0.504, 0.491, 0.515, 0.2, np.nan])
    assert near_threshold(scores, 0.5) == {"0.005": 2, "0.01": 3, "0.02": 4}


def test_pixel_rms_measures_what_a_copy_did_to_the_pixels() -> None:
    """Grey levels of the 8-bit source: 0 for MONOCHROME1 (inverted back), a rounding
    difference for another bit depth, about 0.58 for uniform noise of one grey level, more
    for a lossy codec."""
    import numpy as np

    from engines.training.robustness import as_received, corpus_instance, pixel_rms

    row = {"modality": "CR", "sex": "F", "view": "PA"}
    pixels = np.random.default_rng(3).integers(40, 220, (256, 256)).astype(np.uint8)
    reference = as_received(corpus_instance(pixels, row, bits_stored=12))

    def rms(name: str) -> float:
        return pixel_rms(reference, as_received(PERTURBATIONS[name](pixels, row)))

    assert rms("monochrome1") < 0.01
    assert rms("bits_16") < 0.15  # 8 -> 12 and 8 -> 16 bit scalings round differently
    assert 0.5 < rms("noise_one_grey_level") < 0.65
    assert rms("jpeg_baseline_q90") > rms("noise_one_grey_level")
