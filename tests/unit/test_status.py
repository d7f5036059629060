"""``screener status --json`` on SQLite and PostgreSQL: counts, spool size, last errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from screener.db.models import AuditLog
from screener.db.session import session_scope
from screener.dicom import spool
from screener.ingest import ReceivedFile, content_digest, record_instance
from screener.settings import Settings
from screener.study_assembler import assemble_due_studies
from tests.unit.test_ingest import STUDY, header

SCREENER = str(Path(sys.executable).parent / "screener")


def test_status_json(settings: Settings) -> None:
    settings.study_quiet_seconds = 0
    for i, content in enumerate([b"first", b"second"]):
        sop = f"{STUDY}.1.{i}"
        digest = content_digest(content)
        key = spool.SpoolKey(STUDY, f"{STUDY}.1", sop, digest)
        path, size = spool.store(settings.spool_dir, key, [content])
        record_instance(
            settings.database_url,
            header(sop),
            ReceivedFile(str(path), size, digest, "1.2.840.10008.1.2.1"),
        )
    assert len(assemble_due_studies(settings)) == 1
    record_instance(  # a second study, still receiving
        settings.database_url,
        header(f"{STUDY}2.1.1", study_instance_uid=f"{STUDY}2", series=f"{STUDY}2.1"),
        ReceivedFile("/x", 1, "blake3:" + "e" * 64, "1.2.840.10008.1.2.1"),
    )
    with session_scope(settings.database_url) as s:
        s.add(AuditLog(actor="listener", action="instance.malformed", detail={"reason": "x"}))
    env = dict(os.environ)
    env["SCREENER_DATABASE_URL"] = settings.database_url
    env["SCREENER_DATA_DIR"] = str(settings.data_dir)
    out = subprocess.run(
        [SCREENER, "status", "--json"], env=env, capture_output=True, text=True, check=True
    )
    status = json.loads(out.stdout)
    assert status["studies"] == {"total": 2, "complete": 1, "receiving": 1}
    assert status["instances"] == 3
    assert status["jobs_by_state"] == {"queued": 1}
    assert status["spool_bytes"] == len(b"firstsecond") + 1
    assert 0 < status["spool_filesystem_fill"] < 1
    assert [e["action"] for e in status["last_errors"]] == ["instance.malformed"]
    human = subprocess.run([SCREENER, "status"], env=env, capture_output=True, text=True)
    assert human.returncode == 0 and "jobs queued" in human.stdout
