"""Shared fixtures: isolated settings, and databases (SQLite and real PostgreSQL)."""

from __future__ import annotations

import errno
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from screener.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SCREENER_SHARED_DIR", REPO_ROOT.parent / "shared"))
CXR_DIR = SHARED / "data" / "cxr"
POSTGRES_ADMIN_URL = os.environ.get(
    "SCREENER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ (real peers) is marked ``integration``; with the
    PostgreSQL variants of the DB tests, ``pytest -m "not integration"`` is the fast lane."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own SCREENER_* settings or data dir."""
    for key in list(os.environ):
        if key.startswith("SCREENER_") and key not in (
            "SCREENER_TEST_POSTGRES_URL",
            "SCREENER_SHARED_DIR",
        ):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SCREENER_DATA_DIR", str(tmp_path / "data"))
    # `serve` starts the HTTP service: on a free port, so parallel services never collide
    monkeypatch.setenv("SCREENER_HTTP__PORT", "0")
    from screener.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _no_pooled_association_left() -> Iterator[None]:
    """Delivery keeps associations open per destination and process; none outlives the test
    that opened it (a later test counting the pool's associations would see it)."""
    yield
    sender = sys.modules.get("screener.dicom.sender")  # never imported by this fixture itself
    if sender is not None:
        sender.close_pooled_associations()


@pytest.fixture
def cxr_dir() -> Path:
    if not (CXR_DIR / "manifest.csv").exists():
        pytest.skip(f"corpus not found at {CXR_DIR}")
    return CXR_DIR


def _postgres_schema_url() -> Iterator[str]:
    """A fresh schema in the `test` database, dropped afterwards: each run is isolated."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not usable: {exc}")
    try:
        yield f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        from screener.db.session import dispose_engines

        dispose_engines()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: the DB tests run on both SQLite and PostgreSQL."""
    from screener.db.session import dispose_engines, upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        upgrade(url)
        yield url
        dispose_engines()
    else:
        gen = _postgres_schema_url()
        url = next(gen)
        upgrade(url)
        yield url
        next(gen, None)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings on a temporary data dir and a migrated database (both backends)."""
    monkeypatch.setenv("SCREENER_DATABASE_URL", db_url)
    s = Settings()
    s.ensure_dirs()
    return s


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    """Settings on a temporary data dir with a migrated SQLite database only."""
    from screener.db.session import upgrade

    s = Settings()
    s.ensure_dirs()
    upgrade(s.database_url)
    return s


@pytest.fixture
def refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make ``os.open`` refuse ``O_DIRECT`` from then on, as some network and
    FUSE filesystems do (EINVAL)."""
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    return lambda: monkeypatch.setattr(os, "open", refusing_open)
