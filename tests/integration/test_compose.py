"""The deployment files: docker-compose.yml (+ override files) as docker-compose itself
resolves them, checked against the settings model, the CLI and the secure defaults; the
Redis and Orthanc entry points run for real on loopback. The stack itself runs in
tests/compose/smoke.sh (.ci/run)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from typer.testing import CliRunner

from screener.cli import app
from screener.settings import Settings
from tests.orthanc import free_port

REPO = Path(__file__).resolve().parents[2]
SCREENER_SERVICES = ("listener", "worker-cpu", "worker-gpu", "worker-infer-cpu", "reconciler")
PROFILES = ("--profile", "cpu-only", "--profile", "http", "--profile", "flower")
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-1f3a",
    "REDIS_PASSWORD": "redis-secret-77c2",
    "ORTHANC_USERNAME": "pacs-admin",
    "ORTHANC_PASSWORD": "orthanc-secret-9e01",
    "SCREENER_LISTENER__ALLOWED_CALLING_AE_TITLES": '["ORTHANC"]',
}
REQUIRED = tuple(SECRETS)
HOSTNET = ("-f", "docker-compose.yml", "-f", "docker/compose.hostnet.yml")


def _compose_exe() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    return exe


def _run_config(env: dict[str, str], tmp: Path, *files: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose [-f ...] config`` with exactly ``env`` as the .env file; variables of
    the same names in this process's environment are removed so they cannot leak in."""
    env_file = tmp / f"env-{len(list(tmp.iterdir()))}"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "FLOWER_BASIC_AUTH"}
    return subprocess.run(
        [_compose_exe(), "--env-file", str(env_file), *files, *PROFILES, "config"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compose")


@pytest.fixture(scope="module")
def compose(config_dir: Path) -> dict[str, Any]:
    """The production form: docker-compose.yml + docker-compose.override.yml (implicit)."""
    done = _run_config(SECRETS, config_dir)
    assert done.returncode == 0, done.stderr
    return _yaml_to_dict(_compose_exe(), done.stdout)


@pytest.fixture(scope="module")
def hostnet(config_dir: Path) -> dict[str, Any]:
    """The host-network form the smoke test and this project's CI run."""
    done = _run_config(SECRETS, config_dir, *HOSTNET)
    assert done.returncode == 0, done.stderr
    return _yaml_to_dict(_compose_exe(), done.stdout)


def _yaml_to_dict(exe: str, text: str) -> dict[str, Any]:
    """Parse docker-compose's normalised YAML with the YAML library docker-compose itself
    runs on (Debian's docker-compose 1.x is Python + PyYAML; the project has no YAML dep)."""
    shebang = Path(exe).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
    if not shebang.startswith("#!") or "python" not in shebang:
        pytest.skip("docker-compose is not the Python implementation; cannot parse its YAML")
    interpreter = shebang[2:].strip().split()
    done = subprocess.run(
        [
            *interpreter,
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


# --------------------------------------------------------------------------- secure defaults


@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_refuses_without_each_secret(missing: str, config_dir: Path) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    for files in ((), HOSTNET):
        done = _run_config(env, config_dir, *files)
        assert done.returncode != 0, (missing, files)
        assert missing in done.stderr, done.stderr


def test_no_password_is_written_in_the_repository() -> None:
    """Every secret-looking setting in the compose files is a ${VAR} reference."""
    files = [REPO / "docker-compose.yml", REPO / "docker-compose.override.yml"]
    files += sorted((REPO / "docker").glob("*.yml"))
    secret_key = re.compile(r"^\s*([A-Z_]*(PASSWORD|SECRET|BASIC_AUTH)[A-Z_]*)\s*:\s*(.*)$")
    url_password = re.compile(r"://[^/@\s]*:([^/@\s]+)@")
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if match := secret_key.match(line):
                assert match.group(3).startswith("${"), f"{path.name}:{number}: {line}"
            for password in url_password.findall(line):
                assert password.startswith("${"), f"{path.name}:{number}: {line}"
    example = (REPO / ".env.example").read_text()
    for key in REQUIRED[:4]:
        assert re.search(rf"^{key}=$", example, flags=re.M), f".env.example sets {key}"
    assert "/.env" in (REPO / ".gitignore").read_text().split()


def test_secrets_reach_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["worker-cpu"]["environment"]
    assert env["SCREENER_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert f":{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/" in env["SCREENER_DATABASE_URL"]
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    orthanc = services["orthanc"]["environment"]
    assert orthanc["ORTHANC_PASSWORD"] == SECRETS["ORTHANC_PASSWORD"]
    assert env["SCREENER_LISTENER__REQUIRE_CALLED_AE_TITLE"] == "true"


def test_flower_is_off_by_default_and_needs_basic_auth(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    assert flower["entrypoint"][:2] == ["sh", "-c"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == ""  # not set in .env
    script = flower["entrypoint"][2].replace("$$", "$")  # compose 1.x keeps the escape
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "FLOWER_BASIC_AUTH" in done.stderr
    assert "flower" in script.split("exec", 1)[1]  # with it set, Flower starts (basic auth)
    assert compose["services"]["web"]["profiles"] == ["http"]


# --------------------------------------------------------------------------- services


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", "orthanc", "migrate", "flower", "web", *SCREENER_SERVICES):
        assert name in services, name
    assert {"screener-data", "postgres-data", "orthanc-data"} <= set(compose["volumes"])
    for name in SCREENER_SERVICES:
        mounts = services[name]["volumes"]
        assert any(_source(m) == "screener-data" for m in mounts), name
    # Orthanc's DICOM port is published (on loopback) so a real PACS or storescu can reach it.
    assert any(_target(p) == 4242 for p in services["orthanc"]["ports"])
    assert any(_target(p) == 11112 for p in services["listener"]["ports"])
    # Redis, PostgreSQL and Orthanc come from the Debian-package images under docker/.
    for name in ("redis", "postgres", "orthanc"):
        assert services[name]["build"]["context"].endswith(f"docker/{name}"), name


def _source(mount: str | dict[str, Any]) -> str:
    """Compose 1.x prints short syntax (``src:dst:mode``), 2.x long syntax (dicts)."""
    return mount.split(":", 1)[0] if isinstance(mount, str) else str(mount["source"])


def _target(port: str | dict[str, Any]) -> int:
    if isinstance(port, dict):
        return int(port["target"])
    return int(port.split("/", 1)[0].rsplit(":", 1)[-1])


def test_host_network_form_uses_loopback_only(hostnet: dict[str, Any]) -> None:
    """Every service on the host network (no bridge network is created), no published
    ports, and nothing on the ports the host's own PostgreSQL/Redis use."""
    services = hostnet["services"]
    assert not hostnet.get("networks"), hostnet.get("networks")
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert "ports" not in service, name
    assert services["redis"]["environment"]["REDIS_BIND"] == "127.0.0.1"
    assert services["postgres"]["environment"]["POSTGRES_LISTEN"] == "127.0.0.1"
    assert services["orthanc"]["environment"]["ORTHANC_REMOTE_ACCESS_ALLOWED"] == "false"
    for name in (*SCREENER_SERVICES, "migrate", "web"):
        env = services[name]["environment"]
        for key in ("SCREENER_DATABASE_URL", "SCREENER_BROKER_URL"):
            assert "@127.0.0.1:" in env[key], (name, key)
            assert not re.search(r"@127\.0\.0\.1:(5432|6379)/", env[key]), (name, key)
        assert env["SCREENER_LISTENER__HOST"] == env["SCREENER_HTTP__HOST"] == "127.0.0.1"
        assert env["SCREENER_LISTENER__PORT"] != "11112"
        destinations = json.loads(env["SCREENER_DELIVERY__DESTINATIONS"])
        assert [d["host"] for d in destinations] == ["127.0.0.1"]


def test_gpu_worker_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["SCREENER_MODEL__ENGINE"] == "tensorrt"
    assert gpu["build"]["target"] == "gpu"
    assert gpu["command"][:3] == ["worker", "--queues", "infer"]


def test_cpu_workers_can_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-cpu"]
    assert "container_name" not in worker and "ports" not in worker  # --scale needs both absent
    assert set(worker["command"][2].split(",")) == {"prepare", "report", "deliver"}


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name in ("redis", "postgres", "orthanc", "web", *SCREENER_SERVICES):
        assert compose["services"][name].get("healthcheck", {}).get("test"), name


def test_configuration_is_only_screener_variables_and_all_parse(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (*SCREENER_SERVICES, "migrate", "web"):
        env = compose["services"][name]["environment"]
        assert all(key.startswith("SCREENER_") for key in env), (name, sorted(env))
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = Settings()  # type: ignore[call-arg]
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.broker_url.startswith("redis://:")
        assert settings.broker_url.endswith("@redis:6379/0")
        assert [d.name for d in settings.delivery.destinations] == ["ORTHANC@orthanc:4242"]
        assert settings.listener.allowed_calling_ae_titles == ["ORTHANC"]
        for key in env:
            monkeypatch.delenv(key)


def test_service_commands_exist(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    names = [*SCREENER_SERVICES, "migrate"]
    if runner.invoke(app, ["web", "--help"]).exit_code == 0:
        names.append("web")
    for name in names:
        command = list(compose["services"][name]["command"])
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (name, command, result.output)
    roles = (REPO / "docker" / "healthcheck.sh").read_text()
    for name in (*SCREENER_SERVICES, "web"):
        health = compose["services"][name]["healthcheck"]["test"]
        assert health[:2] == ["CMD", "screener-healthcheck"], (name, health)
        assert re.search(rf"^\s+(\S+ \| )?{health[2]}( \| \S+)?\)", roles, flags=re.M), health


def test_dockerfile_has_the_stages_compose_builds(compose: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.M | re.I))
    targets = {s["build"]["target"] for s in compose["services"].values() if "target" in s["build"]}
    assert targets <= stages, (targets, stages)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", dockerfile, flags=re.M)
    assert "tensorrt" in dockerfile.lower() and "torch" in dockerfile
    assert len(re.findall(r"^USER\s+screener", dockerfile, flags=re.M)) == 2  # not root
    assert "HEALTHCHECK" in dockerfile
    for name in ("redis", "postgres", "orthanc"):
        text = (REPO / "docker" / name / "Dockerfile").read_text()
        assert re.search(r"^USER\s+(redis|postgres|orthanc)$", text, flags=re.M), name
        assert "HEALTHCHECK" in text and "ARG BASE_IMAGE" in text, name


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def redis_entrypoint(tmp_path: Path) -> Iterator[int]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    env = {**os.environ, "REDIS_PASSWORD": "s3cret", "REDIS_PORT": str(port)}
    env |= {"REDIS_BIND": "127.0.0.1", "REDIS_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        ["sh", str(REPO / "docker/redis/entrypoint.sh")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_redis_entrypoint_requires_the_password(redis_entrypoint: int) -> None:
    deadline = time.monotonic() + 30
    authed = redis.Redis(host="127.0.0.1", port=redis_entrypoint, password="s3cret")
    while True:
        try:
            assert authed.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis from the entry point did not start"
            time.sleep(0.2)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_entrypoint).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_entrypoint, password="wrong").ping()
    done = subprocess.run(
        ["sh", str(REPO / "docker/redis/entrypoint.sh")],
        env={k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "REDIS_PASSWORD" in done.stderr


def test_orthanc_entrypoint_turns_authentication_on(tmp_path: Path) -> None:
    orthanc = shutil.which("Orthanc")
    if orthanc is None:
        pytest.skip("Orthanc is not installed")
    http = free_port()
    env = {
        **os.environ,
        "ORTHANC_USERNAME": "pacs-admin",
        "ORTHANC_PASSWORD": "s3cret",
        "ORTHANC_HTTP_PORT": str(http),
        "ORTHANC_DICOM_PORT": str(free_port()),
        "ORTHANC_STORAGE_DIR": str(tmp_path),
        "ORTHANC_REMOTE_ACCESS_ALLOWED": "false",
        "ORTHANC_BINARY": orthanc,
    }
    entrypoint = str(REPO / "docker/orthanc/entrypoint.py")
    proc = subprocess.Popen(
        [sys.executable, entrypoint], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{http}/system"
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = requests.get(url, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "Orthanc from the entry point did not start"
                time.sleep(0.3)
        assert anonymous.status_code == 401
        assert requests.get(url, auth=("pacs-admin", "wrong"), timeout=5).status_code == 401
        assert requests.get(url, auth=("pacs-admin", "s3cret"), timeout=5).status_code == 200
        health = subprocess.run(
            [sys.executable, str(REPO / "docker/orthanc/healthcheck.py")],
            env=env,
            capture_output=True,
            timeout=30,
        )
        assert health.returncode == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    env.pop("ORTHANC_PASSWORD")
    done = subprocess.run(
        [sys.executable, entrypoint], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0 and "ORTHANC_PASSWORD" in done.stderr


def test_gpu_check_names_what_is_missing() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "docker/gpu-check.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if importlib.util.find_spec("tensorrt") is None:
        assert done.returncode == 1
        assert "MISSING TensorRT" in done.stderr
    if importlib.util.find_spec("torch") is None:
        assert "MISSING torch" in done.stderr
    else:
        import torch

        if not torch.cuda.is_available():
            assert done.returncode == 1
            assert "MISSING CUDA support" in done.stderr or "MISSING a CUDA GPU" in done.stderr
