"""Signing in to the web console from a test client, as a browser does."""

from __future__ import annotations

import re

from starlette.testclient import TestClient

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
