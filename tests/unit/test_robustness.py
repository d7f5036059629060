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
placement"), so the target stays unmet.
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
    return measure(CXR_DIR, frontal_split(CXR_DIR, "test")[:N_IMAGES])


@pytest.mark.parametrize("name", ["monochrome1", "bits_8", "bits_14", "bits_16"])
def test_lossless_storage_changes_nothing(name: str, stability: dict[str, Stability]) -> None:
    s = stability[name]
    assert s.n >= N_IMAGES - 2
    assert s.max_abs_delta <= 1e-3
    assert s.flips == 0


# Measured on the full test split for 1.3.0: mean |change| 0.035 (J2K 10:1), 0.039 (JPEG q90),
# 0.060-0.063 (rotations); the guards leave room for the subset's sampling noise.
GUARDS = {
    "jpeg2000_10to1": 0.06,
    "jpeg_baseline_q90": 0.06,
    "rotate_minus_5": 0.12,
    "rotate_plus_5": 0.12,
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

    from engines.training.robustness import _roundtrip

    row = {"modality": "CR", "sex": "F", "view": "PA"}
    pixels = (np.add.outer(np.arange(256), np.arange(256)) % 256).astype(np.uint8)
    seen = {}
    for name, make in PERTURBATIONS.items():
        ds = _roundtrip(make(pixels, row))
        seen[name] = (str(ds.file_meta.TransferSyntaxUID), ds.PhotometricInterpretation)
        if name.startswith("bits_"):
            assert ds.BitsStored == int(name.split("_")[1])
    assert seen["jpeg2000_10to1"][0] == "1.2.840.10008.1.2.4.91"
    assert seen["jpeg_baseline_q90"][0] == "1.2.840.10008.1.2.4.50"
    assert seen["monochrome1"][1] == "MONOCHROME1"
