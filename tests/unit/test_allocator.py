"""screener.allocator: worker processes reuse freed memory instead of faulting it in again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Page faults of 20 rounds of "allocate four 8 MB arrays (a film's buffers), write them,
# free them", printed by a fresh interpreter, with or without keep_freed_memory() first.
_FAULTS = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from screener.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[2] == "keep" else False
def round():
    blocks = [np.ones(1 << 20) for _ in range(4)]  # 8 MB each
    del blocks
round()  # the first round faults whatever the settings
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS, str(REPO), mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


def test_freed_blocks_are_reused_not_faulted_in_again() -> None:
    kept, faults_kept = _faults("keep")
    _, faults_default = _faults("default")
    assert kept
    pages = (32 << 20) // 4096  # one round's blocks
    # glibc's defaults hand the blocks back and fault them in again on every round
    assert faults_default > 3 * pages, faults_default
    assert faults_kept < pages // 8, faults_kept


def test_an_operators_malloc_settings_are_left_alone() -> None:
    kept, _ = _faults("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not kept
    kept, _ = _faults("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert not kept
