#!/usr/bin/env python3
"""Start-up check of the GPU worker image: TensorRT, torch with CUDA, and a visible GPU.

Why: without it a missing driver or toolkit shows up as an import error deep inside
the first batch. This names what is missing and how to fix it, then exits 1.
Prints one line per check; exit 0 when all pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def check() -> list[str]:
    """The names of what is missing, with the fix; empty when the GPU path can run."""
    missing: list[str] = []
    try:
        import tensorrt

        print(f"gpu-check: TensorRT {tensorrt.__version__}")
    except Exception as exc:  # ImportError, or libnvinfer failing to load
        missing.append(
            f"TensorRT Python bindings ({exc}); build the image on NVIDIA's TensorRT base"
        )
    try:
        import torch
    except Exception as exc:
        missing.append(f"torch ({exc}); engines/runtime/trt.py needs a CUDA build of torch")
        return missing
    cuda = torch.version.cuda
    if not cuda:
        missing.append(f"CUDA support in torch (torch {torch.__version__} is a CPU-only build)")
        return missing
    print(f"gpu-check: torch {torch.__version__}, built for CUDA {cuda}")
    if not torch.cuda.is_available():
        smi = shutil.which("nvidia-smi")
        hint = (
            "no NVIDIA driver visible in the container: install the NVIDIA container toolkit "
            "on the host and reserve a GPU (compose deploy.resources...devices, or --gpus all)"
        )
        if smi:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            hint += f"; nvidia-smi -L says: {(done.stdout or done.stderr).strip()[:200]}"
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            hint += "; CUDA_VISIBLE_DEVICES is empty"
        missing.append(f"a CUDA GPU ({hint})")
        return missing
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        print(f"gpu-check: GPU {index} {name}, {free / 2**30:.1f}/{total / 2**30:.1f} GiB free")
    return missing


def main() -> None:
    missing = check()
    for item in missing:
        print(f"gpu-check: MISSING {item}", file=sys.stderr)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
