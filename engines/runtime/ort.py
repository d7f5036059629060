"""onnxruntime CPU backend: the embedded default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.runtime.base import InputSpec, check_batch, file_sha256


class OrtEngine:
    """One ONNX model in an onnxruntime session on the CPU.

    ``intra_op_threads``: on a small shared machine one thread per process measured best
    when other work runs beside it; 0 lets onnxruntime use every core.
    """

    def __init__(self, onnx_path: Path, *, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        (inp,) = self.session.get_inputs()
        self.input_spec = InputSpec(name=inp.name, shape=tuple(int(d) for d in inp.shape[1:]))
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.version = f"onnxruntime-{ort.__version__}"
        self.model_hash = file_sha256(Path(onnx_path))

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_batch(self.input_spec, batch)
        outputs = self.session.run(list(self.output_names), {self.input_spec.name: batch})
        return dict(zip(self.output_names, outputs, strict=True))
