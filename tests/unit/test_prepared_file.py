"""The prepared-image file (screener.screening.prepared_file): every field survives the round
trip bit for bit, display=False never reads the display image's bytes, the previous
version's np.savez files still load, and a torn or hostile file is a ValueError naming it."""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from screener.imaging.preprocess import WORK_SIZE, limit_size
from screener.results import SourceImageRef
from screener.screening import prepared_file
from screener.screening.prepare import PreparedImage

NAMES = prepared_file.NAMES


def _source(tag: str = "1") -> SourceImageRef:
    return SourceImageRef(
        sop_instance_uid=f"1.2.826.0.1.{tag}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        series_instance_uid="1.2.826.0.2",
        study_instance_uid="1.2.826.0.3",
        file_path="/spool/ø/Zoë 患者.dcm",
    )


def _arrays(seed: int = 0) -> dict[str, Any]:  # Any: passed on as PreparedImage(**...)
    rng = np.random.default_rng(seed)
    network = rng.standard_normal((1, 224, 224)).astype(np.float32)
    special = [np.nan, -0.0, np.inf, np.finfo(np.float32).tiny / 2]  # subnormal last
    network.reshape(-1)[:4] = np.array(special, dtype=np.float32)
    return {
        "network_input": network,
        "work_image": rng.integers(0, 256, (512, 410), dtype=np.uint8),
        "display_image": rng.integers(0, 256, (700, 561), dtype=np.uint8),
    }


def _save(image: PreparedImage, path: Path) -> None:
    image.save(path)
    assert path.read_bytes()[: len(prepared_file.MAGIC)] == prepared_file.MAGIC


def _save_npz(image: PreparedImage, path: Path) -> None:
    """The previous version's PreparedImage.save, verbatim."""
    header = {
        "source": image.source.__dict__,
        "view_tag": image.view_tag,
        "skip_reason": image.skip_reason,
        "refused": image.refused,
        "meta": image.meta,
    }
    arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header))}
    if image.network_input is not None:
        arrays["network_input"] = image.network_input
    if image.display_image is not None:
        arrays["display_image"] = image.display_image
    if image.work_image is not None:
        arrays["work_image"] = image.work_image
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def _same_array(got: np.ndarray | None, want: np.ndarray | None) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit for bit: NaN, -0.0 and subnormals too
    assert got.flags.writeable and got.flags.c_contiguous


def _check_loaded(loaded: PreparedImage, image: PreparedImage, *, display: bool) -> None:
    assert loaded.source == image.source
    assert loaded.view_tag == image.view_tag and loaded.skip_reason == image.skip_reason
    assert loaded.refused == image.refused and loaded.meta == image.meta
    _same_array(loaded.network_input, image.network_input)
    _same_array(loaded.display_image, image.display_image if display else None)
    work = image.work_image
    if work is None and image.display_image is not None:  # the older-version fallback
        work = limit_size(image.display_image, WORK_SIZE)
    _same_array(loaded.work_image, work)


META = {"modality": "CR", "sex": "F", "body_part": "THORAX", "note": "Zoë 胸部 \udcff", "rows": 3}

IMAGES = {
    "skipped": PreparedImage(source=_source(), skip_reason="decode failed: not DICOM (x)"),
    "refused": PreparedImage(
        source=_source(), skip_reason="not a radiograph: modality CT", refused=True, meta=META
    ),
    **{
        "+".join(subset) or "no-arrays": PreparedImage(
            source=_source(), view_tag="PA", meta=META, **{n: _arrays()[n] for n in subset}
        )
        for k in range(len(NAMES) + 1)
        for subset in itertools.combinations(NAMES, k)
    },
}


@pytest.mark.parametrize("save", [_save, _save_npz], ids=["new", "npz"])
@pytest.mark.parametrize("display", [True, False])
@pytest.mark.parametrize("case", sorted(IMAGES))
def test_every_field_combination_round_trips(
    tmp_path: Path, case: str, display: bool, save: Any
) -> None:
    image = IMAGES[case]
    path = tmp_path / "0000.prepared"
    save(image, path)
    loaded = PreparedImage.load(path, display=display)
    _check_loaded(loaded, image, display=display)


def test_arrays_are_writeable_and_own_their_memory(tmp_path: Path) -> None:
    image = PreparedImage(source=_source(), **_arrays())
    path = tmp_path / "0000.prepared"
    _save(image, path)
    loaded = PreparedImage.load(path)
    for name in NAMES:
        array = getattr(loaded, name)
        assert array.flags.owndata and array.base is None
        array[...] = 7  # the consumers modify them in place
    again = PreparedImage.load(path)
    _check_loaded(again, image, display=True)


def test_unusual_input_layouts_are_stored_as_little_endian_contiguous(tmp_path: Path) -> None:
    arrays = _arrays()
    big_endian = arrays["network_input"].astype(">f4")
    transposed = np.ascontiguousarray(arrays["work_image"].T).T  # F-ordered view
    image = PreparedImage(source=_source(), network_input=big_endian, work_image=transposed)
    path = tmp_path / "0000.prepared"
    _save(image, path)
    loaded = PreparedImage.load(path)
    assert loaded.network_input is not None and loaded.network_input.dtype.str == "<f4"
    assert loaded.network_input.tobytes() == arrays["network_input"].tobytes()
    _same_array(loaded.work_image, arrays["work_image"])


def test_every_array_starts_aligned(tmp_path: Path) -> None:
    path = tmp_path / "0000.prepared"
    _save(PreparedImage(source=_source(), meta=META, **_arrays()), path)
    raw = path.read_bytes()
    _, _, length = struct.unpack_from("<8sII", raw)
    header = json.loads(raw[16 : 16 + length])
    start = -(-(16 + length) // prepared_file.ALIGN) * prepared_file.ALIGN
    assert [e["name"] for e in header["arrays"]] == list(NAMES)  # display last
    for entry in header["arrays"]:
        assert (start + entry["offset"]) % prepared_file.ALIGN == 0
    last = header["arrays"][-1]
    assert len(raw) == start + last["offset"] + last["nbytes"]


def test_display_false_never_reads_the_display_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = PreparedImage(source=_source(), view_tag="PA", meta=META, **_arrays())
    path = tmp_path / "0000.prepared"
    _save(image, path)
    assert image.display_image is not None
    size = path.stat().st_size
    display = range(size - image.display_image.nbytes, size)  # the last member
    # overwrite the display bytes in place: a read of them would show in the result
    with path.open("r+b") as fh:
        fh.seek(display.start)
        fh.write(bytes(len(display)))
    spans: list[range] = []
    real = prepared_file._read_exact

    def spy(fh: Any, view: memoryview, where: Path) -> None:
        spans.append(range(fh.tell(), fh.tell() + len(view)))
        real(fh, view, where)

    monkeypatch.setattr(prepared_file, "_read_exact", spy)
    loaded = PreparedImage.load(path, display=False)
    _check_loaded(loaded, image, display=False)
    assert len(spans) == 2 and all(s.stop <= display.start for s in spans)
    spans.clear()
    shown = PreparedImage.load(path, display=True).display_image
    assert shown is not None and not shown.any()  # the overwritten bytes, now read
    assert spans[-1] == display


def test_a_file_cut_inside_a_skipped_member_is_refused_too(tmp_path: Path) -> None:
    """A torn file fails in infer already (back to prepare, which rewrites it), not only in
    the report stage, which would send the job back to infer and fail again."""
    image = PreparedImage(source=_source(), view_tag="PA", meta=META, **_arrays())
    path = tmp_path / "0000.prepared"
    _save(image, path)
    os.truncate(path, path.stat().st_size - 1)
    for display in (False, True):
        with pytest.raises(ValueError, match=str(path)):
            PreparedImage.load(path, display=display)


def test_old_npz_without_a_work_image_still_gets_one(tmp_path: Path) -> None:
    arrays = _arrays()
    image = PreparedImage(
        source=_source(),
        network_input=arrays["network_input"],
        display_image=np.random.default_rng(1).integers(0, 256, (1500, 1200), dtype=np.uint8),
    )
    path = tmp_path / "0000.prepared"
    _save_npz(image, path)
    loaded = PreparedImage.load(path, display=False)
    assert loaded.display_image is None and loaded.work_image is not None
    assert max(loaded.work_image.shape) == WORK_SIZE
    _check_loaded(loaded, image, display=False)


def test_an_npz_holding_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "0000.prepared"
    with path.open("wb") as fh:
        np.savez(fh, header=np.array(json.dumps({})), network_input=np.array([{}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        PreparedImage.load(path)


def _valid_file(tmp_path: Path) -> tuple[Path, dict[str, Any], bytes]:
    """A valid file, its parsed header and its data bytes (after the padded header)."""
    path = tmp_path / "0000.prepared"
    _save(PreparedImage(source=_source(), view_tag="PA", meta=META, **_arrays()), path)
    raw = path.read_bytes()
    _, _, length = struct.unpack_from("<8sII", raw)
    start = -(-(16 + length) // prepared_file.ALIGN) * prepared_file.ALIGN
    return path, json.loads(raw[16 : 16 + length]), raw[start:]


def _forge(path: Path, header: bytes, data: bytes, *, version: int = 1) -> None:
    head = struct.pack("<8sII", prepared_file.MAGIC, version, len(header)) + header
    pad = bytes(-len(head) % prepared_file.ALIGN)
    path.write_bytes(head + pad + data)


def _with_entry(header: dict[str, Any], index: int, **change: Any) -> bytes:
    entries = [dict(e) for e in header["arrays"]]
    entries[index].update(change)
    return json.dumps({**header, "arrays": entries}).encode()


HOSTILE: dict[str, Any] = {
    "offset past the end": lambda h, d: _with_entry(h, 0, offset=len(d)),
    "length past the end": lambda h, d: _with_entry(h, 2, nbytes=len(d) * 2),
    "negative offset": lambda h, d: _with_entry(h, 0, offset=-64),
    "float offset": lambda h, d: _with_entry(h, 0, offset=0.0),
    "unknown dtype": lambda h, d: _with_entry(h, 0, dtype="<f8"),
    "object dtype": lambda h, d: _with_entry(h, 1, dtype="|O"),
    "big-endian dtype": lambda h, d: _with_entry(h, 0, dtype=">f4"),
    "shape mismatch": lambda h, d: _with_entry(h, 1, shape=[512, 411]),
    "huge shape": lambda h, d: _with_entry(h, 1, shape=[1 << 40, 1 << 40]),
    "negative shape": lambda h, d: _with_entry(h, 1, shape=[-512, -410]),
    "boolean shape": lambda h, d: _with_entry(h, 1, shape=[True, 1], nbytes=1),
    "too many dimensions": lambda h, d: _with_entry(h, 1, shape=[1] * 40, nbytes=1),
    "unknown array": lambda h, d: _with_entry(h, 1, name="__reduce__"),
    "array listed twice": lambda h, d: _with_entry(h, 1, name="network_input"),
    "entry not an object": lambda h, d: json.dumps({**h, "arrays": [1]}).encode(),
    "no array list": lambda h, d: json.dumps({"source": h["source"]}).encode(),
    "header not an object": lambda h, d: b"[1, 2]",
    "header not JSON": lambda h, d: b"{nope",
    "header not UTF-8": lambda h, d: b'{"\xff": 1}',
    "header nested too deeply": lambda h, d: b"[" * 200_000,
    "header missing a field": lambda h, d: json.dumps(
        {k: v for k, v in h.items() if k != "source"}
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_header_is_a_value_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path, header, data = _valid_file(tmp_path)
    _forge(path, HOSTILE[case](header, data), data)
    with pytest.raises(ValueError, match=str(path)):
        PreparedImage.load(path)


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "half a prefix",
        "bad magic",
        "unknown version",
        "header length huge",
        "header length past the end",
        "cut inside the header",
        "cut inside the first array",
    ],
)
def test_a_torn_or_foreign_file_is_a_value_error_naming_the_file(
    tmp_path: Path, damage: str
) -> None:
    path, header, data = _valid_file(tmp_path)
    raw = path.read_bytes()
    _, _, length = struct.unpack_from("<8sII", raw)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "half a prefix":
        path.write_bytes(raw[:10])
    elif damage == "bad magic":
        path.write_bytes(b"\x93NUMPY\x01\x00" + raw[8:])
    elif damage == "unknown version":
        _forge(path, json.dumps(header).encode(), data, version=2)
    elif damage == "header length huge":
        path.write_bytes(raw[:12] + struct.pack("<I", 0xFFFFFFFF) + raw[16:])
    elif damage == "header length past the end":
        path.write_bytes(raw[:12] + struct.pack("<I", len(raw)) + raw[16:])
    elif damage == "cut inside the header":
        path.write_bytes(raw[: 16 + length // 2])
    else:
        path.write_bytes(raw[: len(raw) - len(data) + 1000])
    with pytest.raises(ValueError, match=str(path)):
        PreparedImage.load(path)


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path: Path) -> None:
    meta = {"note": "x" * (3 * prepared_file._FIRST_READ)}
    image = PreparedImage(source=_source(), meta=meta, **_arrays())
    path = tmp_path / "0000.prepared"
    _save(image, path)
    _check_loaded(PreparedImage.load(path, display=False), image, display=False)


def test_the_writer_refuses_what_the_reader_would(tmp_path: Path) -> None:
    path = tmp_path / "0000.prepared"
    with pytest.raises(TypeError, match="float64"):
        PreparedImage(source=_source(), network_input=np.zeros((1, 4, 4))).save(path)
    with pytest.raises(ValueError, match="not part of the format"):
        prepared_file.write(path, {}, {"lung": np.zeros(3, np.uint8)})
    with pytest.raises(ValueError, match="over"):
        PreparedImage(source=_source(), meta={"x": "y" * prepared_file.MAX_HEADER}).save(path)


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write part of the buffers; the rest must follow, in order."""
    real = os.writev
    calls = []

    def trickle(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        first = next(b for b in buffers if len(b))
        return real(fd, [first[:1000]])

    monkeypatch.setattr(os, "writev", trickle)
    image = PreparedImage(source=_source(), meta=META, **_arrays())
    path = tmp_path / "0000.prepared"
    _save(image, path)
    monkeypatch.undo()
    assert len(calls) > 100
    _check_loaded(PreparedImage.load(path), image, display=True)


def test_read_array_reads_one_member_of_either_format(tmp_path: Path) -> None:
    image = PreparedImage(source=_source(), **_arrays())
    for save in (_save, _save_npz):
        path = tmp_path / f"{save.__name__}.prepared"
        save(image, path)
        _same_array(prepared_file.read_array(path, "display_image"), image.display_image)
    skipped = tmp_path / "skipped.prepared"
    _save(PreparedImage(source=_source(), skip_reason="x"), skipped)
    assert prepared_file.read_array(skipped, "display_image") is None


def test_a_torn_npz_file_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    """A previous-format file cut anywhere (BadZipFile, EOFError, KeyError, zlib and JSON
    errors inside np.load) is this module's ValueError, which the report stage catches."""
    whole = tmp_path / "whole.prepared"
    _save_npz(PreparedImage(source=_source(), view_tag="PA", meta=META, **_arrays()), whole)
    raw = whole.read_bytes()
    path = tmp_path / "0000.prepared"
    cuts = sorted({*range(4, 400, 13), *range(4, len(raw), max(1, len(raw) // 150))})
    for cut in cuts:
        path.write_bytes(raw[:cut])
        for read in (
            lambda: prepared_file.read(path),
            lambda: prepared_file.read_array(path, "display_image"),
            lambda: PreparedImage.load(path, display=False),
        ):
            with pytest.raises(ValueError, match="not a valid prepared file") as caught:
                read()
            assert str(path) in str(caught.value), cut
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a valid prepared file"):
        prepared_file.read_array(path, "display_image")
