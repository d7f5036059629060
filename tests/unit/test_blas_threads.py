"""numpy's BLAS held to one thread (screener.blas_threads), in a fresh process each time:
the limit is process-wide and must not leak into the test run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import numpy
from threadpoolctl import threadpool_info
from screener.blas_threads import single_threaded_blas
before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
applied = single_threaded_blas()
again = single_threaded_blas()
after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"before": before, "applied": applied, "again": again, "after": after}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_blas_is_held_to_one_thread() -> None:
    got = _probe()
    before, after = got["before"], got["after"]
    assert isinstance(before, list) and isinstance(after, list)
    assert after, "numpy's BLAS was not found"
    if all(n == 1 for n in before):
        pytest.skip("one CPU: BLAS already runs on one thread, nothing to observe")
    assert got["applied"] is True and got["again"] is True
    assert all(n == 1 for n in after)


def test_an_operator_setting_is_left_alone() -> None:
    got = _probe(OPENBLAS_NUM_THREADS="2")
    assert got["applied"] is False
    assert got["after"] == got["before"]
