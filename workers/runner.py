"""Starting the pieces of the service: Celery workers, the batching consumer, the reconciler,
and all of them at once as the embedded one-machine service (``screener serve``).

Child processes get the parent's effective settings through ``SCREENER_*`` variables
(nested sections as JSON), so a service started with overrides (``screener demo``, tests)
runs its workers on exactly the same configuration.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
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


def settings_env(settings: Settings) -> dict[str, str]:
    """``SCREENER_*`` variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}
    for key, value in settings.model_dump(mode="json").items():
        name = f"SCREENER_{key.upper()}"
        env[name] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return env


def die_with_parent() -> None:
    """``preexec_fn`` for worker children: SIGTERM them when the parent dies (Linux), so
    a ``serve`` killed with SIGKILL leaves no orphaned workers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


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
    """The cross-study batching consumer of the ``infer`` queue; returns batches run."""
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
    consumer = BatchingConsumer(app, "infer", handler, policy, heartbeat=Heartbeat("infer"))
    if install_signals:  # a process of its own (not a test's thread): settle its heap
        from screener.startup_heap import settle_worker_process

        consumer.install_signal_handlers()
        settle_worker_process()
    try:
        consumer.run(idle_timeout_s=idle_timeout_s)
    finally:
        handler.close()
    return consumer.batches


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
    _restarts: dict[str, list[float]] = field(default_factory=dict)

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
        for name in children:
            self._spawn(name)
        self._reconciler = threading.Thread(
            target=run_reconciler_loop,
            args=(self.settings, self._stop),
            kwargs={"assemble": True},
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
            preexec_fn=die_with_parent,
        )
        log.info("started %s worker (pid %d): %s", name, self.processes[name].pid, argv)

    def check_children(self) -> list[str]:
        """Names of worker processes that have exited (a healthy service has none)."""
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    def revive(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """Start again the workers that exited (killed, out of memory, a crash): one dead
        worker must not stop the listener, nor leave studies waiting until someone restarts
        the service. Returns (restarted, given up): a worker that exits more than
        ``RESTART_LIMIT`` times in ``RESTART_WINDOW_S`` is left dead, for the caller to stop
        and an operator to read its log. Work it held is re-sent by the reconciler."""
        now = time.monotonic() if now is None else now
        restarted: list[str] = []
        given_up: list[str] = []
        for name in self.check_children():
            code = self.processes[name].returncode
            recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= RESTART_LIMIT:
                log.error(
                    "%s worker exited (code %s) %d times in %.0f s; not restarting it",
                    name,
                    code,
                    len(recent) + 1,
                    RESTART_WINDOW_S,
                )
                given_up.append(name)
                continue
            log.error("%s worker exited (code %s); restarting it", name, code)
            self._restarts[name] = [*recent, now]
            self._spawn(name)
            restarted.append(name)
        return restarted, given_up

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
