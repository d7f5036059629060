"""The start-up heap of a long-lived service process, frozen out of the garbage collector.

A worker imports pydicom, highdicom, SQLAlchemy, Celery and numpy, and the infer worker its
models: some 100,000 objects that live as long as the process. Python's full (oldest
generation) collections walk every one of them each time; in the report worker they were
~12% of its CPU, 4-6% in the others (py-spy --native, ``benchmarks/pipeline.py --layout
split``). :func:`freeze_startup_heap` runs once, after start-up and the stage's imports:
what exists then is moved to the permanent generation (never scanned, never freed: it
would have lived anyway). Garbage made later is collected as before.
"""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# What the CPU stages import on their first job (lazily, to keep the CLI quick to start).
STAGE_MODULES: tuple[str, ...] = (
    "screener.screening.prepare",
    "screener.screening.study_result",
    "screener.reports.writer",
    "screener.delivery",
    "screener.dicom.sender",
)


def freeze_startup_heap(preload: Iterable[str] = ()) -> int:
    """Import ``preload``, collect once, freeze what is left; returns the frozen count."""
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part (e.g. a stage this install lacks)
            log.debug("not preloaded: %s", name, exc_info=True)
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("froze %d start-up objects out of the garbage collector", frozen)
    return frozen


def settle_worker_process(preload: Iterable[str] = ()) -> None:
    """What a worker process does once started: :func:`freeze_startup_heap`, its
    allocator keeps freed memory for the next job (:mod:`screener.allocator`), and numpy's
    BLAS runs on the calling thread only (:mod:`screener.blas_threads`)."""
    from screener.allocator import keep_freed_memory
    from screener.blas_threads import single_threaded_blas

    freeze_startup_heap(preload)
    keep_freed_memory()
    single_threaded_blas()


@contextmanager
def frozen_heap(preload: Iterable[str] = ()) -> Iterator[int]:
    """:func:`freeze_startup_heap` for one long run inside a process that goes on (an
    offline ``screen`` run, also when a test invokes it): unfrozen again on exit, so what
    was frozen can be collected once the run no longer holds it."""
    frozen = freeze_startup_heap(preload)
    try:
        yield frozen
    finally:
        gc.unfreeze()
