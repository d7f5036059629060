"""Running the HTTP service: in the foreground (``screener web``) or in a thread (``serve``)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn

from screener.settings import Settings
from screener.web.app import create_app

log = logging.getLogger(__name__)


def _config(settings: Settings, listener_alive: Callable[[], bool] | None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, listener_alive),
        host=settings.http.host,
        port=settings.http.port,
        log_config=None,  # our logging configuration, not uvicorn's
        access_log=False,
        ssl_certfile=settings.http.tls_certificate if settings.http.tls else None,
        ssl_keyfile=settings.http.tls_private_key if settings.http.tls else None,
        lifespan="off",
        # One process, no uvicorn workers: the sign-in throttle (screener.web.auth) counts in
        # it. X-Forwarded-Proto/-For are trusted from uvicorn's forwarded_allow_ips only
        # (127.0.0.1 and ::1, or $FORWARDED_ALLOW_IPS): the TLS proxy in front on loopback
        # marks requests https (Secure cookies, HSTS) and names the client's address.
        proxy_headers=True,
    )


def _scheme(settings: Settings) -> str:
    return "https" if settings.http.tls else "http"


def _probe_port(settings: Settings) -> None:
    """OSError (address in use) before uvicorn would log it and exit on its own."""
    import socket

    if settings.http.port:
        socket.create_server((settings.http.host, settings.http.port)).close()


class _CleanStopServer(uvicorn.Server):
    """uvicorn raises the signal that stopped it again once it has shut down, so a SIGTERM
    ended ``screener web`` with 143 (killed) after a clean stop; ``serve``, ``listen`` and
    ``worker`` exit 0 then, and so does this."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # handled: the server has shut down cleanly


def run_server(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM (then exit 0: a clean stop)."""
    _probe_port(settings)
    server = _CleanStopServer(_config(settings, None))
    log.info("web console on %s://%s:%d", _scheme(settings), settings.http.host, settings.http.port)
    server.run()
    if not server.started:
        raise OSError(
            98, f"the HTTP service could not bind {settings.http.host}:{settings.http.port}"
        )


@dataclass
class BackgroundServer:
    server: uvicorn.Server
    thread: threading.Thread
    bound_port: int = 0  # the port it listened on (kept after it stopped)

    @property
    def port(self) -> int:
        for srv in getattr(self.server, "servers", []):
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_background(
    settings: Settings, listener_alive: Callable[[], bool] | None = None, timeout: float = 20.0
) -> BackgroundServer:
    """Start the HTTP service in a daemon thread; OSError when it cannot bind."""
    _probe_port(settings)
    server = uvicorn.Server(_config(settings, listener_alive))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise OSError(
                98, f"the HTTP service could not bind {settings.http.host}:{settings.http.port}"
            )
        time.sleep(0.05)
    handle = BackgroundServer(server, thread)
    handle.bound_port = handle.port
    log.info("web console on %s://%s:%d", _scheme(settings), settings.http.host, handle.port)
    return handle


def keep_alive(
    handle: BackgroundServer,
    settings: Settings,
    listener_alive: Callable[[], bool] | None = None,
) -> BackgroundServer:
    """``handle`` while its thread runs; otherwise a new server on the same port (the
    console and /healthz must not vanish for the life of ``serve`` because one thread
    ended). OSError when the port cannot be bound again (the caller retries later)."""
    if handle.thread.is_alive():
        return handle
    port = handle.bound_port
    log.error("the HTTP service stopped; starting it again on port %d", port)
    again = settings.model_copy(update={"http": settings.http.model_copy(update={"port": port})})
    return start_background(again, listener_alive)
