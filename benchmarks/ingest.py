"""Ingest throughput: the screener listener vs dcmtk ``storescp --fork``, same run, loopback.

    .venv/bin/python benchmarks/ingest.py [--count 24] [--processes N] [--associations 1,4]
                                          [--repeat 3] [--database-url URL]

dcmtk ``storescu`` sends ``--count`` radiographs of about 10 MB (2560x2048, 16 bit, explicit
VR little endian) over 1 and 4 parallel associations to each receiver. The listener fsyncs
every file and its directory and records each instance in the database (SQLite by default,
``--database-url`` for PostgreSQL) before answering Success; storescp only writes. Prints
instances/s, MB/s, the ratio to storescp at the same parallelism and the receiver's CPU
seconds per GB (median of ``--repeat`` rounds; each round sends new UIDs).

Two more rows per round, ``write floor``, are what only putting the same bytes into new
files costs on this machine: the listener's own spool write (``screener.dicom.spool.
write_atomic``: temporary file, fsync, rename, fsync of the folder), in one process, with no
network and no parsing; ``direct`` past the page cache as the listener writes by default
(``listener.direct_io``), ``cache`` through the page cache. Through the page cache the cost varies a
lot on a virtual machine with whether the cache gets recently freed memory or memory the
host must supply first (measured: 0.2-0.3 CPU-s/GB against about 2), so compare receivers
only within a run. ``--compare-page-cache`` adds the listener with ``direct_io`` off.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from screener.db.session import dispose_engines  # noqa: E402
from screener.dicom.listener import start_listener  # noqa: E402
from screener.dicom.spool import write_atomic  # noqa: E402
from screener.settings import Settings  # noqa: E402
from screener.testing.dicom_factory import StudyIdentity, make_instance  # noqa: E402
from tests.dcmtk import StoreSCP, storescu_parallel  # noqa: E402


def make_files(directory: Path, count: int, rows: int, cols: int) -> list[Path]:
    """``count`` distinct ~10 MB DX instances (same pixels, different UIDs: fast to build)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(rows, cols), dtype=np.uint8)
    study = StudyIdentity.new()
    base = make_instance(pixels, study=study, modality="DX", bits_stored=12)
    paths = []
    for i in range(count):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i + 1
        if i % 4 == 0:  # a few studies, like a real push
            base.StudyInstanceUID = generate_uid()
            base.SeriesInstanceUID = generate_uid()
        path = directory / f"{i:04d}.dcm"
        base.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _process_cpu(pid: int) -> float:
    """CPU seconds of a live process plus its reaped children (utime, stime, cutime,
    cstime from /proc; storescp --fork reaps each child it forked)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def timed_send(port: int, files: list[Path], associations: int, called: str) -> float:
    start = time.perf_counter()
    results = storescu_parallel(port, files, associations, called_aet=called)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0].stderr[-1000:]}")
    return elapsed


def _run_storescp(work: Path, files: list[Path], n: int) -> tuple[float, float]:
    out = work / f"storescp-{n}"
    with StoreSCP(out) as scp:
        assert scp.pid is not None
        cpu0 = _process_cpu(scp.pid)
        t = timed_send(scp.port, files, n, scp.aet)
        time.sleep(0.5)  # let storescp reap its last children
        cpu = _process_cpu(scp.pid) - cpu0
    shutil.rmtree(out, ignore_errors=True)
    return t, cpu


def _run_write_floor(work: Path, files: list[Path], direct: bool) -> tuple[float, float]:
    """The bytes of ``files`` written to new files as the listener writes its spool (fsynced,
    file and folder), in this process: the part of a receiver's CPU that none avoids."""
    payloads = [p.read_bytes() for p in files]  # read before the clock starts
    out = work / "write-floor"
    out.mkdir()
    start, cpu0 = time.perf_counter(), time.process_time()
    for i, data in enumerate(payloads):
        write_atomic(out / f"{i:04d}.dcm", [data], direct=direct)  # the spool write, alone
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, cpu


def _run_listener(
    work: Path,
    files: list[Path],
    n: int,
    processes: int,
    database_url: str,
    count: int,
    direct_io: bool = True,
) -> tuple[float, float]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"listener-{n}-", dir=work))
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url or f"sqlite:///{data_dir / 'screener.sqlite3'}",
    )
    settings.listener.port = 0
    settings.listener.processes = processes
    settings.listener.direct_io = direct_io
    with start_listener(settings) as handle:
        cpu0 = sum(_process_cpu(p) for p in handle.pids) + time.process_time()
        t = timed_send(handle.port, files, n, "SCREENER")
        cpu = sum(_process_cpu(p) for p in handle.pids) + time.process_time() - cpu0
    stored = len(list(settings.spool_dir.rglob("*.dcm")))
    if stored != count:
        raise RuntimeError(f"listener stored {stored} of {count}")
    dispose_engines()  # the SQLite file goes away with data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    return t, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=24, help="instances per run")
    parser.add_argument("--rows", type=int, default=2560)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument(
        "--processes",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="listener processes (default: CPUs, at most 4; more than CPUs only adds contention)",
    )
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument("--database-url", default="", help="default: SQLite in the work dir")
    parser.add_argument("--workdir", default="", help="default: a temp dir (same filesystem)")
    parser.add_argument(
        "--compare-page-cache",
        action="store_true",
        help="also run the listener with listener.direct_io off (spool through the page cache)",
    )
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    files = make_files(work / "send", args.count, args.rows, args.cols)
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"{args.count} instances, {total_mb / args.count:.1f} MB each; {os.cpu_count()} CPUs; "
        f"listener: {args.processes} process(es), fsync + DB per instance",
        flush=True,
    )
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}  # -> [(seconds, CPU s)]
    listener_name = f"screener listen x{args.processes}"
    for repeat in range(args.repeat):
        for n in [int(x) for x in args.associations.split(",")]:
            if repeat or n != int(args.associations.split(",")[0]):
                # new UIDs for every round: a database that outlives the round (PostgreSQL)
                # must see new instances, not duplicates
                shutil.rmtree(work / "send", ignore_errors=True)
                files = make_files(work / "send", args.count, args.rows, args.cols)
            for direct, floor in ((True, "write floor (direct)"), (False, "write floor (cache)")):
                runs.setdefault((floor, n), []).append(_run_write_floor(work, files, direct))
            runs.setdefault(("storescp --fork", n), []).append(_run_storescp(work, files, n))
            variants = [(True, listener_name)]
            if args.compare_page_cache:
                variants.append((False, f"{listener_name} (cache)"))
            if repeat % 2:
                variants.reverse()  # alternate which listener goes first
            for direct, name in variants:
                if len(variants) > 1:  # new UIDs for each listener: the database outlives it
                    shutil.rmtree(work / "send", ignore_errors=True)
                    files = make_files(work / "send", args.count, args.rows, args.cols)
                runs.setdefault((name, n), []).append(
                    _run_listener(
                        work, files, n, args.processes, args.database_url, args.count, direct
                    )
                )

    print()
    print(
        f"{'receiver':<28}{'assocs':>7}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}"
        f"{'vs storescp':>13}{'CPU s/GB':>10}{'CPU vs storescp':>17}"
    )
    for (name, n), results in runs.items():
        t = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        reference = runs[("storescp --fork", n)]
        ratio = statistics.median(r[0] for r in reference) / t
        cpu_ratio = cpu / statistics.median(r[1] for r in reference)
        print(
            f"{name:<28}{n:>7}{t:>9.2f}{args.count / t:>9.1f}{total_mb / t:>9.1f}"
            f"{ratio:>12.2f}x{cpu / (total_mb / 1000):>10.2f}{cpu_ratio:>16.2f}x"
        )
    print(
        f"median of {args.repeat} round(s); load average at the end: "
        f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)"
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
