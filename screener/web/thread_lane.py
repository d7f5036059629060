"""The console's database work on a few threads of its own, never on the event loop.

A page that waits for the database (a lock held by a migration or a long retention prune, a
PostgreSQL that stopped answering) then holds one of these threads, not the event loop
that serves every other request: the login page, static files, ``/healthz`` and
``/metrics`` keep answering. Waiting for a free thread happens on the event loop (anyio's
capacity limiter), so a pile of stuck pages does not take the threads ``/healthz`` runs on
either.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

T = TypeVar("T")

CONSOLE_THREADS = 8  # database-bound console requests served at once; more wait their turn


class ThreadLane:
    """Runs blocking calls on threads, at most ``slots`` at once, per event loop."""

    def __init__(self, name: str, slots: int = CONSOLE_THREADS) -> None:
        self._slots = slots
        # a limiter belongs to the event loop that made it: one per loop
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"{name}-{id(self)}")

    def _current_limiter(self) -> anyio.CapacityLimiter:
        try:
            return self._limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self._slots)
            self._limiter.set(limiter)
            return limiter

    async def run(self, func: Callable[..., T], *args: object) -> T:
        call = functools.partial(func, *args)
        return await anyio.to_thread.run_sync(call, limiter=self._current_limiter())
