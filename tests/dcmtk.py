"""dcmtk ``storescu``/``storescp`` as real DICOM peers, on free loopback ports.

Used by the listener tests (a second, independent implementation sends to our SCP) and by
``benchmarks/ingest.py`` (``storescp --fork`` is the baseline receiver).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
STORESCP = shutil.which("storescp") or "/usr/bin/storescp"


def dcmtk_available() -> bool:
    return Path(STORESCU).exists() and Path(STORESCP).exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def storescu_command(
    port: int,
    files: Sequence[Path],
    *,
    called_aet: str = "SCREENER",
    calling_aet: str = "STORESCU",
    host: str = "127.0.0.1",
    extra: Sequence[str] = (),
) -> list[str]:
    """One association sending ``files`` (storescu proposes what the files need)."""
    return [
        STORESCU,
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "-nh",  # no halt on the first failed instance: report them all
        "--required",  # propose only the SOP classes the files need (not their own syntaxes)
        *extra,
        host,
        str(port),
        *[str(f) for f in files],
    ]


def storescu(
    port: int, files: Sequence[Path], timeout: float = 120.0, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        storescu_command(port, files, **kw),  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storescu_parallel(
    port: int, files: Sequence[Path], associations: int, timeout: float = 300.0, **kw: object
) -> list[subprocess.CompletedProcess[str]]:
    """Split ``files`` over ``associations`` concurrent storescu processes."""
    chunks = [list(files[i::associations]) for i in range(associations)]
    procs = [
        subprocess.Popen(
            storescu_command(port, chunk, **kw),  # type: ignore[arg-type]
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for chunk in chunks
        if chunk
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


class StoreSCP:
    """``storescp --fork`` writing into ``directory`` (the benchmark baseline)."""

    def __init__(self, directory: Path, *, aet: str = "STORESCP", fork: bool = True) -> None:
        self.directory = Path(directory)
        self.aet = aet
        self.fork = fork
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [STORESCP, "-aet", self.aet, "-od", str(self.directory), "+xa"]
        if self.fork:
            cmd.append("--fork")
        cmd.append(str(self.port))
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> StoreSCP:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
