"""TensorRT backend (GPU hosts, the ``gpu`` extra): ONNX -> serialized FP16 plan, cached.

The plan is built once per (ONNX sha256, TensorRT version, GPU name, max batch) and kept in
the plan cache: a new GPU model or TensorRT release never loads a stale plan, it rebuilds.
One optimisation profile covers batch 1..max_batch. Device buffers are torch CUDA tensors
(torch is the GPU hosts' CUDA allocator; no pycuda), allocated once for the profile's
maximum; host buffers are pinned, copies asynchronous on the engine's stream, two buffer
slots used in turn, one synchronisation per batch. Written against the TensorRT 10
name-based tensor API (``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). ``tensorrt`` cannot be installed on CPU-only development machines,
so its tests skip there.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engines.runtime.base import InputSpec, check_batch, file_sha256
from screener import atomic_files

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 1 << 30


def plan_key(onnx_hash: str, trt_version: str, gpu_name: str, max_batch: int, fp16: bool) -> str:
    """File name of a cached plan: everything that makes a plan invalid is in it."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    precision = "fp16" if fp16 else "fp32"
    return f"{onnx_hash[:16]}-trt{trt_version}-{gpu}-b{max_batch}-{precision}.plan"


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise RuntimeError(
            "engine 'tensorrt' needs the gpu extra (pip install 'pacs-screener[gpu]') "
            "on a host with an NVIDIA GPU"
        ) from exc
    return trt


def build_plan(onnx_path: Path, max_batch: int, *, fp16: bool = True) -> bytes:
    """Parse the ONNX and build a serialized plan with a 1..max_batch profile."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape[1:])
        profile.set_shape(
            tensor.name, (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape)
        )
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for {onnx_path}")
    return bytes(plan)


@dataclass
class _Slot:
    """One of the two buffer sets used in turn (double buffering): pinned host memory the
    copies go through, and the event that says the slot's last batch has arrived."""

    host_in: Any  # pinned torch tensor (max_batch, *input shape)
    host_out: dict[str, Any]  # pinned torch tensors (max_batch, *output shape)
    done: Any = None  # torch.cuda.Event recorded after the slot's device-to-host copies
    rows: int = 0
    generation: int = 0  # bumped per batch: a stale PendingOutputs cannot read a newer one


class PendingOutputs:
    """A batch in flight on the engine's stream; :meth:`result` waits for it (the one
    synchronisation of the batch) and copies the outputs out of the pinned slot."""

    def __init__(self, engine: TrtEngine, slot: _Slot) -> None:
        self._engine = engine
        self._slot = slot
        self._generation = slot.generation
        self._value: dict[str, np.ndarray] | None = None

    def result(self) -> dict[str, np.ndarray]:
        if self._value is None:
            slot = self._slot
            if slot.generation != self._generation:
                raise RuntimeError("batch not collected before its buffers were reused")
            if slot.done is not None:
                slot.done.synchronize()
            self._value = {
                name: np.array(t[: slot.rows].numpy(), dtype=np.float32)
                for name, t in slot.host_out.items()
            }
            slot.done = None  # the slot may be reused
        return self._value


class _Submitted(Protocol):
    def result(self) -> dict[str, np.ndarray]: ...


def collect_in_chunks(
    submit: Callable[[np.ndarray], _Submitted],
    batch: np.ndarray,
    max_batch: int,
    output_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """``batch`` through ``submit`` in chunks of ``max_batch``, in order, with at most two
    chunks in flight (the engine's two slots): the oldest is collected before a third is
    submitted, so a slot is never reused before its outputs were read."""
    if len(batch) <= max_batch:
        return submit(batch).result()
    parts: list[dict[str, np.ndarray]] = []
    pending: deque[_Submitted] = deque()
    for start in range(0, len(batch), max_batch):
        if len(pending) == 2:
            parts.append(pending.popleft().result())
        pending.append(submit(batch[start : start + max_batch]))
    parts += [p.result() for p in pending]
    return {name: np.concatenate([p[name] for p in parts]) for name in output_names}


class TrtEngine:
    """A TensorRT execution context over a cached plan; same protocol as :class:`OrtEngine`.

    Memory is allocated once: device buffers for the profile's largest batch, and two slots
    of pinned host buffers. A batch is copied into a pinned slot, then host-to-device,
    inference and device-to-host run asynchronously on the engine's own CUDA stream, and an
    event marks its end: one synchronisation per batch (:meth:`infer_async` lets the caller
    fill the other slot meanwhile; :meth:`infer` submits and waits).
    """

    def __init__(
        self,
        onnx_path: Path,
        *,
        max_batch: int = 8,
        plan_cache_dir: Path | None = None,
        fp16: bool = True,
    ) -> None:
        trt = _import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("engine 'tensorrt' needs a CUDA GPU; none is visible")
        self._torch = torch
        self.max_batch = max_batch
        self.model_hash = file_sha256(Path(onnx_path))
        gpu_name = torch.cuda.get_device_name(0)
        cache_dir = plan_cache_dir or Path(onnx_path).parent / "plans"
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.plan_path = cache_dir / plan_key(
            self.model_hash, trt.__version__, gpu_name, max_batch, fp16
        )
        if self.plan_path.exists():
            plan = self.plan_path.read_bytes()
        else:
            log.info("building TensorRT plan %s (minutes, once per GPU/TensorRT)", self.plan_path)
            plan = build_plan(Path(onnx_path), max_batch, fp16=fp16)
            atomic_files.write_bytes(self.plan_path, plan)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise RuntimeError(f"could not deserialize {self.plan_path}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise RuntimeError(f"expected one input tensor, got {inputs}")
        shape = tuple(int(d) for d in self._engine.get_tensor_shape(inputs[0])[1:])
        self.input_spec = InputSpec(name=inputs[0], shape=shape)
        self.output_names = tuple(n for n in names if n != inputs[0])
        self.version = f"tensorrt-{trt.__version__}"
        self._stream = torch.cuda.Stream()
        self._allocate(trt, torch)

    def _torch_dtype(self, trt: Any, name: str) -> Any:
        numpy_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
        return self._torch.from_numpy(np.zeros(0, dtype=numpy_dtype)).dtype

    def _allocate(self, trt: Any, torch: Any) -> None:
        """Device buffers at the profile's maximum batch, addresses bound once; two slots
        of pinned host buffers."""
        ctx = self._context
        full = (self.max_batch, *self.input_spec.shape)
        ctx.set_input_shape(self.input_spec.name, full)
        self._device: dict[str, Any] = {
            self.input_spec.name: torch.empty(
                full, dtype=self._torch_dtype(trt, self.input_spec.name), device="cuda"
            )
        }
        for name in self.output_names:
            out_shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            self._device[name] = torch.empty(
                out_shape, dtype=self._torch_dtype(trt, name), device="cuda"
            )
        for name, tensor in self._device.items():
            ctx.set_tensor_address(name, tensor.data_ptr())
        self._slots = [
            _Slot(
                host_in=torch.empty(full, dtype=torch.float32).pin_memory(),
                host_out={
                    name: torch.empty(
                        tuple(self._device[name].shape), dtype=self._device[name].dtype
                    ).pin_memory()
                    for name in self.output_names
                },
            )
            for _ in range(2)
        ]
        self._next = 0

    def infer_async(self, batch: np.ndarray) -> PendingOutputs:
        """Submit at most ``max_batch`` images; returns at once (see :class:`PendingOutputs`).
        At most two batches may be in flight: a third waits for the oldest."""
        torch = self._torch
        batch = check_batch(self.input_spec, batch)
        rows = len(batch)
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"batch of {rows} outside the plan's profile 1..{self.max_batch}")
        slot = self._slots[self._next]
        self._next = 1 - self._next
        if slot.done is not None:  # its previous batch was never collected: wait for it
            slot.done.synchronize()
        np.copyto(slot.host_in[:rows].numpy(), batch)  # pageable -> pinned, on the CPU
        ctx = self._context
        name = self.input_spec.name
        device_in = self._device[name]
        with torch.cuda.stream(self._stream):
            device_in[:rows].copy_(slot.host_in[:rows], non_blocking=True)
            ctx.set_input_shape(name, (rows, *self.input_spec.shape))
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            for out in self.output_names:
                slot.host_out[out][:rows].copy_(self._device[out][:rows], non_blocking=True)
            slot.done = torch.cuda.Event()
            slot.done.record(self._stream)
        slot.rows = rows
        slot.generation += 1
        return PendingOutputs(self, slot)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for ``batch``; larger than ``max_batch``: in chunks, the next chunk
        submitted before the previous one is collected, never more than the two slots in
        flight (a third chunk would reuse the oldest slot before its outputs were read: the
        49 occlusion copies of one image at ``max_batch`` <= 24 failed)."""
        batch = check_batch(self.input_spec, batch)
        return collect_in_chunks(self.infer_async, batch, self.max_batch, self.output_names)
