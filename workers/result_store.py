"""Per-job files in the spool between stages: prepared tensors and image results.

``prepare`` writes one file per instance with ``PreparedImage.save``; ``infer`` writes
the image results (scores, view, CAM, lung mask, display image) as JSON + NPZ so the
``report`` stage, possibly on another machine sharing the spool, can render the SR and
heatmaps without re-running the models. Every write is atomic (temp file + rename), so a
worker killed mid-write leaves either the old file or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from screener.results import ImageResult, ModelInfo, SourceImageRef
from screener.settings import Settings

_ARRAY_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ImageResult)
    if f.name in ("cam", "lung_mask", "display_image")
)


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.tensor_dir / f"job-{job_id}"


def prepared_dir(settings: Settings, job_id: int) -> Path:
    return job_dir(settings, job_id) / "prepared"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_results(
    settings: Settings, job_id: int, results: list[ImageResult], model: ModelInfo
) -> Path:
    """Write the image results of one job; returns the JSON file."""
    directory = job_dir(settings, job_id)
    directory.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for index, result in enumerate(results):
        record: dict[str, Any] = {}
        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            if f.name in _ARRAY_FIELDS:
                if value is not None:
                    arrays[f"{index}:{f.name}"] = np.asarray(value)
            elif f.name == "source":
                record["source"] = dataclasses.asdict(value)
            else:
                record[f.name] = value
        records.append(record)
    npz_tmp = directory / f".arrays.{os.getpid()}.tmp.npz"
    np.savez_compressed(npz_tmp, **arrays)  # type: ignore[arg-type]
    os.replace(npz_tmp, directory / "arrays.npz")
    payload = {"model": dataclasses.asdict(model), "images": records}
    path = directory / "results.json"
    _atomic_write_bytes(path, json.dumps(payload, default=float).encode())
    return path


def load_results(settings: Settings, job_id: int) -> tuple[list[ImageResult], ModelInfo]:
    directory = job_dir(settings, job_id)
    payload = json.loads((directory / "results.json").read_text())
    with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    known = {f.name for f in dataclasses.fields(ImageResult)}
    results: list[ImageResult] = []
    for index, record in enumerate(payload["images"]):
        fields = {k: v for k, v in record.items() if k in known and k != "source"}
        for name in _ARRAY_FIELDS:
            fields[name] = arrays.get(f"{index}:{name}")
        results.append(ImageResult(source=SourceImageRef(**record["source"]), **fields))
    return results, ModelInfo(**payload["model"])


def remove_job_files(settings: Settings, job_id: int) -> None:
    """Free the spool once a job is reported (its results are in the DB and the outbox)."""
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
