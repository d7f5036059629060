"""Signing in to the web console from a test client, as a browser does; cheap password
hashes for tests that sign in many times; the web service on a loopback port."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from starlette.testclient import TestClient

from screener.settings import Settings

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def login(client: TestClient, name: str, password: str) -> str:
    """Sign in through the form; the CSRF token of the new session."""
    token = _CSRF.search(client.get("/login").text)
    assert token is not None
    reply = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": token.group(1)},
        follow_redirects=False,
    )
    assert reply.status_code == 303 and not reply.headers["location"].startswith("/login")
    found = _CSRF.search(client.get("/studies").text)
    assert found is not None
    return found.group(1)


def login_token(client: TestClient) -> str:
    """The login form's CSRF token (its cookie is now in ``client``)."""
    token = _CSRF.search(client.get("/login").text)
    assert token is not None
    return token.group(1)


def cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id at its cheapest for users added from now on (verification reads the cost
    from the hash): tests that sign in dozens of times then take milliseconds, not 0.4 s a
    try. Undo with ``screener.users._dummy_hash.cache_clear()`` after the test."""
    from argon2 import PasswordHasher

    import screener.users as users

    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(users, "_hasher", cheap)
    users._dummy_hash.cache_clear()  # the unknown-user hash: cheap too


@contextmanager
def web_server(settings: Settings) -> Iterator[str]:
    """The HTTP service of ``settings`` (uvicorn, as ``screener web`` runs it) on a free
    loopback port; its base URL."""
    from screener.web.server import start_background

    settings.http.host, settings.http.port = "127.0.0.1", 0
    handle = start_background(settings)
    try:
        yield f"http://127.0.0.1:{handle.port}"
    finally:
        handle.stop()
