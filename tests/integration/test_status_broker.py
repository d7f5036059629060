"""`screener status` against a real Redis broker: one that answers needs no attention."""

from __future__ import annotations

import json

from screener.settings import Settings
from tests.unit.test_ops_tables import run
from tests.workers_support import redis_url


def test_status_says_a_reachable_broker_answers(settings: Settings) -> None:
    url = redis_url("tasks")  # only connected to: nothing is read, written or flushed
    done = run(settings, "status", "--check", broker_url=url)
    assert done.returncode == 0, done.stderr
    listed = run(settings, "status", "--json", broker_url=url)
    assert json.loads(listed.stdout)["broker"] == "answers"
    assert "broker" in run(settings, "status", broker_url=url).stdout
