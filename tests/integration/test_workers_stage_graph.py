"""The stage graph, the job state machine on it, and the dispatcher on a real Redis broker
(both databases): when a stage commits, the job is sent to the next stage at once."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis

from screener.db.models import JobState, ScreeningJob
from screener.db.session import session_scope
from screener.settings import Settings
from tests.workers_support import fresh_redis, make_job, redis_url
from workers import jobstate
from workers.celery_app import QUEUES, TASK_FOR_QUEUE, create_app
from workers.dispatch import Dispatcher
from workers.stage_graph import (
    FIRST_STAGE,
    GRAPH,
    STAGES,
    next_stage,
    previous_stage,
    stage_of_state,
)


def test_the_graph_is_one_line_through_every_queue() -> None:
    assert STAGES == QUEUES == tuple(TASK_FOR_QUEUE)
    assert FIRST_STAGE == "prepare" and GRAPH["prepare"].entry == JobState.QUEUED
    walked = [FIRST_STAGE]
    while (following := next_stage(walked[-1])) is not None:
        assert GRAPH[following].entry == GRAPH[walked[-1]].done
        assert previous_stage(following) == walked[-1]
        walked.append(following)
    assert walked == ["prepare", "infer", "report", "deliver"]
    assert GRAPH["deliver"].done == JobState.DELIVERED
    # every live state belongs to exactly one stage; terminal states to none
    for stage, spec in GRAPH.items():
        assert stage_of_state(spec.entry.value) == stage
        assert stage_of_state(spec.running.value) == stage
    for state in (JobState.DELIVERED, JobState.FAILED, JobState.IGNORED, JobState.COMPLETED):
        assert stage_of_state(state.value) is None


def test_no_module_spells_out_a_successor_itself() -> None:
    """'What comes next' lives in the graph only (it used to be written in three places)."""
    root = Path(__file__).resolve().parents[2] / "workers"
    for path in root.glob("*.py"):
        if path.name == "stage_graph.py":
            continue
        text = path.read_text()
        assert '"prepare": "infer"' not in text and '"report": "deliver"' not in text, path
        assert "jobstate._move" not in text, path


def _job(settings: Settings, job_id: int) -> ScreeningJob:
    with session_scope(settings.database_url) as session:
        job = session.get(ScreeningJob, job_id)
        assert job is not None
        return job


def test_claim_finish_and_early_outcomes_follow_the_graph(settings: Settings) -> None:
    a = make_job(settings.database_url, "1.2.7.1", JobState.PREPARED)
    b = make_job(settings.database_url, "1.2.7.2", JobState.PREPARED)
    late = make_job(settings.database_url, "1.2.7.3", JobState.INFERRED)
    assert jobstate.claim_all(settings, [a, b, late], "infer") == [a, b]
    assert jobstate.claim_all(settings, [a, b], "infer") == []  # a duplicate does nothing
    with session_scope(settings.database_url) as session:
        assert jobstate.finish_all(session, [a, late], "infer") == [a]
    assert _job(settings, a).state == JobState.INFERRED.value
    with pytest.raises(ValueError):  # infer cannot complete a job
        jobstate.finish(settings, b, "infer", to_state=JobState.COMPLETED)
    assert jobstate.redo_previous(settings, b, "infer") == "prepare"
    assert _job(settings, b).state == JobState.QUEUED.value
    assert jobstate.redo_previous(settings, b, "infer") is None  # not running any more
    assert jobstate.claim(settings, late, "report")
    assert jobstate.end_early(settings, late, "report", JobState.IGNORED, reason="nothing")
    assert _job(settings, late).state == JobState.IGNORED.value


def test_claim_job_and_finish_timed_are_one_transaction_each(settings: Settings) -> None:
    import time

    from sqlmodel import select

    from screener.db.models import StageTiming

    job_id = make_job(settings.database_url, "1.2.7.9", JobState.QUEUED)
    view = jobstate.claim_job(settings, job_id, "prepare")
    assert view is not None and view.id == job_id and view.study_instance_uid == "1.2.7.9"
    assert _job(settings, job_id).state == JobState.PREPARING.value
    assert jobstate.claim_job(settings, job_id, "prepare") is None  # ours already
    started = time.monotonic() - 0.25
    assert jobstate.finish_timed(settings, job_id, "prepare", started)
    assert not jobstate.finish_timed(settings, job_id, "prepare", started)  # not running now
    with session_scope(settings.database_url) as session:
        rows = session.exec(select(StageTiming).where(StageTiming.job_id == job_id)).all()
    assert [(r.stage, r.seconds >= 0.25) for r in rows] == [("prepare", True)]
    assert _job(settings, job_id).state == JobState.PREPARED.value


def _messages(client: redis.Redis, queue: str) -> list[tuple[str, int]]:
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], int(body[0][0])))
    return out


def test_dispatcher_sends_a_committed_job_to_the_next_stage_at_once(settings: Settings) -> None:
    client = fresh_redis("reconciler")
    try:
        app = create_app(settings.model_copy(update={"broker_url": redis_url("reconciler")}))
        dispatcher = Dispatcher(app, settings)
        a = make_job(settings.database_url, "1.2.8.1", JobState.PREPARED)
        b = make_job(settings.database_url, "1.2.8.2", JobState.PREPARED)
        fresh = make_job(settings.database_url, "1.2.8.3")
        assert dispatcher.committed("prepare", [a, b]) == "infer"
        assert _messages(client, "infer") == [
            (TASK_FOR_QUEUE["infer"], a),
            (TASK_FOR_QUEUE["infer"], b),
        ]
        assert _job(settings, a).dispatched_at is not None
        dispatcher.created([fresh])
        assert _messages(client, "prepare") == [(TASK_FOR_QUEUE["prepare"], fresh)]
        assert dispatcher.committed("deliver", [a]) is None  # the end of the line
        assert all(client.llen(q) == 0 for q in ("report", "deliver"))
    finally:
        client.flushdb()
