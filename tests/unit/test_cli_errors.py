"""Operator mistakes at the CLI boundary: one ``error:`` line naming what is wrong, a
documented exit code (README, "Exit codes"), no traceback unless ``--debug``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCREENER = str(Path(sys.executable).parent / "screener")


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
    base["SCREENER_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [SCREENER, *args], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "no association" in line]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_listen_on_a_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = run(["listen", "--port", str(port)], tmp_path)
    one_line(done, 5, f"127.0.0.1:{port}", "already in use", "SCREENER_LISTENER__PORT")


def test_echo_unresolvable_host_and_bad_port(tmp_path: Path) -> None:
    done = run(["echo", "no-such-host.invalid", "104", "--aet", "PACS"], tmp_path)
    assert done.returncode == 2 and "cannot resolve host" in done.stdout
    assert "Traceback" not in done.stderr
    one_line(run(["echo", "127.0.0.1", "99999", "--aet", "PACS"], tmp_path), 2, "port", "65535")


def test_missing_and_broken_config_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    one_line(run(["config", "show"], tmp_path, SCREENER_CONFIG=str(missing)), 2, str(missing))
    broken = tmp_path / "broken.toml"
    broken.write_text("[listener\nport = 1\n")
    one_line(run(["config", "show"], tmp_path, SCREENER_CONFIG=str(broken)), 2, str(broken))


def test_misspelt_settings(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text('[modle]\nengine = "torch"\n[listener]\nae_titel = "X"\n')
    line = one_line(run(["config", "show"], tmp_path, SCREENER_CONFIG=str(typo)), 2, str(typo))
    assert "modle" in line and "listener.ae_titel" in line
    warned = run(["config", "show"], tmp_path, SCREENER_LISTENER_PORT="2000")
    assert warned.returncode == 0
    assert "SCREENER_LISTENER_PORT is not a setting" in warned.stderr
    assert json.loads(warned.stdout)["listener"]["port"] == 11112


def test_invalid_values(tmp_path: Path) -> None:
    line = one_line(
        run(["config", "show"], tmp_path, SCREENER_LISTENER__PORT="abc"),
        2,
        "listener.port",
        "SCREENER_LISTENER__PORT",
    )
    assert "abc" not in line  # a rejected value is not echoed
    weak = "letmein-letmein"  # signing sessions with a guessable key: refused, never used
    line = one_line(
        run(["config", "show"], tmp_path, SCREENER_HTTP__SECRET_KEY=weak),
        2,
        "http.secret_key",
        "at least 32 characters",
    )
    assert weak not in line
    strong = run(["config", "show"], tmp_path, SCREENER_HTTP__SECRET_KEY="k" * 32)
    assert strong.returncode == 0 and json.loads(strong.stdout)["http"]["secret_key"] == "***"
    one_line(
        run(["status"], tmp_path, SCREENER_DATABASE_URL="mysql://u:secret@127.0.0.1/x"),
        2,
        "mysql",
        "postgresql",
    )


def test_thresholds_outside_zero_one_are_refused(tmp_path: Path) -> None:
    one_line(run(["screen", str(tmp_path), "--threshold", "1.5"], tmp_path), 2, "threshold")
    labels = tmp_path / "l.csv"
    labels.write_text("sop_instance_uid,label\n")
    one_line(
        run(["evaluate", "--labels", str(labels), "--threshold", "7", str(tmp_path)], tmp_path),
        2,
        "threshold",
    )
    one_line(
        run(["threshold", "set", "1.5", "--reason", "x"], tmp_path), 2, "less than or equal to 1"
    )


def test_evaluate_missing_labels_file(tmp_path: Path) -> None:
    one_line(
        run(["evaluate", "--labels", str(tmp_path / "missing.csv"), str(tmp_path)], tmp_path),
        2,
        "missing.csv",
        "does not exist",
    )


def test_tensorrt_without_tensorrt(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    done = run(["screen", str(tmp_path), "--engine", "tensorrt"], tmp_path)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "tensorrt" in done.stderr.lower()


def test_train_without_the_train_extra(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)  # a site where torch is absent, as without the train extra
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    done = run(["train", "segmenter"], tmp_path, PYTHONPATH=str(tmp_path / "shadow"))
    one_line(done, 6, "train extra", "pip install")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run(["--debug", "status"], tmp_path, SCREENER_CONFIG=str(tmp_path / "absent.toml"))
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_reprocess_prints_no_alembic_noise(tmp_path: Path) -> None:
    assert run(["db", "upgrade"], tmp_path).returncode == 0  # reprocess never creates it
    done = run(["reprocess", "--since", "2020-01-01", "--dry-run"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "alembic" not in done.stderr.lower()


def test_echo_refuses_bad_ae_titles_and_missing_tls_files(tmp_path: Path) -> None:
    too_long = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    echo = ["echo", "127.0.0.1", "104"]
    one_line(run([*echo, "--aet", too_long], tmp_path), 2, "--aet", too_long, "16")
    one_line(run([*echo, "--aet", ""], tmp_path), 2, "--aet", "empty")
    one_line(run([*echo, "--aet", "PACS", "--calling-aet", too_long], tmp_path), 2, "16")
    missing = tmp_path / "no-such-ca.pem"
    one_line(
        run([*echo, "--aet", "PACS", "--tls", "--ca", str(missing)], tmp_path), 2, str(missing)
    )
    key = tmp_path / "absent.key"
    one_line(
        run(
            [*echo, "--aet", "PACS", "--tls"],
            tmp_path,
            SCREENER_LISTENER__TLS__CERTIFICATE=str(tmp_path / "absent.crt"),
            SCREENER_LISTENER__TLS__PRIVATE_KEY=str(key),
        ),
        2,
        "listener.tls.certificate",
        "absent.crt",
    )
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    one_line(
        run([*echo, "--aet", "PACS", "--tls", "--ca", str(not_pem)], tmp_path), 2, str(not_pem)
    )


def test_db_upgrade_to_an_unknown_revision(tmp_path: Path) -> None:
    one_line(run(["db", "upgrade", "no-such-revision"], tmp_path), 2, "'no-such-revision'")


def test_reprocess_refuses_an_empty_window(tmp_path: Path) -> None:
    since = ["reprocess", "--since", "2026-03-02", "--dry-run"]
    one_line(run([*since, "--until", "2026-03-01"], tmp_path), 2, "--until", "not later")
    one_line(run([*since, "--until", "2026-03-02"], tmp_path), 2, "--until", "not later")
    # 01:00+02:00 is 23:00 UTC the day before: an offset is honoured, a plain date is UTC
    one_line(run([*since, "--until", "2026-03-02T01:00+02:00"], tmp_path), 2, "not later")
    # no database yet: refused (exit 4), never created; after `db upgrade` the window runs
    one_line(run([*since, "--until", "2026-03-02T01:00Z"], tmp_path), 4, "does not exist")
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    assert run([*since, "--until", "2026-03-02T01:00Z"], tmp_path).returncode == 0
    helped = run(["reprocess", "--help"], tmp_path, COLUMNS="200")
    assert helped.stdout.count("UTC") >= 2
