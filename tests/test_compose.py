"""docker-compose.yml and Dockerfile: validated by docker-compose itself, and checked
against the settings model and the CLI (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from screener.cli import app
from screener.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SCREENER_SERVICES = ("listener", "worker-cpu", "worker-gpu", "worker-infer-cpu", "reconciler")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    done = subprocess.run(
        [exe, "--profile", "cpu-only", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return _yaml_to_dict(exe, done.stdout)


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


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", "orthanc", "migrate", "flower", *SCREENER_SERVICES):
        assert name in services, name
    assert {"screener-data", "postgres-data", "orthanc-data"} <= set(compose["volumes"])
    for name in SCREENER_SERVICES:
        mounts = services[name]["volumes"]
        assert any(_source(m) == "screener-data" for m in mounts), name
    # Orthanc's DICOM port is published (on loopback) so a real PACS or storescu can reach it.
    assert any(_target(p) == 4242 for p in services["orthanc"]["ports"])


def _source(mount: str | dict[str, Any]) -> str:
    """Compose 1.x prints short syntax (``src:dst:mode``), 2.x long syntax (dicts)."""
    return mount.split(":", 1)[0] if isinstance(mount, str) else str(mount["source"])


def _target(port: str | dict[str, Any]) -> int:
    if isinstance(port, dict):
        return int(port["target"])
    return int(port.split("/", 1)[0].rsplit(":", 1)[-1])


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
    for name in ("redis", "postgres", "orthanc", *SCREENER_SERVICES):
        assert compose["services"][name].get("healthcheck", {}).get("test"), name


def test_configuration_is_only_screener_variables_and_all_parse(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (*SCREENER_SERVICES, "migrate"):
        env = compose["services"][name]["environment"]
        assert all(key.startswith("SCREENER_") for key in env), (name, sorted(env))
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = Settings()  # type: ignore[call-arg]
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.broker_url == "redis://redis:6379/0"
        assert [d.name for d in settings.delivery.destinations] == ["ORTHANC@orthanc:4242"]
        assert settings.listener.allowed_calling_ae_titles == ["ORTHANC"]
        for key in env:
            monkeypatch.delenv(key)


def test_service_commands_exist(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    for name in (*SCREENER_SERVICES, "migrate"):
        service = compose["services"][name]
        command = list(service["command"])
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (name, command, result.output)
        health = service.get("healthcheck", {}).get("test", [])
        if health[:2] == ["CMD", "screener"]:
            result = runner.invoke(app, [*health[2:], "--help"])
            assert result.exit_code == 0, (name, health, result.output)


def test_dockerfile_has_the_stages_compose_builds(compose: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.M | re.I))
    targets = {s["build"]["target"] for s in compose["services"].values() if "build" in s}
    assert targets <= stages, (targets, stages)
    assert "tensorrt" in dockerfile.lower()
    assert re.search(r"^USER\s+screener", dockerfile, flags=re.M)  # not root
