"""screener.startup_heap: the start-up heap frozen, later garbage still collected."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap


def test_frozen_heap_stays_and_new_cycles_are_still_collected() -> None:
    # in a child: freezing is for the lifetime of a process, not for the test runner's
    script = textwrap.dedent(
        """
        import gc, weakref
        from screener.startup_heap import freeze_startup_heap

        class Node:
            pass

        before = Node(); before.self = before  # alive at start-up: frozen, kept
        frozen = freeze_startup_heap(["screener.reports.writer", "no.such.module"])
        assert frozen > 10_000 and abs(gc.get_freeze_count() - frozen) < 100
        assert "screener.reports.writer" in __import__("sys").modules
        later = Node(); later.self = later  # garbage made after start-up
        ref = weakref.ref(later)
        del later
        gc.collect()
        assert ref() is None, "a cycle made after the freeze was not collected"
        print("ok", frozen)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ")
    assert gc.get_freeze_count() == 0  # the test runner itself is untouched


def test_frozen_heap_unfreezes_after_the_run() -> None:
    from screener.startup_heap import frozen_heap

    assert gc.get_freeze_count() == 0
    with frozen_heap() as frozen:
        assert frozen > 0 and gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0  # a test runner that invokes `screen` is left as it was
