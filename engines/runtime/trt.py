"""TensorRT backend (GPU hosts, the ``gpu`` extra): ONNX -> serialized FP16 plan, cached.

The plan is built once per (ONNX sha256, TensorRT version, GPU name, max batch) and kept in
the plan cache: a new GPU model or TensorRT release never loads a stale plan, it rebuilds.
One optimisation profile covers batch 1..max_batch. Device buffers are torch CUDA tensors
(torch is the GPU hosts' CUDA allocator; no pycuda). Written against the TensorRT 10
name-based tensor API (``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). ``tensorrt`` cannot be installed on CPU-only development machines,
so its tests skip there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from engines.runtime.base import InputSpec, check_batch, file_sha256

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


class TrtEngine:
    """A TensorRT execution context over a cached plan; same protocol as :class:`OrtEngine`."""

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
            tmp = self.plan_path.with_suffix(".tmp")
            tmp.write_bytes(plan)
            tmp.replace(self.plan_path)
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
        self._trt_dtypes = {n: trt.nptype(self._engine.get_tensor_dtype(n)) for n in names}
        self.version = f"tensorrt-{trt.__version__}"
        self._stream = torch.cuda.Stream()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        batch = check_batch(self.input_spec, batch)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start : start + self.max_batch]
            for name, value in self._run(torch, chunk).items():
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in parts.items()}

    def _run(self, torch: Any, chunk: np.ndarray) -> dict[str, np.ndarray]:
        ctx = self._context
        device_in = torch.from_numpy(chunk).cuda(non_blocking=False)
        ctx.set_input_shape(self.input_spec.name, tuple(device_in.shape))
        ctx.set_tensor_address(self.input_spec.name, device_in.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, dtype=self._trt_dtypes[name])).dtype
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        with torch.cuda.stream(self._stream):
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self._stream.synchronize()
        return {name: t.float().cpu().numpy() for name, t in outputs.items()}
