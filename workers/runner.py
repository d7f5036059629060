"""Starting the pieces of the service: Celery workers, the batching consumer, the reconciler,
and all of them at once as the embedded one-machine service (``screener serve``).

Child processes get the parent's effective settings through ``SCREENER_*`` variables
(nested sections as JSON), so a service started with overrides (``screener demo``, tests)
runs its workers on exactly the same configuration.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from screener.settings import Settings

if TYPE_CHECKING:
    from screener.dicom.listener import ListenerHandle

log = logging.getLogger(__name__)

CELERY_QUEUES = ("prepare", "report", "deliver")
# a worker that exits more often than this is left dead and the service stops
RESTART_LIMIT, RESTART_WINDOW_S = 5, 600.0
# a stuck child gets this long after SIGTERM to finish what still moves, then SIGKILL (the
# engine call it hangs in does not return for a signal)
STUCK_KILL_GRACE_S = 5.0


@dataclass
class RestartRule:
    """The one restart rule of every supervisor (``serve``'s workers and listener processes,
    the infer child of a combined ``screener worker``): a process that exits more than
    ``limit`` times in ``window_s`` is left dead, so a crash loop stops the service and an
    operator reads the log instead of the service spinning."""

    limit: int = RESTART_LIMIT
    window_s: float = RESTART_WINDOW_S
    _restarts: dict[str, list[float]] = field(default_factory=dict)

    def allow(self, name: str, now: float | None = None) -> bool:
        """Record an exit of ``name``; True when it may be started again."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self._restarts.get(name, []) if now - t < self.window_s]
        if len(recent) >= self.limit:
            return False
        self._restarts[name] = [*recent, now]
        return True


def settings_env(settings: Settings) -> dict[str, str]:
    """``SCREENER_*`` variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}
    for key, value in settings.model_dump(mode="json").items():
        name = f"SCREENER_{key.upper()}"
        env[name] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return env


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGTERM this process when its parent dies (Linux), so a ``serve`` killed with SIGKILL
    leaves no orphaned workers or listeners behind (``preexec_fn`` of worker children, first
    call of a listener child). With ``parent_pid``, a parent that died before the call
    (it is then no longer our parent) terminates this process at once: the kernel only
    signals deaths after the call."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for a child of this process: :func:`die_with_parent` with our pid
    (taken here, before the fork, so a parent dead before the child's call is noticed)."""
    return functools.partial(die_with_parent, os.getpid())


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment with every ``SCREENER_*`` variable replaced by ``settings``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    return {**inherited, **settings_env(settings)}


def parse_queues(text: str) -> list[str]:
    from workers.celery_app import QUEUES

    queues = [q.strip() for q in text.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise ValueError(f"unknown queue(s) {unknown or text!r}; choose from {', '.join(QUEUES)}")
    return queues


def run_celery_worker(
    queues: list[str],
    *,
    concurrency: int = 1,
    pool: str = "solo",
    loglevel: str = "INFO",
    name: str | None = None,
) -> None:
    """A Celery worker for CPU/I-O queues in this process (blocks until stopped)."""
    from workers.celery_app import app

    name = name or f"{'+'.join(queues)}-{os.getpid()}@%h"
    argv = ["worker", "-Q", ",".join(queues), "-c", str(concurrency), "-P", pool]
    argv += ["-n", name, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    app.worker_main(argv)


def run_infer_consumer(
    settings: Settings, *, idle_timeout_s: float | None = None, install_signals: bool = True
) -> int:
    """The cross-study batching consumer of the ``infer`` queue; returns batches run.
    Raises :class:`ConsumerStuck` when it stopped because its work stopped moving."""
    from screener.screening.models import ScreeningModels
    from workers.batching import BatchingConsumer, BatchPolicy
    from workers.celery_app import create_app
    from workers.dispatch import Dispatcher
    from workers.heartbeat import Heartbeat
    from workers.infer_stage import ScreeningHandler

    settings.ensure_dirs()
    app = create_app(settings)
    models = ScreeningModels.from_settings(settings)
    log.info("infer consumer: model %s on %s", models.model_info.ref, models.model_info.engine)
    handler = ScreeningHandler(
        settings,
        models,
        actor=f"worker:infer:{os.getpid()}",
        dispatcher=Dispatcher(app, settings),
        glue_threads=settings.model.glue_threads,
    )
    policy = BatchPolicy(
        settings.model.max_batch, settings.model.max_wait_ms / 1000, settings.model.pipeline_depth
    )
    consumer = BatchingConsumer(
        app,
        "infer",
        handler,
        policy,
        heartbeat=Heartbeat("infer", settings.data_dir),
        stuck_after_s=settings.workers.stuck_after_seconds,
        stop_when_stuck=install_signals,  # a process of its own: exit, to be restarted
    )
    if install_signals:  # a process of its own (not a test's thread): settle its heap
        from screener.startup_heap import settle_worker_process

        consumer.install_signal_handlers()
        settle_worker_process()
    try:
        consumer.run(idle_timeout_s=idle_timeout_s)
    finally:
        handler.close()
    if consumer.gave_up is not None:
        raise ConsumerStuck(f"infer consumer stuck ({consumer.gave_up}); exiting to be restarted")
    return consumer.batches


class ConsumerStuck(RuntimeError):
    """The infer consumer stopped because its work stopped moving (``workers.
    stuck_after_seconds``); its process exits 1 so that its supervisor restarts it."""


def run_reconciler_loop(settings: Settings, stop: threading.Event, *, assemble: bool) -> None:
    """The reconciler (with ``assemble``: also the study assembler, whose new jobs the
    dispatcher sends at once) and the delivery sweep, until ``stop``."""
    from screener.dicom.sender import close_pooled_associations
    from workers.celery_app import create_app
    from workers.dispatch import Dispatcher
    from workers.reconciler import run_reconciler

    dispatcher = Dispatcher(create_app(settings), settings)
    try:
        run_reconciler(settings, dispatcher, stop, assemble=assemble)
    finally:
        close_pooled_associations()  # the delivery sweep's associations: released, not dropped


def run_reconciler_thread(settings: Settings, stop: threading.Event) -> None:
    """The reconciler thread of ``serve``: whatever ends it (even ``SystemExit``, which
    ``threading`` drops silently) is logged, for the serve loop that notices it gone."""
    try:
        run_reconciler_loop(settings, stop, assemble=True)
    except BaseException:
        log.exception("the reconciler thread died")
        raise
    if not stop.is_set():
        log.error("the reconciler thread returned before the service stopped")


@dataclass
class StuckWatch:
    """Ends a running child whose heartbeat file says its work has not moved for longer
    than ``limit_s`` (an engine call that never returns). Such a child's loop still turns,
    so it never exits by itself, and a supervisor that restarts only dead children left its
    queue unserved. SIGTERM first (it may still settle what moves), SIGKILL ``grace_s``
    later; its supervisor then sees the exit and restarts it under its :class:`RestartRule`.
    Nothing is lost: the broker re-delivers unacknowledged messages and the reconciler
    takes back the jobs the child had claimed."""

    what: str  # the child, as the log names it
    heartbeat: str  # the name of the heartbeat file it writes
    data_dir: Path
    limit_s: float
    grace_s: float = STUCK_KILL_GRACE_S
    _ending: tuple[int, float] | None = field(default=None, init=False, repr=False)

    def check(self, pid: int, send: Callable[[int], None]) -> None:
        """One look at the running child ``pid`` (``send`` signals it): SIGKILL once the
        grace after our SIGTERM is over, else SIGTERM if its heartbeat says stuck."""
        if self._ending is not None and self._ending[0] == pid:
            self._kill_when_due(pid, send)
        else:
            self._end_if_stuck(pid, send)

    def _end_if_stuck(self, pid: int, send: Callable[[int], None]) -> None:
        from workers.heartbeat import heartbeat_state

        state = heartbeat_state(self.heartbeat, self.data_dir)
        if state is None or state.pid != pid or not state.stuck_past(self.limit_s):
            return  # a file of an earlier child (its pid) is not this child's state
        log.error(
            "%s (pid %d) is stuck: its work has not moved for %.1f s (limit %g s; %s); "
            "restarting it (SIGTERM, then SIGKILL after %.0f s)",
            self.what,
            pid,
            state.age_s,
            self.limit_s,
            state.stuck,
            self.grace_s,
        )
        self._signal(send, signal.SIGTERM)
        self._ending = (pid, time.monotonic() + self.grace_s)  # (pid, when SIGKILL is due)

    def _kill_when_due(self, pid: int, send: Callable[[int], None]) -> None:
        assert self._ending is not None
        if time.monotonic() < self._ending[1]:
            return
        log.error(
            "%s (pid %d) did not stop %.0f s after SIGTERM; killing it",
            self.what,
            pid,
            self.grace_s,
        )
        self._signal(send, signal.SIGKILL)
        self._ending = (pid, float("inf"))  # killed once; its exit is the supervisor's

    @staticmethod
    def _signal(send: Callable[[int], None], sig: int) -> None:
        try:
            send(sig)
        except ProcessLookupError:  # it exited meanwhile: its supervisor restarts it
            pass


def infer_stuck_watch(
    settings: Settings, what: str, grace_s: float = STUCK_KILL_GRACE_S
) -> StuckWatch:
    """The watch of an infer consumer child started with ``settings``."""
    return StuckWatch(
        what, "infer", settings.data_dir, settings.workers.stuck_after_seconds, grace_s
    )


class SupervisedChild:
    """One child process (the ``infer`` consumer of a combined ``screener worker``, whose
    main thread runs Celery) watched by a thread of its own: started again when it exits,
    or, with a :class:`StuckWatch`, ended and started again when its heartbeat says it is
    stuck, under the :class:`RestartRule`; when the rule gives up, ``on_give_up`` stops
    the parent, which then exits 1. Without this a killed child stayed a zombie, its queue
    unserved, while the parent's heartbeat still named the queue."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        on_give_up: Callable[[], None],
        *,
        rule: RestartRule | None = None,
        poll_s: float = 1.0,
        stuck: StuckWatch | None = None,
    ) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.on_give_up = on_give_up
        self.rule = rule or RestartRule()
        self.poll_s = poll_s
        self.stuck = stuck
        self.given_up = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # no start while stop() terminates
        self._thread = threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True)

    def start(self) -> SupervisedChild:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            # the death signal fires when the *thread* that started the child ends: the
            # watcher thread lives until stop(), which ends the child anyway
            self.proc = subprocess.Popen(
                self.argv, env=self.env, preexec_fn=die_with_this_process()
            )
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            proc = self.proc
            if proc is None or self._stopping.is_set():
                continue
            if proc.poll() is None:
                if self.stuck is not None:
                    self.stuck.check(proc.pid, proc.send_signal)
                continue
            if not self.rule.allow(self.name):
                log.error(
                    "%s exited (code %s) more than %d times in %.0f s; not restarting it, stopping",
                    self.name,
                    proc.returncode,
                    self.rule.limit,
                    self.rule.window_s,
                )
                self.given_up = True
                self.on_give_up()
                return
            log.error("%s exited (code %s); restarting it", self.name, proc.returncode)
            self._spawn()

    def shutting_down(self) -> None:
        """The parent is stopping: an exit of the child from now on is not restarted."""
        self._stopping.set()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the child and wait ``timeout`` s for it to drain, then SIGKILL it."""
        with self._lock:
            self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.poll_s + 5)
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error(
                "%s (pid %d) did not stop in %.0f s; killing it", self.name, proc.pid, timeout
            )
            proc.kill()
            proc.wait(5)


def worker_name(queues: Sequence[str]) -> str:
    """A worker process's name (its log is ``worker-<name>.log``): ``cpu`` for all three CPU
    stage queues, else its queues joined by ``+`` (``infer``, ``prepare+deliver``)."""
    return "cpu" if sorted(queues) == sorted(CELERY_QUEUES) else "+".join(queues)


def cpu_worker_queues(processes: int) -> list[tuple[str, ...]]:
    """The CPU stage queues of ``serve``'s ``processes`` worker processes, one consumer per
    queue: 1 -> all three; 2 -> prepare + deliver, report (the heaviest stage); 3 or more ->
    one stage each.

    Measured (benchmarks/pipeline.py, 2 cores): a process per stage 13,200-16,500
    studies/h, one process for all three 10,500. One process consumes ``deliver``, so the
    service keeps one association open per destination: with two all-queue processes each
    kept its own, and a PACS that serves one association at a time (the benchmark's
    storescp without --fork) made the second wait for the ACSE timeout (3,100 studies/h).
    """
    if processes <= 1:
        return [CELERY_QUEUES]
    if processes == 2:
        return [("prepare", "deliver"), ("report",)]
    return [(queue,) for queue in CELERY_QUEUES]


def worker_command(queues: list[str], *, concurrency: int = 1, pool: str = "solo") -> list[str]:
    """The command line of a ``screener worker`` child process."""
    exe = Path(sys.executable).parent / "screener"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "screener.cli"]
    return [*base, "worker", "--queues", ",".join(queues), "-c", str(concurrency), "-P", pool]


@dataclass
class EmbeddedService:
    """Listener + workers + reconciler on one machine (``screener serve``, ``demo``)."""

    settings: Settings
    worker_concurrency: int = 1
    log_dir: Path | None = None
    listener: ListenerHandle | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _reconciler: threading.Thread | None = None
    _commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _rule: RestartRule = field(default_factory=RestartRule)
    stuck_grace_s: float = STUCK_KILL_GRACE_S  # SIGTERM to SIGKILL of a stuck worker
    _watches: dict[str, StuckWatch] = field(default_factory=dict)  # worker -> its watch

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    def start(self) -> EmbeddedService:
        from screener.db.session import upgrade
        from screener.dicom.listener import start_listener

        self.settings.ensure_dirs()
        if self.log_dir is not None:  # every process: <log_dir>/<process>.log and the console
            self.log_dir.mkdir(parents=True, exist_ok=True)
            logging_settings = self.settings.logging.model_copy(
                update={"directory": str(self.log_dir)}
            )
            self.settings = self.settings.model_copy(update={"logging": logging_settings})
        upgrade(self.settings.database_url)
        # the reconciler thread assembles quiet studies, so its dispatcher sends them at once
        self.listener = start_listener(self.settings, block=False, assemble=False, migrate=False)
        env = child_env(self.settings)
        env["SCREENER_LISTENER__PORT"] = str(self.listener.port)
        # single-process (solo) workers, one per group of stage queues (cpu_worker_queues)
        children = {
            worker_name(queues): worker_command(list(queues))
            for queues in cpu_worker_queues(self.worker_concurrency)
        }
        children["infer"] = worker_command(["infer"])
        self._commands = {name: (argv, env) for name, argv in children.items()}
        self._watches = {
            "infer": infer_stuck_watch(self.settings, "infer worker", self.stuck_grace_s)
        }
        for name in children:
            self._spawn(name)
        self._reconciler = threading.Thread(
            target=run_reconciler_thread,
            args=(self.settings, self._stop),
            name="reconciler",
            daemon=True,
        )
        self._reconciler.start()
        return self

    def _spawn(self, name: str) -> None:
        argv, env = self._commands[name]
        # with a log_dir the child writes its own <log_dir>/worker-<queues>.log and
        # inherits the console; without one (tests, benchmarks) its output is dropped
        # (stdout to fd 2 as well: stdout is for machine-readable output such as --json)
        out: Any = 2 if self.log_dir is not None else subprocess.DEVNULL
        self.processes[name] = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=None if self.log_dir is not None else subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_this_process(),
        )
        log.info("started %s worker (pid %d): %s", name, self.processes[name].pid, argv)

    def check_children(self) -> list[str]:
        """Names of worker processes that have exited (a healthy service has none)."""
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    def revive(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """Start again the workers and listener processes that exited (killed, out of
        memory, a crash): one dead worker must not stop the listener, nor leave studies
        waiting until someone restarts the service. A stuck infer worker (its heartbeat
        says so) is ended first, to be started again once it has exited. Returns
        (restarted, given up), by name (``infer worker``, ``listener process 2``): one that
        exits more than ``RESTART_LIMIT`` times in ``RESTART_WINDOW_S`` is left dead, for
        the caller to stop and an operator to read its log. Work a worker held is re-sent
        by the reconciler."""
        self._end_stuck()
        restarted: list[str] = []
        given_up: list[str] = []
        for what, code, start_again in self._exited():
            if not self._rule.allow(what, now):
                log.error(
                    "%s exited (code %s) more than %d times in %.0f s; not restarting it",
                    what,
                    code,
                    self._rule.limit,
                    self._rule.window_s,
                )
                given_up.append(what)
                continue
            log.error("%s exited (code %s); restarting it", what, code)
            start_again()
            restarted.append(what)
        return restarted, given_up

    def _end_stuck(self) -> None:
        """SIGTERM (then SIGKILL) the running workers whose heartbeat says stuck; each
        is its own process group (``start_new_session``), as :meth:`stop` signals it."""
        for name, watch in self._watches.items():
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                watch.check(proc.pid, functools.partial(os.killpg, proc.pid))

    def _exited(self) -> list[tuple[str, int | None, Callable[[], None]]]:
        """(name, exit code, how to start it again) of each worker and listener process
        that exited."""
        found: list[tuple[str, int | None, Callable[[], None]]] = [
            (
                f"{name} worker",
                self.processes[name].returncode,
                functools.partial(self._spawn, name),
            )
            for name in self.check_children()
        ]
        listener = self.listener
        if listener is not None:
            found += [
                (f"listener process {slot + 1}", code, functools.partial(listener.restart, slot))
                for slot, code in listener.exited()
            ]
        return found

    def dead_threads(self) -> list[str]:
        """Threads of the service that ended before :meth:`stop`: the reconciler, the only
        path in ``serve`` from a received study to a job (the caller stops the service)."""
        thread = self._reconciler
        if thread is None or thread.is_alive() or self._stop.is_set():
            return []
        return [thread.name]

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop(drain_seconds=5.0)
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._reconciler is not None:
            self._reconciler.join(timeout=5)

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
