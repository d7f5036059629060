"""The stage graph: the one place that says which stage follows which.

A screening job walks ``prepare -> infer -> report -> deliver``. Each stage has an entry
state (where its message finds the job), a running state (claimed by one worker) and the
state it leaves the job in when it commits, which is the entry state of the next stage.
Besides that main line a stage may end the job early (terminal outcomes): ``ignored``
(nothing screenable, from prepare or report), ``completed`` (deliver with no destination),
``failed`` (any stage), ``superseded`` (a newer job for the study). The job state machine
(:mod:`workers.jobstate`), the dispatcher (:mod:`workers.dispatch`), the reconciler and the
infer consumer all read this table; none of them spells out a successor itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from screener.db.models import JobState


@dataclass(frozen=True)
class Stage:
    name: str
    entry: JobState  # a message for this stage finds the job here
    running: JobState  # claimed by one worker
    done: JobState  # left here when the stage commits (the next stage's entry)
    next: str | None  # the stage the dispatcher sends the job to on commit
    early_outcomes: frozenset[JobState] = frozenset({JobState.FAILED})


GRAPH: dict[str, Stage] = {
    "prepare": Stage(
        "prepare",
        JobState.QUEUED,
        JobState.PREPARING,
        JobState.PREPARED,
        "infer",
        frozenset({JobState.FAILED, JobState.IGNORED}),
    ),
    "infer": Stage("infer", JobState.PREPARED, JobState.INFERRING, JobState.INFERRED, "report"),
    "report": Stage(
        "report",
        JobState.INFERRED,
        JobState.REPORTING,
        JobState.REPORTED,
        "deliver",
        frozenset({JobState.FAILED, JobState.IGNORED}),
    ),
    "deliver": Stage(
        "deliver",
        JobState.REPORTED,
        JobState.DELIVERING,
        JobState.DELIVERED,
        None,
        frozenset({JobState.FAILED, JobState.COMPLETED}),
    ),
}
STAGES: tuple[str, ...] = tuple(GRAPH)
FIRST_STAGE = STAGES[0]  # where a newly queued job goes


def next_stage(stage: str) -> str | None:
    """The stage after ``stage`` (None: the job is finished when ``stage`` commits)."""
    return GRAPH[stage].next


def previous_stage(stage: str) -> str | None:
    """The stage whose commit leads to ``stage`` (None for the first)."""
    for name, spec in GRAPH.items():
        if spec.next == stage:
            return name
    return None


def stage_of_state(state: str) -> str | None:
    """The stage a job in ``state`` waits for or runs in (None: terminal or not yet queued)."""
    for name, spec in GRAPH.items():
        if state in (spec.entry.value, spec.running.value):
            return name
    return None


def _check(graph: dict[str, Stage]) -> None:
    """The graph is a line: each done state is the next stage's entry state."""
    for spec in graph.values():
        if spec.next is not None and graph[spec.next].entry != spec.done:
            raise AssertionError(
                f"{spec.name} leaves {spec.done}; {spec.next} waits in {graph[spec.next].entry}"
            )


_check(GRAPH)
