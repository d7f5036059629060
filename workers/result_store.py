"""What passes between stages: prepared inputs in the spool, image results in the database.

``prepare`` writes one file per instance in the spool (``PreparedImage.save``: network
input, working image, display image). ``infer`` encodes, per job, only what the report
stage needs, at the networks' grid (:class:`screener.results.ResultGrid`: lung probability
as uint8, COVID heat as float16, the crop square): raw bytes behind a JSON header, no
compression, ~50 kB per image. They go into ``infer_results`` in the transaction that
moves the job to ``inferred`` (:func:`insert_results`): results and state commit together,
with the batch's one commit instead of a file and two fsyncs per job. The report stage,
possibly on another machine, reads them (:func:`load_results`), brings the maps to the
display image that ``prepare`` wrote (:func:`screener.screening.cam.expand_to_display`) and
deletes the row in the transaction that moves the job on (:func:`delete_results`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from screener.db.models import InferResult, table_of, utcnow
from screener.db.session import get_engine
from screener.results import ImageResult, ModelInfo, ResultGrid, SourceImageRef, ThresholdInfo
from screener.screening import prepared_file
from screener.settings import Settings

_RESULTS = table_of(InferResult)


def _upsert(dialect_insert: Any) -> Any:
    """INSERT ... ON CONFLICT (job_id) DO UPDATE: a job inferred again (a retried failure)
    replaces its earlier results in the same statement."""
    statement = dialect_insert(_RESULTS)
    return statement.on_conflict_do_update(
        index_elements=[_RESULTS.c.job_id],
        set_={"payload": statement.excluded.payload, "written_at": statement.excluded.written_at},
    )


# built once: per batch the statements only take their rows
_UPSERT = {"sqlite": _upsert(sqlite.insert), "postgresql": _upsert(postgresql.insert)}
_DELETE = delete(_RESULTS).where(_RESULTS.c.job_id.in_(bindparam("job_ids", expanding=True)))
_SELECT = select(_RESULTS.c.payload).where(_RESULTS.c.job_id == bindparam("job_id"))
MAGIC = b"PSRES\x00\x01\x00"  # format 1: magic, u32 header length, JSON header, raw arrays
_NOT_STORED = {"source", "cam", "lung_mask", "display_image", "cam_box", "grid"}


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.tensor_dir / f"job-{job_id}"


def prepared_dir(settings: Settings, job_id: int) -> Path:
    return job_dir(settings, job_id) / "prepared"


def _array_entry(array: np.ndarray, offset: int) -> dict[str, Any]:
    return {"offset": offset, "dtype": array.dtype.str, "shape": list(array.shape)}


class StoredResults(NamedTuple):
    """One job's results as report reads them."""

    images: list[ImageResult]
    model: ModelInfo
    threshold: ThresholdInfo | None  # what infer applied (None: written by an older version)


def encode_results(
    results: list[ImageResult],
    model: ModelInfo,
    prepared_files: list[str],
    threshold: ThresholdInfo | None = None,
) -> bytes:
    """One job's results (``prepared_files``: each image's prepared file name, where report
    finds its display image; ``threshold``: the one infer applied, which report applies to
    the study): header, then each image's grid arrays."""
    records: list[dict[str, Any]] = []
    blobs: list[memoryview] = []
    offset = 0
    for result, prepared in zip(results, prepared_files, strict=True):
        record = {
            f.name: getattr(result, f.name)
            for f in dataclasses.fields(result)
            if f.name not in _NOT_STORED
        }
        record["source"] = dataclasses.asdict(result.source)
        record["prepared"] = prepared
        grid = result.grid
        if grid is not None:
            entry: dict[str, Any] = {"work_shape": list(grid.work_shape), "box": grid.box}
            for name in ("lung", "cam"):
                array = getattr(grid, name)
                if array is not None:
                    array = np.ascontiguousarray(array)
                    entry[name] = _array_entry(array, offset)
                    blobs.append(array.reshape(-1).view(np.uint8).data)
                    offset += array.nbytes
            record["grid"] = entry
        records.append(record)
    head: dict[str, Any] = {"model": dataclasses.asdict(model), "images": records}
    if threshold is not None:
        head["threshold"] = dataclasses.asdict(threshold)
    header = json.dumps(head).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blobs])


def insert_results(conn: Connection, payloads: dict[int, bytes]) -> None:
    """Store jobs' encoded results (:func:`encode_results`) inside the caller's transaction,
    replacing what an earlier run of infer left for the same job."""
    if not payloads:
        return
    now = utcnow()
    conn.execute(
        _UPSERT[conn.dialect.name],
        [{"job_id": j, "written_at": now, "payload": p} for j, p in payloads.items()],
    )


def delete_results(conn: Connection | Session, job_ids: list[int]) -> None:
    """Drop jobs' results inside the caller's transaction (the job has moved past report)."""
    if job_ids:
        conn.execute(_DELETE, {"job_ids": job_ids})


def _grid(entry: dict[str, Any], data: memoryview) -> ResultGrid:
    arrays: dict[str, np.ndarray | None] = {}
    for name in ("lung", "cam"):
        spec = entry.get(name)
        if spec is None:
            arrays[name] = None
            continue
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"]))
        arrays[name] = np.frombuffer(
            data, dtype=dtype, count=count, offset=int(spec["offset"])
        ).reshape(spec["shape"])
    box = entry.get("box")
    lung = arrays["lung"]
    assert lung is not None
    return ResultGrid(
        lung=lung,
        work_shape=(int(entry["work_shape"][0]), int(entry["work_shape"][1])),
        cam=arrays["cam"],
        box=None if box is None else (int(box[0]), int(box[1]), int(box[2])),
    )


def decode_results(raw: bytes) -> tuple[StoredResults, list[str]]:
    """Results at the grid (no display arrays) with their model and threshold, and their
    prepared file names."""
    if raw[: len(MAGIC)] != MAGIC:
        raise ValueError("not a results file of this format")
    (length,) = struct.unpack_from("<I", raw, len(MAGIC))
    start = len(MAGIC) + 4
    payload = json.loads(raw[start : start + length])
    data = memoryview(raw)[start + length :]
    known = {f.name for f in dataclasses.fields(ImageResult)} - _NOT_STORED
    results: list[ImageResult] = []
    prepared: list[str] = []
    for record in payload["images"]:
        fields = {k: v for k, v in record.items() if k in known}
        grid = None if record.get("grid") is None else _grid(record["grid"], data)
        results.append(ImageResult(source=SourceImageRef(**record["source"]), grid=grid, **fields))
        prepared.append(record["prepared"])
    threshold = payload.get("threshold")
    stored = StoredResults(
        results,
        ModelInfo(**payload["model"]),
        None if threshold is None else ThresholdInfo(**threshold),
    )
    return stored, prepared


def read_display_image(path: Path) -> np.ndarray | None:
    """The display image prepare wrote beside the network inputs (only that member)."""
    return prepared_file.read_array(path, "display_image")


def load_results(settings: Settings, job_id: int) -> StoredResults:
    """The job's image results with their display image and crop box, as the reports draw
    them: the heatmap maps the CAM and the lungs from the networks' grid itself, so no
    display-size CAM or mask is made here (the parametric map, off by default, makes its
    CAM when it is built: ``screener.reports.writer.build_image_objects``).

    Raises LookupError when infer left no results for the job (a lost row, or a job
    inferred by a version that wrote them to a file)."""
    from screener.screening.cam import attach_display

    with get_engine(settings.database_url).connect() as conn:
        payload = conn.execute(_SELECT, {"job_id": job_id}).scalar_one_or_none()
    if payload is None:
        raise LookupError(f"no infer results stored for job {job_id}")
    stored, prepared = decode_results(bytes(payload))
    for result, name in zip(stored.images, prepared, strict=True):
        if result.grid is not None:
            display = read_display_image(prepared_dir(settings, job_id) / name)
            attach_display(result, display)
    return stored


def remove_job_files(settings: Settings, job_id: int) -> None:
    """Free the spool once a job is reported (its outputs are in the DB and the outbox)."""
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
