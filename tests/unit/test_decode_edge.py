"""Decoding edge cases (screener.imaging.decode): a header that claims an enormous image is
refused before the pixels are allocated, Pixel Padding Value is left out of the stretch and
shown black (images without it decode exactly as before), and an unusable window is
ignored instead of failing the image."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from screener.imaging.decode import NotScreenable, decode_display, decode_pixels
from screener.imaging.preprocess import to_uint8
from screener.screening.prepare import prepare_instance
from screener.settings import ScreeningSettings, Settings
from screener.testing.dicom_factory import StudyIdentity, make_instance, write_datasets
from tests.report_results import synthetic_pixels


def _plain(
    pixels: np.ndarray, *, photometric: str = "MONOCHROME2", padding: int | None = None
) -> Dataset:
    """A bare 12-bit image without window tags (the min/max stretch decides)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    if padding is not None:
        ds.PixelPaddingValue = padding
    return ds


def _hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


# -- size bound ---------------------------------------------------------------------------


def test_decode_refuses_a_header_claiming_more_pixels_than_the_bound() -> None:
    """Defence in depth behind the gate: the size is checked before ``pixel_array``."""
    from screener.imaging.decode import MAX_PIXELS

    assert MAX_PIXELS == ScreeningSettings().max_pixels
    ds = make_instance(synthetic_pixels(320, 288), study=StudyIdentity.new())
    ds.Rows, ds.Columns = 8000, 8000  # the header lies; Pixel Data holds 320 x 288
    for decode in (decode_display, decode_pixels):
        with pytest.raises(NotScreenable, match=r"too large \(8000 x 8000 = 64000000 pixels"):
            decode(ds)  # type: ignore[operator]
    small = make_instance(synthetic_pixels(320, 288), study=StudyIdentity.new())
    with pytest.raises(NotScreenable, match="too large"):
        decode_display(small, max_pixels=320 * 288 - 1)
    assert decode_display(small, max_pixels=320 * 288)[0].shape == (320, 288)


# -- images without padding: unchanged ---------------------------------------------------

#: sha256[:16] of decode_display's output, computed before Pixel Padding Value was handled:
#: the models' scores depend on these bytes.
GOLDEN_DISPLAY = {
    "factory-8-MONOCHROME1-win": "1fdef43b5347faa4",
    "factory-8-MONOCHROME1-nowin": "eeca6ae43c4b2b3c",
    "factory-8-MONOCHROME2-win": "1fdef43b5347faa4",
    "factory-8-MONOCHROME2-nowin": "be0beeac8c06c127",
    "factory-12-MONOCHROME1-win": "53e627e672405dec",
    "factory-12-MONOCHROME1-nowin": "36d4bc09926a6f29",
    "factory-12-MONOCHROME2-win": "53e627e672405dec",
    "factory-12-MONOCHROME2-nowin": "36d4bc09926a6f29",
    "factory-16-MONOCHROME1-win": "e268bd515f41eb3e",
    "factory-16-MONOCHROME1-nowin": "2e4a38c9f837c760",
    "factory-16-MONOCHROME2-win": "e268bd515f41eb3e",
    "factory-16-MONOCHROME2-nowin": "2e4a38c9f837c760",
    "factory-rescale-neg": "b1914a35c5fd2b17",
    "CT_small.dcm": "93a18f934884c6cf",
    "MR_small.dcm": "38ab8d87e706bf8d",
    "MR_small_RLE.dcm": "38ab8d87e706bf8d",
}


def _golden_case(name: str) -> Dataset:
    if name.startswith("factory-rescale"):
        ds = make_instance(
            synthetic_pixels(96, 80, seed=3), study=StudyIdentity.new(), with_window=False
        )
        ds.RescaleSlope, ds.RescaleIntercept = -2, 100
        return ds
    if name.startswith("factory-"):
        _, bits, photometric, win = name.split("-")
        return make_instance(
            synthetic_pixels(96, 80, seed=int(bits)),
            study=StudyIdentity.new(),
            bits_stored=int(bits),
            photometric=photometric,
            with_window=win == "win",
        )
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


@pytest.mark.parametrize("name", sorted(GOLDEN_DISPLAY))
def test_images_without_padding_decode_exactly_as_before(name: str) -> None:
    ds = _golden_case(name)
    display, _ = decode_display(ds)
    assert _hash(display) == GOLDEN_DISPLAY[name]
    # a padding value that no pixel holds changes nothing, on either path
    stored = ds.pixel_array
    unused = next(v for v in range(int(stored.min()) - 1, -70000, -1) if v not in stored)
    if unused < (-32768 if stored.dtype.kind == "i" else 0):
        unused = next(v for v in range(int(stored.max()) + 1, 70000) if v not in stored)
    padded = _golden_case(name)
    padded.PixelPaddingValue = unused
    np.testing.assert_array_equal(decode_display(padded)[0], display)
    np.testing.assert_array_equal(decode_pixels(padded).pixels, decode_pixels(ds).pixels)


# -- Pixel Padding Value -------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_padding_is_left_out_of_the_stretch_and_shown_black(photometric: str) -> None:
    rng = np.random.default_rng(0)
    body = rng.integers(1500, 3001, size=(120, 100)).astype(np.uint16)
    padded = np.zeros((160, 140), np.uint16)
    padded[20:140, 20:120] = body  # a collimator border of 0
    reference, _ = decode_display(_plain(body, photometric=photometric))
    display, _ = decode_display(_plain(padded, photometric=photometric, padding=0))
    np.testing.assert_array_equal(display[20:140, 20:120], reference)
    assert int(display[0, 0]) == 0 and not display[~(padded > 0)].any()
    # the float path agrees: same stretch, padding 0.0
    pixels = decode_pixels(_plain(padded, photometric=photometric, padding=0)).pixels
    expected = decode_pixels(_plain(body, photometric=photometric)).pixels
    np.testing.assert_array_equal(pixels[20:140, 20:120], expected)
    assert not pixels[padded == 0].any()
    assert int(np.abs(to_uint8(pixels).astype(int) - display.astype(int)).max()) <= 1


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("with_window", [True, False])
def test_padding_range_lookup_table_equals_the_float_path(
    photometric: str, with_window: bool
) -> None:
    """Pixel Padding Range Limit: every stored value in [value, limit] is padding; the
    lookup-table display and the float path agree (as without padding, to one grey level)."""
    image = synthetic_pixels(160, 128).astype(np.uint16) * 16  # 12-bit
    image[:, :12] = np.arange(12, dtype=np.uint16) * 5  # a ramp of padding values 0..55
    ds = make_instance(
        synthetic_pixels(160, 128),
        study=StudyIdentity.new(),
        photometric=photometric,
        with_window=with_window,
    )
    stored = image if photometric == "MONOCHROME2" else (4095 - image)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    low, high = (0, 60) if photometric == "MONOCHROME2" else (4095, 4035)
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = low, high
    display, _ = decode_display(ds)
    pixels = decode_pixels(ds).pixels
    pad = (stored >= min(low, high)) & (stored <= max(low, high))
    assert pad[:, :12].all() and not pad[:, 12:].any()
    assert not display[pad].any() and not pixels[pad].any()
    assert int(np.abs(display.astype(int) - to_uint8(pixels).astype(int)).max()) <= 1
    if not with_window:  # the anatomy alone spans the grey levels
        assert display[~pad].min() == 0 and display[~pad].max() == 255


def test_padding_on_the_float_path_of_decode_display() -> None:
    """32-bit data takes decode_display's float path: padding is handled there too."""
    body = np.random.default_rng(1).integers(1500, 3001, size=(64, 64)).astype(np.uint32)
    padded = np.zeros((80, 80), np.uint32)
    padded[8:72, 8:72] = body
    ds = _plain(padded.astype(np.uint16), padding=0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = padded.astype("<u4").tobytes()
    display, _ = decode_display(ds)
    assert display[8:72, 8:72].min() == 0 and display[8:72, 8:72].max() == 255
    assert not display[padded == 0].any()


# -- unusable windows ----------------------------------------------------------------------


def _windowed(**tags: object) -> Dataset:
    ds = make_instance(synthetic_pixels(320, 288), study=StudyIdentity.new())
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "tags",
    [
        {"WindowCenter": None},
        {"WindowWidth": None},
        {"WindowWidth": 0},
        {"WindowWidth": 0.5},
        {"WindowWidth": -10},
        {"WindowWidth": 0, "VOILUTFunction": "LINEAR_EXACT"},
        {"WindowWidth": 0, "VOILUTFunction": "SIGMOID"},
    ],
)
def test_an_unusable_window_falls_back_to_the_stretch(tags: dict[str, object]) -> None:
    stretched = _windowed()
    del stretched.WindowCenter, stretched.WindowWidth
    expected, _ = decode_display(stretched)
    display, _ = decode_display(_windowed(**tags))
    np.testing.assert_array_equal(display, expected)
    np.testing.assert_array_equal(
        decode_pixels(_windowed(**tags)).pixels, decode_pixels(stretched).pixels
    )


def test_linear_exact_accepts_any_positive_width() -> None:
    ds = _windowed(WindowWidth=0.5, VOILUTFunction="LINEAR_EXACT")
    display, _ = decode_display(ds)
    center = float(ds.WindowCenter)
    stored = ds.pixel_array.astype(float)
    assert set(np.unique(display).tolist()) <= {0, 127, 128, 255}  # a hard threshold
    assert (display[stored > center + 1] == 255).all() and (display[stored < center - 1] == 0).all()


def test_an_empty_window_in_a_file_is_screened(tmp_path: Path) -> None:
    """Through a written file and prepare_instance (the worker's entry): not 'decode failed'."""
    reference = prepare_instance(
        write_datasets([_windowed(WindowCenter=None, WindowWidth=None)], tmp_path / "a")[0],
        Settings(),
    )
    for tags in ({"WindowCenter": None}, {"WindowWidth": None}, {"WindowWidth": 0}):
        [path] = write_datasets([_windowed(**tags)], tmp_path / str(len(list(tmp_path.iterdir()))))
        prepared = prepare_instance(path, Settings())
        assert prepared.skip_reason is None, tags
        assert prepared.network_input is not None and prepared.display_image is not None
        assert reference.display_image is not None
        np.testing.assert_array_equal(prepared.display_image, reference.display_image)
