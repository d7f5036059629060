"""numpy's BLAS held to one thread in the service's processes.

The service runs its parallelism itself: a process per stage queue, the infer consumer's
glue pool, onnxruntime's own threads. OpenBLAS (numpy's BLAS) adds a thread per core on
top, and after each product its threads spin waiting for the next one: on this 2-core
machine a 430 x 430 by 430 x 16 product in the infer glue (the CAM's lung share,
``screener.screening.cam.pasted_heat_lung_fraction``) cost 0.26-0.64 ms of process CPU
with the default threads against 0.09 ms with one (the calling thread's own CPU: 0.14-0.43
against 0.09). So long-lived processes hold BLAS to one thread; the products they make are
small enough that one thread is the fastest anyway.

Left alone where the operator chose (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` or ``BLIS_NUM_THREADS`` set), and a no-op without threadpoolctl.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

OPERATOR_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
)

_limits: object | None = None  # threadpoolctl's handle: keeps the limit for the process


def operator_chose() -> bool:
    """True when the environment already sets how many threads BLAS may use."""
    return any(os.environ.get(name) for name in OPERATOR_VARIABLES)


def single_threaded_blas() -> bool:
    """Hold every BLAS library loaded in this process to one thread, once; True when that
    is in force (also when it already was)."""
    global _limits
    if _limits is not None:
        return True
    if operator_chose():
        return False
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; an install without it runs as before
        return False
    import numpy  # noqa: F401 - load numpy's BLAS first, or there is nothing to limit yet

    _limits = threadpool_limits(limits=1, user_api="blas")
    log.debug("BLAS held to one thread")
    return True
