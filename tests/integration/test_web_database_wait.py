"""A console page that waits for the database waits on a thread of its own: the rest of the
service keeps answering. The page handlers read the database on the event loop before, so
one page behind a table lock (a migration, a long prune) held every request, the login
page and static files included, until the lock went."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests
from starlette.testclient import TestClient

import screener.users
from screener.settings import Settings
from screener.users import Role, add_user
from screener.web.app import create_app
from screener.web.auth import COOKIE
from tests.web_support import cheap_password_hashes, login, web_server

pytestmark = pytest.mark.integration

HOLD_S = 6.0  # how long the table stays locked


@pytest.fixture
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    cheap_password_hashes(monkeypatch)
    yield
    screener.users._dummy_hash.cache_clear()


def _lock_studies(url: str, locked: threading.Event, seconds: float) -> None:
    """What a migration does to a table: ACCESS EXCLUSIVE, every reader waits."""
    # the test's schema comes with the URL (options=-csearch_path=...)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        with conn.transaction():
            conn.execute("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(seconds)


def _timed(url: str, cookies: dict[str, str] | None = None) -> tuple[int, float]:
    started = time.monotonic()
    reply = requests.get(url, cookies=cookies, timeout=60, allow_redirects=False)
    return reply.status_code, time.monotonic() - started


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_page_waiting_for_the_database_does_not_stall_the_console(
    settings: Settings, cheap_hashes: None
) -> None:
    add_user(settings.database_url, "alice", Role.ADMIN, "admin-password", "test")
    browser = TestClient(create_app(settings), follow_redirects=False)
    login(browser, "alice", "admin-password")
    cookie = browser.cookies.get(COOKIE)
    assert cookie
    signed_in = {COOKIE: cookie}
    locked = threading.Event()
    with web_server(settings) as base, ThreadPoolExecutor(4) as pool:
        assert _timed(base + "/studies", signed_in)[0] == 200
        holder = pool.submit(_lock_studies, settings.database_url, locked, HOLD_S)
        assert locked.wait(10)
        waiting = pool.submit(_timed, base + "/studies", signed_in)
        time.sleep(0.5)  # the page is waiting for the lock now
        probes = [_timed(base + "/static/style.css"), _timed(base + "/login")]
        page_status, page_s = waiting.result()
        holder.result()
    assert [status for status, _ in probes] == [200, 200]
    slowest = max(seconds for _, seconds in probes)
    print(f"page waited {page_s:.1f} s for the lock; probes answered in {slowest:.2f} s")
    assert page_status == 200 and page_s > HOLD_S / 2  # it really waited for the lock
    assert slowest < 2.5, (slowest, page_s)  # ~5.5 s (the rest of the lock) before the fix
