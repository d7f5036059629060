"""The engine protocol shared by onnxruntime, TensorRT and torch backends.

An engine wraps ONE exported model (an ONNX file is the unit of exchange): it takes a batch
shaped like :class:`InputSpec` and returns its named outputs as numpy arrays. Backends are
chosen by ``settings.model.engine``; the pipeline never imports a backend directly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """One named float32 input with a dynamic batch axis: ``(N, *shape)``."""

    name: str
    shape: tuple[int, ...]  # without the batch axis, e.g. (1, 224, 224)
    dtype: str = "float32"


@runtime_checkable
class Engine(Protocol):
    input_spec: InputSpec
    output_names: tuple[str, ...]
    version: str  # backend name + library version, e.g. "onnxruntime-1.31.0"
    model_hash: str  # sha256 of the ONNX file the engine was built from

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def file_sha256(path: Path) -> str:
    """SHA-256 of the file at ``path`` now. Cached per (path, inode, size, mtime): a file
    replaced under the same name (an export, a swapped copy) is hashed again, where a cache
    keyed by the path alone answered the old file's digest for the life of the process."""
    stat = Path(path).stat()
    return _sha256_of(Path(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_of(path: Path, device: int, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_batch(spec: InputSpec, batch: np.ndarray) -> np.ndarray:
    """Validate shape and make the batch contiguous float32 (what every backend wants)."""
    if batch.ndim != len(spec.shape) + 1 or tuple(batch.shape[1:]) != spec.shape:
        raise ValueError(f"{spec.name}: expected (N, {spec.shape}), got {batch.shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def load_engine(
    backend: str,
    onnx_path: Path,
    *,
    intra_op_threads: int = 1,
    max_batch: int = 8,
    plan_cache_dir: Path | None = None,
) -> Engine:
    """Build the engine named by ``backend`` (``onnxruntime`` | ``tensorrt`` | ``torch``)."""
    if backend == "onnxruntime":
        from engines.runtime.ort import OrtEngine

        return OrtEngine(onnx_path, intra_op_threads=intra_op_threads)
    if backend == "tensorrt":
        from engines.runtime.trt import TrtEngine

        return TrtEngine(onnx_path, max_batch=max_batch, plan_cache_dir=plan_cache_dir)
    if backend == "torch":
        from engines.runtime.torch_engine import TorchEngine

        return TorchEngine.from_onnx_sidecar(onnx_path, intra_op_threads=intra_op_threads)
    raise ValueError(f"unknown engine backend {backend!r}")
