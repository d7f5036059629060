"""A real Orthanc (Debian package) as a test PACS, on free loopback ports.

Usage::

    from tests.orthanc import OrthancServer

    with OrthancServer(tmp_path, modalities={"SCREENER": ("SCREENER", "127.0.0.1", port)}) as pacs:
        ids = pacs.upload(path)                   # REST upload, returns Orthanc instance ids
        pacs.send_to_modality("SCREENER", ids)    # Orthanc C-STOREs them to the modality
        pacs.stop(); pacs.start()                 # PACS down / up again (same ports, same data)

Orthanc 1.10 has no bind-address option; its HTTP side refuses non-local clients
(RemoteAccessAllowed false) and the tests only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).exists()


class OrthancServer:
    """One Orthanc process with its own storage, config and ports under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir) / f"orthanc-{aet.lower()}"
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.extra_config = extra_config or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # ------------------------------------------------------------------ lifecycle
    def _write_config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [],
            "StableAge": 2,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 2,
            "DicomScuTimeout": 10,
            "HttpTimeout": 30,
            "OverwriteInstances": False,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }
        config.update(self.extra_config)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 30.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        config = self._write_config()
        log = (self.workdir / "orthanc.log").open("ab")
        self._proc = subprocess.Popen(
            [ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early; see {self.workdir / 'orthanc.log'}")
            try:
                if self.session.get(f"{self.http_url}/system", timeout=1).ok and port_open(
                    self.dicom_port
                ):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start within {timeout}s")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST helpers
    def _url(self, path: str) -> str:
        return f"{self.http_url}/{path.lstrip('/')}"

    def get_json(self, path: str) -> Any:
        response = self.session.get(self._url(path), timeout=30)
        response.raise_for_status()
        return response.json()

    def post_json(self, path: str, body: Any) -> Any:
        response = self.session.post(self._url(path), json=body, timeout=120)
        response.raise_for_status()
        return response.json() if response.content else None

    def upload(self, data: Path | str | bytes) -> str:
        """Upload one DICOM file over REST; returns the Orthanc instance id."""
        payload = data if isinstance(data, bytes) else Path(data).read_bytes()
        response = self.session.post(self._url("instances"), data=payload, timeout=60)
        response.raise_for_status()
        return str(response.json()["ID"])

    def send_to_modality(self, modality: str, resource_ids: list[str]) -> Any:
        """Ask Orthanc to C-STORE resources (instances/series/studies ids) to a modality."""
        return self.post_json(
            f"modalities/{modality}/store",
            {"Resources": list(resource_ids), "Synchronous": True},
        )

    def instances(self) -> list[str]:
        return list(self.get_json("instances"))

    def studies(self) -> list[str]:
        return list(self.get_json("studies"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        response = self.session.get(self._url(f"instances/{instance_id}/file"), timeout=60)
        response.raise_for_status()
        return response.content

    def find_instances(self, **tags: str) -> list[str]:
        """Instance ids whose tags match (e.g. ``SOPInstanceUID=...``, ``Modality="SR"``)."""
        return list(
            self.post_json(
                "tools/find", {"Level": "Instance", "Query": dict(tags), "Expand": False}
            )
        )

    def wait_for_instances(
        self, predicate: Any, timeout: float = 60.0, interval: float = 0.5
    ) -> list[str]:
        """Poll until ``predicate(instance_ids)`` is true; returns the ids."""
        deadline = time.monotonic() + timeout
        ids: list[str] = []
        while time.monotonic() < deadline:
            ids = self.instances()
            if predicate(ids):
                return ids
            time.sleep(interval)
        raise TimeoutError(f"Orthanc condition not met within {timeout}s ({len(ids)} instances)")


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
