"""Decoding (LUTs, MONOCHROME1, compressed syntaxes), tag views and pre-processing schemes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from screener.imaging.decode import NotScreenable, decode_pixels
from screener.imaging.preprocess import (
    Box,
    crop,
    dilate,
    equalize,
    lung_box,
    paste_back,
    scheme_input,
    segmenter_input,
)
from screener.imaging.views import non_chest_body_part, view_from_tags
from screener.testing.dicom_factory import StudyIdentity, corpus_image, make_instance, pick_images


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.fixture(scope="module")
def small_cxr() -> np.ndarray:
    from tests.conftest import CXR_DIR

    if not (CXR_DIR / "manifest.csv").exists():
        pytest.skip("corpus not available")
    row = pick_images(CXR_DIR, 1, label="covid", view="PA")[0]
    image = corpus_image(CXR_DIR, row["id"])
    return image[::4, ::4].copy()  # small: tests stay fast


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1],
)
def test_decode_round_trips_every_lossless_syntax(
    small_cxr: np.ndarray, tmp_path: Path, transfer_syntax: UID
) -> None:
    ds = make_instance(
        small_cxr, study=StudyIdentity.new(), bits_stored=12, transfer_syntax=transfer_syntax
    )
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    decoded = decode_pixels(pydicom.dcmread(path))
    assert decoded.pixels.shape == small_cxr.shape
    assert decoded.pixels.dtype == np.float32
    assert 0.0 <= decoded.pixels.min() and decoded.pixels.max() <= 1.0
    assert _corr(decoded.pixels, small_cxr) > 0.999


def test_monochrome1_is_inverted_to_monochrome2(small_cxr: np.ndarray) -> None:
    study = StudyIdentity.new()
    mono2 = decode_pixels(make_instance(small_cxr, study=study, photometric="MONOCHROME2"))
    mono1 = decode_pixels(make_instance(small_cxr, study=study, photometric="MONOCHROME1"))
    assert mono1.photometric == "MONOCHROME1"
    assert _corr(mono1.pixels, small_cxr) > 0.999  # bones bright again
    assert np.abs(mono1.pixels - mono2.pixels).mean() < 0.01


def test_modality_lut_and_window_are_applied(small_cxr: np.ndarray) -> None:
    ds = make_instance(small_cxr, study=StudyIdentity.new(), bits_stored=16, with_window=False)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    # A narrow window on the upper half of the (rescaled) range saturates the dark half.
    low, high = -1000 + 2 * 32768, -1000 + 2 * 65535
    ds.WindowCenter, ds.WindowWidth = (low + high) / 2, high - low
    decoded = decode_pixels(ds)
    dark = small_cxr < 100
    assert np.all(decoded.pixels[dark] == decoded.pixels.min())
    assert decoded.pixels.max() == pytest.approx(1.0)


def test_voi_lut_sequence_is_preferred() -> None:
    ds = Dataset()
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 16, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = list(range(255, -1, -1))  # an inverting LUT
    ds.VOILUTSequence = Sequence([item])
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    decoded = decode_pixels(ds)
    assert decoded.pixels[0, 0] == pytest.approx(1.0)
    assert decoded.pixels[-1, -1] == pytest.approx(0.0)


def _testdata(name: str) -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return pydicom.dcmread(path)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPGExtended.dcm",  # JPEG Extended 12-bit
        "JPEGLSNearLossless_16.dcm",
        "693_J2KI.dcm",  # JPEG 2000 lossy
    ],
)
def test_pydicom_bundled_compressed_files_decode(name: str) -> None:
    ds = _testdata(name)
    decoded = decode_pixels(ds)
    assert decoded.pixels.shape == (ds.Rows, ds.Columns)
    assert decoded.pixels.std() > 0.05


@pytest.mark.parametrize(
    ("name", "reason"),
    [("SC_rgb_rle.dcm", "colour"), ("SC_rgb_rle_2frame.dcm", "multi-frame")],
)
def test_colour_and_multiframe_are_not_screenable(name: str, reason: str) -> None:
    with pytest.raises(NotScreenable, match=reason):
        decode_pixels(_testdata(name))


def test_grayscale_multiframe_is_not_screenable(small_cxr: np.ndarray) -> None:
    ds = make_instance(small_cxr, study=StudyIdentity.new(), bits_stored=8)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(NotScreenable, match="multi-frame"):
        decode_pixels(ds)


def test_non_image_object_is_not_screenable() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    with pytest.raises(NotScreenable, match="non-image"):
        decode_pixels(ds)


def test_view_from_tags_reads_each_tag() -> None:
    ds = Dataset()
    assert view_from_tags(ds) is None
    ds.SeriesDescription = "Thorax p.a. stehend"
    assert view_from_tags(ds) == "PA"
    ds.SeriesDescription = "CHEST LATERAL"
    assert view_from_tags(ds) == "LATERAL"
    ds.SeriesDescription = "CHEST AP PORTABLE"
    assert view_from_tags(ds) == "AP"
    ds.ProtocolName = "ignored when the series description says"
    ds.PatientOrientation = ["P", "F"]
    assert view_from_tags(ds) == "LATERAL"  # orientation beats free text
    code = Dataset()
    code.CodeMeaning = "antero-posterior"
    ds.ViewCodeSequence = Sequence([code])
    assert view_from_tags(ds) == "AP"
    ds.ViewPosition = "LL"
    assert view_from_tags(ds) == "LATERAL"
    ds.ViewPosition = "pa "
    assert view_from_tags(ds) == "PA"


def test_body_part_filter() -> None:
    ds = Dataset()
    assert non_chest_body_part(ds) is None
    ds.BodyPartExamined = "CHEST"
    assert non_chest_body_part(ds) is None
    ds.BodyPartExamined = "HAND"
    assert non_chest_body_part(ds) == "HAND"


def test_equalize_flattens_histogram_and_respects_mask() -> None:
    rng = np.random.default_rng(0)
    image = (rng.beta(2, 5, size=(64, 64)) * 120).astype(np.uint8)
    out = equalize(image)
    assert out.min() == 0 and out.max() == 255
    assert abs(np.median(out) - 128) < 20
    mask = np.zeros_like(image, dtype=bool)
    mask[16:48, 16:48] = True
    masked = equalize(image, mask)
    assert masked[~mask].max() == 0
    assert masked[mask].max() == 255


def test_dilate_grows_by_two_pixels_each_side() -> None:
    mask = np.zeros((11, 11), dtype=bool)
    mask[5, 5] = True
    grown = dilate(mask, 5)
    assert grown.sum() == 25
    assert grown[3:8, 3:8].all()


def test_lung_box_is_square_around_the_mask_and_crop_pads() -> None:
    mask = np.zeros((100, 80), dtype=bool)
    mask[20:60, 10:30] = True
    box = lung_box(mask)
    assert box == Box(top=20, left=0, size=40)
    assert lung_box(np.zeros((5, 5), dtype=bool)) is None
    image = np.arange(100 * 80, dtype=np.float32).reshape(100, 80)
    patch = crop(image, Box(top=-5, left=-5, size=10))
    assert patch[:5].max() == 0 and patch[5, 5] == image[0, 0]


def _two_lungs(d: tuple[int, int, int, int] = (0, 0, 0, 0)) -> np.ndarray:
    """Two lung fields; ``d`` shifts the top, bottom, left and right edges by a few pixels."""
    top, bottom, left, right = d
    mask = np.zeros((300, 300), dtype=bool)
    mask[60 + top : 240 + bottom, 50 + left : 135] = True
    mask[60 : 240 + bottom, 165 : 250 + right] = True
    return mask


def test_the_shipped_box_rule_is_the_one_the_networks_were_measured_with() -> None:
    """min/max extents: changing it changes every crop input (a new model version)."""
    from screener.imaging.lung_box import BoxRule
    from screener.imaging.preprocess import BOX_RULE

    assert BOX_RULE == BoxRule()
    assert BoxRule().name == "minmax"


def test_an_island_far_from_the_lungs_moves_only_the_min_max_box() -> None:
    from screener.imaging.lung_box import BoxRule

    lungs = _two_lungs()
    with_island = lungs.copy()
    with_island[5:15, 280:292] = True  # a shoulder blob
    steady = BoxRule(keep=2, min_share=0.2)
    assert lung_box(with_island, steady) == lung_box(lungs, steady) == lung_box(lungs)
    assert lung_box(with_island) != lung_box(lungs)  # the old rule follows the blob
    # one merged lung field: the second component (the blob) is under min_share, ignored
    merged = lungs.copy()
    merged[150:160, 135:165] = True
    merged[5:15, 280:292] = True
    assert lung_box(merged, steady) == lung_box(lungs)


def test_edge_noise_moves_the_box_by_a_few_pixels_and_snapping_mostly_not_at_all() -> None:
    from screener.imaging.lung_box import BoxRule

    rng = np.random.default_rng(0)
    reference = {rule: lung_box(_two_lungs(), rule) for rule in (BoxRule(), BoxRule(grid=16))}
    unchanged = 0
    for _ in range(20):
        noisy = _two_lungs(tuple(int(v) for v in rng.integers(-2, 3, size=4)))  # type: ignore[arg-type]
        box, ref = lung_box(noisy), reference[BoxRule()]
        assert box is not None and ref is not None
        assert max(abs(box.top - ref.top), abs(box.left - ref.left), abs(box.size - ref.size)) <= 4
        snapped = lung_box(noisy, BoxRule(grid=16))
        assert snapped is not None and snapped.size % 16 == 0
        unchanged += snapped == reference[BoxRule(grid=16)]
    assert unchanged >= 10


def test_paste_back_inverts_the_crop_geometry() -> None:
    values = np.ones((8, 8), dtype=np.float32)
    out = paste_back(values, Box(top=10, left=20, size=30), (100, 100))
    assert out[10:40, 20:50].min() == pytest.approx(1.0)
    assert out.sum() == pytest.approx(900, rel=0.01)
    assert paste_back(values, None, (50, 70)).shape == (50, 70)


@pytest.mark.parametrize("scheme", ["raw", "crop", "segment"])
def test_scheme_inputs_have_the_network_shape(scheme: str) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=(300, 240), dtype=np.uint8)
    mask = np.zeros(image.shape, dtype=bool)
    mask[60:240, 40:200] = True
    x, box = scheme_input(image, mask, scheme)  # type: ignore[arg-type]
    assert x.shape == (1, 224, 224) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    if scheme == "raw":
        assert box is None
        np.testing.assert_array_equal(x, segmenter_input(image))
    else:
        assert box is not None and box.size == 180
    if scheme == "segment":
        assert x[0, 0, 0] == 0.0  # corner outside the dilated lungs is black
    # An empty mask falls back to the whole image.
    x_empty, box_empty = scheme_input(image, np.zeros_like(mask), scheme)  # type: ignore[arg-type]
    assert box_empty is None and x_empty.shape == (1, 224, 224)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("with_window", [True, False])
def test_lookup_table_display_equals_the_float_path(
    small_cxr: np.ndarray, photometric: str, with_window: bool
) -> None:
    from screener.imaging.decode import decode_display
    from screener.imaging.preprocess import to_uint8

    ds = make_instance(
        small_cxr,
        study=StudyIdentity.new(),
        bits_stored=12,
        photometric=photometric,
        with_window=with_window,
    )
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    display, stored_photometric = decode_display(ds)
    assert stored_photometric == photometric and display.dtype == np.uint8
    reference = to_uint8(decode_pixels(ds).pixels)
    assert int(np.abs(display.astype(int) - reference.astype(int)).max()) <= 1


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [
        ("<u2", 100, 4095),
        ("<i2", -1024, 3071),
        (">u2", 0, 65535),
        (">i2", -32768, 32767),
        ("u1", 3, 250),
        ("i1", -100, 100),
    ],
)
def test_display_lookup_reads_every_integer_layout(dtype: str, lo: int, hi: int) -> None:
    from screener.imaging.decode import _look_up

    rng = np.random.default_rng(7)
    stored = rng.integers(lo, hi + 1, size=(300, 257)).astype(dtype)
    stored[0, :2] = lo, hi  # the table's ends are used
    stored = stored[:, ::2]  # and a strided view
    lut = rng.integers(0, 256, size=hi - lo + 1).astype(np.uint8)
    expected = lut[stored.astype(np.int64) - lo]
    got = _look_up(stored, lut, lo)
    assert got.dtype == np.uint8 and got.shape == stored.shape
    np.testing.assert_array_equal(got, expected)


def test_undecodable_pixel_data_is_a_skip_not_a_crash(tmp_path: Path) -> None:
    """pydicom's JPEG-lossy.dcm has a corrupt JPEG stream: the screener records why."""
    from pydicom.data import get_testdata_file

    from screener.screening.prepare import prepare_dataset, prepare_instance
    from screener.settings import Settings

    path = get_testdata_file("JPEG-lossy.dcm", download=False)
    if path is None:
        pytest.skip("JPEG-lossy.dcm is not bundled with this pydicom")
    # An NM secondary capture: the screenability gate refuses it before any decoding.
    assert "secondary capture" in (prepare_instance(Path(path), Settings()).skip_reason or "")
    ds = pydicom.dcmread(path)
    # Made to look like a chest CR, so that it passes the gate and reaches the pixel data.
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword in ("ConversionType",):
        if keyword in ds:
            delattr(ds, keyword)
    prepared = prepare_dataset(ds, Path(path), Settings())
    assert prepared.skip_reason is not None and prepared.skip_reason.startswith("decode failed")
    assert prepared.network_input is None
    colour_file = get_testdata_file("GDCMJ2K_TextGBR.dcm", download=False)
    assert isinstance(colour_file, str)
    colour = prepare_instance(Path(colour_file), Settings())
    assert colour.skip_reason is not None


@pytest.mark.parametrize("shape", [(2048, 2048), (2500, 2048), (700, 600), (1000, 1000)])
def test_display_shrink_has_limit_size_shape_and_nearly_its_pixels(
    shape: tuple[int, int],
) -> None:
    from screener.imaging.preprocess import limit_display_size, limit_size

    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    noise = np.random.default_rng(3).normal(0, 2, shape)  # films are smooth at this scale
    film = (128 + 60 * np.sin(cols / 90) + 40 * np.cos(rows / 70) + noise).clip(0, 255)
    film = film.astype(np.uint8)
    fair = limit_size(film, 1024)
    fast = limit_display_size(film, 1024)
    assert fast.shape == fair.shape and fast.dtype == np.uint8
    diff = np.abs(fast.astype(int) - fair.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    if film.shape == fair.shape:
        assert fast is film  # small enough already: no copy
