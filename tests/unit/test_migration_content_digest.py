"""Migration 0005: instances.sha256 -> content_digest, on a database with instances in it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from screener.db.session import dispose_engines, get_engine, upgrade
from screener.ingest import IngestOutcome, content_digest, record_instance
from tests.conftest import _postgres_schema_url
from tests.unit.test_ingest import STUDY, as_received, calls, header

LEGACY = b"a data set received before BLAKE3"
LEGACY_SHA256 = hashlib.sha256(LEGACY).hexdigest()
SOP = f"{STUDY}.1.1"


def downgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from screener.db.session import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["engine"] = get_engine(url)
    command.downgrade(cfg, revision)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url_at_0004(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database migrated to 0004 holding one instance recorded with its sha256."""
    if request.param == "sqlite":
        url, gen = f"sqlite:///{tmp_path / 'db.sqlite3'}", None
    else:
        gen = _postgres_schema_url()
        url = next(gen)
    upgrade(url, "0004")
    with get_engine(url).begin() as conn:
        when = "2026-01-01 00:00:00"
        study_id = conn.execute(
            sa.text(
                "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at,"
                " is_complete, instance_count, own_output_only)"
                " VALUES (:uid, :when, :when, false, 1, false) RETURNING id"
            ),
            {"uid": STUDY, "when": when},
        ).scalar_one()
        series_id = conn.execute(
            sa.text(
                "INSERT INTO series (study_id, series_instance_uid, modality)"
                " VALUES (:study, :uid, 'CR') RETURNING id"
            ),
            {"study": study_id, "uid": f"{STUDY}.1"},
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO instances (study_id, series_id, sop_instance_uid, version,"
                " sop_class_uid, transfer_syntax_uid, file_path, size_bytes, sha256,"
                " received_at, calling_ae_title, source_address, is_own_output)"
                " VALUES (:study, :series, :sop, 1, '1.2.840.10008.5.1.4.1.1.1',"
                " '1.2.840.10008.1.2.1', '/spool/old.dcm', 100, :sha, :when, 'MOD', '', false)"
            ),
            {
                "study": study_id,
                "series": series_id,
                "sop": SOP,
                "sha": LEGACY_SHA256,
                "when": when,
            },
        )
    try:
        yield url
    finally:
        dispose_engines()
        if gen is not None:
            next(gen, None)


def _instances(url: str) -> list[dict[str, object]]:
    with get_engine(url).connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM instances ORDER BY version")).mappings()
        return [dict(r) for r in rows]


def test_upgrade_keeps_the_sha256_as_a_content_digest(url_at_0004: str) -> None:
    upgrade(url_at_0004)
    (row,) = _instances(url_at_0004)
    assert row["content_digest"] == f"sha256:{LEGACY_SHA256}" and "sha256" not in row
    indexes = {i["name"] for i in sa.inspect(get_engine(url_at_0004)).get_indexes("instances")}
    assert "ix_instances_content_digest" in indexes and "ix_instances_sha256" not in indexes
    # the same data set re-sent after the upgrade is a duplicate, not a second version
    result = record_instance(url_at_0004, header(SOP), as_received(LEGACY))
    assert result.outcome is IngestOutcome.DUPLICATE and result.version == 1
    assert calls == ["sha256"] and len(_instances(url_at_0004)) == 1


def test_downgrade_restores_sha256_digests(url_at_0004: str) -> None:
    upgrade(url_at_0004)
    changed = record_instance(url_at_0004, header(SOP), as_received(b"corrected"))
    assert changed.outcome is IngestOutcome.NEW_VERSION and changed.version == 2
    assert _instances(url_at_0004)[1]["content_digest"] == content_digest(b"corrected")
    downgrade(url_at_0004, "0004")
    legacy, blake3_row = _instances(url_at_0004)
    assert "content_digest" not in legacy
    # a BLAKE3 digest has no SHA-256 to give back: empty (documented in the migration)
    assert (legacy["sha256"], blake3_row["sha256"]) == (LEGACY_SHA256, "")
    upgrade(url_at_0004)
    assert [r["content_digest"] for r in _instances(url_at_0004)] == [
        f"sha256:{LEGACY_SHA256}",
        "sha256:",
    ]
