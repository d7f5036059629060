"""The spool filesystem's fill as the (non-root) service user sees it, and ``status --check``
flagging it before the listener starts refusing images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from screener.dicom import spool
from screener.settings import Settings
from screener.status import SPOOL_ATTENTION_SHARE, spool_attention

SCREENER = str(Path(sys.executable).parent / "screener")


def statvfs(blocks: int, free: int, available: int) -> os.statvfs_result:
    """A real ``statvfs_result``; ``free - available`` blocks are reserved for root."""
    return os.statvfs_result((4096, 4096, blocks, free, available, 1000, 500, 500, 0, 255))


def user_fill(path: Path) -> float:
    """What ``df`` reports for a non-root user: 1 - available / size."""
    usage = os.statvfs(path)
    return 1 - usage.f_bavail / usage.f_blocks


def test_reserved_blocks_count_as_full(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # ext4 -m 10, filled by the service user until ENOSPC: nothing left for it, 10% for root
    monkeypatch.setattr(os, "statvfs", lambda _path: statvfs(1000, 100, 0))
    assert spool.filesystem_fill(tmp_path) == 1.0
    monkeypatch.setattr(os, "statvfs", lambda _path: statvfs(1000, 200, 120))
    assert spool.filesystem_fill(tmp_path) == pytest.approx(0.88)
    monkeypatch.setattr(os, "statvfs", lambda _path: statvfs(0, 0, 0))
    assert spool.filesystem_fill(tmp_path) == 1.0  # no size: nothing can be written


def test_fill_matches_df(tmp_path: Path) -> None:
    df = shutil.which("df")
    if df is None:
        pytest.skip("no df here")
    out = subprocess.run(
        [df, "-B1", "--output=size,avail", str(tmp_path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"df has no --output here: {out.stderr.strip()}")
    size, avail = (int(v) for v in out.stdout.split()[-2:])
    assert spool.filesystem_fill(tmp_path) == pytest.approx(1 - avail / size, abs=0.01)


def test_attention_margin_below_the_refusal_threshold() -> None:
    assert spool_attention(0.80, 0.95) == ""
    line = spool_attention(0.95 * SPOOL_ATTENTION_SHARE, 0.95)
    assert "spool filesystem" in line and "refuses images above 95%" in line
    assert spool_attention(0.96, 0.95)


def test_status_check_flags_the_spool_before_refusals(settings: Settings) -> None:
    fill = user_fill(settings.spool_dir)
    # a threshold the real filesystem is just below: the listener still accepts images,
    # but within the margin, so `status --check` must already ask for attention
    max_fill = fill / 0.95
    if not 0 < max_fill <= 1:
        pytest.skip(f"the test filesystem is {fill:.0%} full")
    env = dict(os.environ)
    env["SCREENER_DATABASE_URL"] = settings.database_url
    env["SCREENER_DATA_DIR"] = str(settings.data_dir)
    env["SCREENER_LISTENER__MAX_SPOOL_FILL"] = f"{max_fill:.6f}"
    done = subprocess.run(
        [SCREENER, "status", "--check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "needs attention" in done.stderr and "spool filesystem" in done.stderr
    env["SCREENER_LISTENER__MAX_SPOOL_FILL"] = "1.0"
    if fill < SPOOL_ATTENTION_SHARE - 0.02:
        calm = subprocess.run(
            [SCREENER, "status", "--check"], env=env, capture_output=True, text=True, timeout=120
        )
        assert calm.returncode == 0, calm.stderr
