#!/bin/sh
# GPU worker entry point: check TensorRT, CUDA and the GPU (screener-gpu-check says what
# is missing and exits 1), then run screener with the container's command.
# SCREENER_SKIP_GPU_CHECK=1 skips the check (e.g. `screener db upgrade` on a CPU host).
set -eu
if [ "${SCREENER_SKIP_GPU_CHECK:-0}" != 1 ]; then
  python3 /usr/local/bin/screener-gpu-check
fi
exec screener "$@"
