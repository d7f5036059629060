"""JPEG 2000 decoded at the resolution the consumers need: same LUTs, same scores.

``stored_pixels(ds, min_size)`` decodes a 2048-px lossless JPEG 2000 image at wavelet
level 1 (1024 px) or 2 (512 px) in a fraction of a full decode, with the modality/VOI LUT
and MONOCHROME1 applied to the reduced values exactly as at full size.

Not wired into prepare: the shipped classifier is sensitive to the resampling chain. On 30
validation images as 2048-px JPEG 2000 (measured for issue 11), against today's path (full
decode, one bilinear resize to 512): level 1 then bilinear to 512 moves COVID
probabilities by up to 0.052 (mean 0.016), level 2 by up to 0.119 with 2 calls flipped; even
a full decode resized 2048 -> 1024 -> 512 moves them by up to 0.087. The criterion is 0.01
and no flip, so prepare decodes in full; the last test guards that.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000Lossless

from screener.imaging.decode import (
    decode_display,
    parse_codestream,
    reduction_for,
    stored_pixels,
)
from screener.screening.models import ScreeningModels
from screener.screening.prepare import prepare_dataset
from screener.settings import Settings
from screener.testing.dicom_factory import StudyIdentity, corpus_image, make_instance, pick_images
from screener.thresholds import embedded_info
from tests.conftest import CXR_DIR

SIZE = (2048, 2048)
N_IMAGES = 30  # of the validation split, PA and AP


def _j2k(pixels: np.ndarray, **kw: object) -> pydicom.Dataset:
    return make_instance(
        pixels,
        study=StudyIdentity.new(),
        target_size=SIZE,
        transfer_syntax=JPEG2000Lossless,
        **kw,  # type: ignore[arg-type]
    )


def _frame(ds: pydicom.Dataset) -> bytes:
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def test_reduction_level_keeps_the_needed_size() -> None:
    assert reduction_for(2048, 2048, 5, 2048) == 0
    assert reduction_for(2048, 2048, 5, 1024) == 1
    assert reduction_for(2048, 2048, 5, 1025) == 0
    assert reduction_for(2048, 2048, 5, 512) == 2
    assert reduction_for(2048, 2048, 1, 512) == 1  # never more than the codestream has
    assert reduction_for(3000, 2500, 5, 1024) == 1  # 1500 >= 1024 > 750
    assert reduction_for(2047, 1000, 5, 512) == 2  # ceil(2047 / 4) = 512
    assert reduction_for(2049, 1000, 5, 512) == 2  # ceil(2049 / 4) = 513


def test_codestream_header_is_read(cxr_dir: Path) -> None:
    row = pick_images(cxr_dir, 1, split="val", view="PA")[0]
    ds = _j2k(corpus_image(cxr_dir, row["id"]))
    info = parse_codestream(_frame(ds))
    assert (info.rows, info.columns, info.components) == (2048, 2048, 1)
    assert (info.precision, info.signed) == (12, False)
    assert info.levels >= 3
    with pytest.raises(ValueError):
        parse_codestream(b"\x00" * 64)


def test_reduced_levels_are_fast_and_close_to_the_full_image(cxr_dir: Path) -> None:
    row = pick_images(cxr_dir, 1, split="val", view="AP")[0]
    ds = _j2k(corpus_image(cxr_dir, row["id"]))
    full = ds.pixel_array.astype(np.float64)
    for min_size, side in ((2048, 2048), (1024, 1024), (1000, 1024), (512, 512)):
        start = time.process_time()
        reduced = stored_pixels(ds, min_size)
        spent = time.process_time() - start
        assert reduced.shape == (side, side)
        assert reduced.dtype == np.uint16
        f = 2048 // side
        boxes = full.reshape(side, f, side, f).mean(axis=(1, 3))
        # a low-pass of the same image, on the stored scale (12 bits)
        assert np.abs(boxes - reduced).mean() < 40, min_size
        assert abs(float(boxes.mean()) - float(reduced.mean())) < 8
        if side == 512:
            assert spent < 0.5  # ~30 ms here; a full decode is ~360 ms
    # without a size: the full decode
    assert stored_pixels(ds).shape == (2048, 2048)


def test_monochrome1_and_window_apply_to_the_reduced_image(cxr_dir: Path) -> None:
    row = pick_images(cxr_dir, 1, split="val", view="PA")[0]
    pixels = corpus_image(cxr_dir, row["id"])
    mono2 = _j2k(pixels)
    mono1 = _j2k(pixels, photometric="MONOCHROME1")
    d2, p2 = decode_display(mono2, min_size=512)
    d1, p1 = decode_display(mono1, min_size=512)
    assert (p1, p2) == ("MONOCHROME1", "MONOCHROME2")
    assert d1.shape == d2.shape == (512, 512)
    # the MONOCHROME1 image is stored inverted and displayed like the MONOCHROME2 one
    assert np.abs(d1.astype(int) - d2.astype(int)).max() <= 2
    full, _ = decode_display(mono2)
    small = full.reshape(512, 4, 512, 4).mean(axis=(1, 3))
    assert np.abs(small - d2).mean() < 3.0  # the window maps the reduced values the same way


def test_signed_and_mismatched_streams(cxr_dir: Path) -> None:
    row = pick_images(cxr_dir, 1, split="val", view="PA")[0]
    ds = _j2k(corpus_image(cxr_dir, row["id"]))
    # signed data: written as int16, centred on 0
    signed = ds.pixel_array.astype(np.int16) - 2048
    ds_signed = make_instance(
        corpus_image(cxr_dir, row["id"]), study=StudyIdentity.new(), target_size=SIZE
    )
    ds_signed.PixelRepresentation = 1
    ds_signed.PixelData = signed.tobytes()
    ds_signed.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds_signed = pydicom.dcmread(_save(ds_signed))
    reduced = stored_pixels(ds_signed, 1024)
    assert reduced.dtype == np.int16 and reduced.shape == (1024, 1024)
    boxes = signed.astype(np.float64).reshape(1024, 2, 1024, 2).mean(axis=(1, 3))
    assert reduced.min() < 0
    assert np.abs(boxes - reduced).mean() < 40
    # a header that disagrees with its codestream: the full decode (pydicom) decides
    ds.BitsStored = 16
    assert stored_pixels(ds, 512).shape == (2048, 2048)


def _save(ds: pydicom.Dataset) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "signed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def validation_j2k(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """N_IMAGES validation-split images as 2048-px 12-bit JPEG 2000 lossless CR files."""
    from screener.testing.dicom_factory import write_datasets

    if not (CXR_DIR / "manifest.csv").exists():
        pytest.skip(f"corpus not found at {CXR_DIR}")
    cxr = CXR_DIR
    rows = pick_images(cxr, N_IMAGES // 2, split="val", view="PA") + pick_images(
        cxr, N_IMAGES - N_IMAGES // 2, split="val", view="AP"
    )
    out = tmp_path_factory.mktemp("val-j2k")
    paths: list[Path] = []
    for row in rows:
        ds = make_instance(
            corpus_image(cxr, row["id"]),
            study=StudyIdentity.new(),
            view_position=row["view"],
            target_size=SIZE,
            transfer_syntax=JPEG2000Lossless,
        )
        paths += write_datasets([ds], out)
    return paths


def test_prepare_scores_jpeg2000_as_its_full_decode(
    validation_j2k: list[Path], tmp_path: Path
) -> None:
    """What prepare wires today: JPEG 2000 in full (a reduced level drifts, see above), so
    the scores of the JPEG 2000 files equal those of the same pixels uncompressed, also
    with a display smaller than the image."""
    settings = Settings(data_dir=tmp_path)  # type: ignore[call-arg]
    settings.reports.heatmap_max_size = 1024
    models = _models(settings)
    threshold = embedded_info(settings, models.scheme)
    j2k, plain = [], []
    for path in validation_j2k:
        ds = pydicom.dcmread(path)
        # a reduced level exists for this file: prepare chooses not to use it
        assert stored_pixels(ds, 1024).shape == (1024, 1024)
        j2k.append(prepare_dataset(ds, path, settings))
        same = pydicom.dcmread(path)
        same.decompress()  # the same stored values, uncompressed
        plain.append(prepare_dataset(same, path, settings))
    for a, b in zip(j2k, plain, strict=True):
        assert a.skip_reason is None and b.skip_reason is None
        assert a.display_image is not None and b.display_image is not None
        assert np.array_equal(a.display_image, b.display_image)
    got = models.infer(j2k, threshold)
    want = models.infer(plain, threshold)
    for g, w in zip(got, want, strict=True):
        assert g.screened and w.screened
        assert g.probabilities is not None and w.probabilities is not None
        assert abs(g.probabilities["covid"] - w.probabilities["covid"]) <= 0.01
        assert g.covid_positive == w.covid_positive, "a call flipped"


_MODELS: dict[str, ScreeningModels] = {}


def _models(settings: Settings) -> ScreeningModels:
    """The shipped models, loaded once for the module."""
    if "m" not in _MODELS:
        _MODELS["m"] = ScreeningModels.from_settings(settings)
    return _MODELS["m"]
