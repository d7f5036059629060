"""`serve --concurrency N`: which CPU stage queues each worker process consumes."""

from __future__ import annotations

import pytest

from workers.runner import CELERY_QUEUES, cpu_worker_queues


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 8])
def test_every_stage_queue_has_exactly_one_consumer(processes: int) -> None:
    layout = cpu_worker_queues(processes)
    consumed = [queue for queues in layout for queue in queues]
    assert sorted(consumed) == sorted(CELERY_QUEUES)  # each once: no two consumers of one
    assert len(layout) == min(processes, len(CELERY_QUEUES))


def test_two_processes_keep_the_heaviest_stage_alone() -> None:
    assert ("report",) in cpu_worker_queues(2)


def test_worker_names_match_their_log_files() -> None:
    from workers.runner import worker_name

    assert worker_name(["prepare", "report", "deliver"]) == "cpu"
    assert worker_name(["deliver", "prepare", "report"]) == "cpu"
    assert worker_name(["prepare", "deliver"]) == "prepare+deliver"
    assert worker_name(["report"]) == "report" and worker_name(["infer"]) == "infer"
