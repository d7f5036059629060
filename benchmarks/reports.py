"""Report writing and delivery speed, printed as tables with ratios against a baseline.

    .venv/bin/python benchmarks/reports.py [--repeats 5] [--files 20] [--sr-only]

Table 1: ``write_study_outputs`` for a one-image study (SR + heatmap SC, optionally the
parametric map) at several display sizes; ratio against the 512-pixel case of the same run.
Table 2: C-STORE of N studies' outputs (SR + heatmap SC) over one association to a local
dcmtk ``storescp``: the screener's sender (pynetdicom) against dcmtk ``storescu`` on the same
files (baseline), wall time and CPU (this process; storescu as a reaped child).
Table 3: the SR, ``build_sr`` + its encoding (``dcmwrite`` to bytes), in CPU ms
(``time.process_time``) for a one- and a four-image study: today's plain pydicom build
against the highdicom ``ComprehensiveSR`` build it replaced (the reference kept in
``tests/unit/test_sr_equivalence.py``), interleaved in the same run; median of rounds.
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.filewriter import dcmwrite  # noqa: E402

from screener.dicom.sender import send_files  # noqa: E402
from screener.reports.writer import write_study_outputs  # noqa: E402
from screener.settings import Destination, Settings  # noqa: E402
from tests.orthanc import free_port, port_open  # noqa: E402
from tests.report_results import make_result, synthetic_pixels  # noqa: E402


def time_writes(size: int, pmap: bool, repeats: int, work: Path) -> tuple[float, int]:
    settings = Settings(data_dir=work / "data")
    settings.reports.parametric_map = pmap
    settings.reports.heatmap_max_size = size
    result, _ = make_result(work / f"src{size}{pmap}", ["PA"], pixels=synthetic_pixels(size, size))
    image = result.images[0]
    from tests.report_results import cam_blob, lung_mask

    # the pipeline hands over display images up to heatmap_max_size: emulate that size
    image.display_image = synthetic_pixels(size, size)
    image.cam = cam_blob((size, size))
    image.lung_mask = lung_mask((size, size))
    best = float("inf")
    written = 0
    for i in range(repeats):
        result.outputs.clear()
        start = time.perf_counter()
        paths = write_study_outputs(result, work / f"out{size}{pmap}{i}", settings)
        best = min(best, time.perf_counter() - start)
        written = sum(p.stat().st_size for p in paths)
    return best, written


def _sr_cpu_ms(build: Callable[[], Dataset], loops: int) -> tuple[float, float]:
    """CPU ms per SR to build it, and to encode it (dcmwrite to bytes), over ``loops``."""
    start = time.process_time()
    for _ in range(loops):
        ds = build()
    built = time.process_time()
    for _ in range(loops):
        dcmwrite(io.BytesIO(), ds, enforce_file_format=True)
    done = time.process_time()
    return (built - start) * 1000 / loops, (done - built) * 1000 / loops


def sr_table(work: Path, rounds: int, loops: int = 10) -> None:
    """Table 3: old (highdicom) against new (plain pydicom) SR, same inputs, same run."""
    from tests.unit.test_sr_equivalence import sr_inputs

    print(f"\nTable 3: build_sr + dcmwrite to bytes, CPU ms per SR (median of {rounds} rounds)")
    print(f"{'images':>6} {'path':>9} {'build':>7} {'encode':>7} {'total':>7} {'x old':>6}")
    for n in (1, 4):
        result, _ = make_result(work / f"sr{n}", ["PA"] * n)
        inputs = sr_inputs(result, Settings(data_dir=work / "data"))
        paths = {"highdicom": inputs.old, "pydicom": inputs.new}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for build in paths.values():
            _sr_cpu_ms(build, 3)  # warm-up: imports, caches
        for _ in range(rounds):
            for name, build in paths.items():
                times[name].append(_sr_cpu_ms(build, loops))
        medians = {
            name: (
                statistics.median(b for b, _ in rows),
                statistics.median(e for _, e in rows),
            )
            for name, rows in times.items()
        }
        old_total = sum(medians["highdicom"])
        for name, (build_ms, encode_ms) in medians.items():
            total = build_ms + encode_ms
            print(
                f"{n:>6} {name:>9} {build_ms:>7.2f} {encode_ms:>7.2f} {total:>7.2f} "
                f"{total / old_total:>6.2f}"
            )


def start_storescp(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "BENCH", "-od", str(directory), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not port_open(port):
        time.sleep(0.05)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--sr-only", action="store_true", help="only Table 3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp:
        work = Path(tmp)
        if args.sr_only:
            sr_table(work, max(args.repeats, 5))
            return
        rows = []
        time_writes(256, True, 1, work)  # warm-up: imports, colour map, font
        for size, pmap in ((512, False), (1024, False), (2048, False), (2048, True)):
            seconds, size_bytes = time_writes(size, pmap, args.repeats, work)
            rows.append((size, pmap, seconds, size_bytes))
        base = rows[0][2]
        print(f"\nTable 1: write_study_outputs, one screened image (best of {args.repeats})")
        print(f"{'display':>9} {'pmap':>5} {'seconds':>9} {'MB written':>11} {'x 512':>7}")
        for size, pmap, seconds, size_bytes in rows:
            print(
                f"{size:>9} {str(pmap):>5} {seconds:>9.3f} {size_bytes / 1e6:>11.1f} "
                f"{seconds / base:>7.2f}"
            )

        sr_table(work, max(args.repeats, 5))

        if shutil.which("storescp") is None or shutil.which("storescu") is None:
            print("\nTable 2 skipped: dcmtk not installed")
            return
        settings = Settings(data_dir=work / "data")
        settings.reports.heatmap_max_size = 1024
        files: list[Path] = []
        for i in range(args.files):
            result, _ = make_result(work / f"d{i}", ["PA"], pixels=synthetic_pixels(1024, 1024))
            files += [p for p in write_study_outputs(result, work / f"o{i}", settings)]
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        proc, port = start_storescp(work / "received")
        try:
            dest = Destination(ae_title="BENCH", host="127.0.0.1", port=port)
            start, cpu0 = time.perf_counter(), time.process_time()
            outcome = send_files(dest, files, calling_ae_title="SCREENER")
            ours = time.perf_counter() - start
            ours_cpu = time.process_time() - cpu0
            assert not outcome.failed, outcome.failed
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(
                ["storescu", "-aec", "BENCH", "127.0.0.1", str(port), *map(str, files)],
                check=True,
                capture_output=True,
            )
            dcmtk = time.perf_counter() - start
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            dcmtk_cpu = (children1.ru_utime + children1.ru_stime) - (
                children0.ru_utime + children0.ru_stime
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        print(f"\nTable 2: C-STORE {len(files)} objects ({total_mb:.1f} MB), one association")
        print(
            f"{'sender':>16} {'seconds':>9} {'objects/s':>10} {'MB/s':>7} {'x storescu':>11}"
            f" {'CPU ms/object':>14} {'CPU x storescu':>15}"
        )
        for name, seconds, cpu in (
            ("storescu (dcmtk)", dcmtk, dcmtk_cpu),
            ("screener", ours, ours_cpu),
        ):
            print(
                f"{name:>16} {seconds:>9.3f} {len(files) / seconds:>10.1f} "
                f"{total_mb / seconds:>7.1f} {seconds / dcmtk:>11.2f}"
                f" {cpu / len(files) * 1000:>14.2f} {cpu / dcmtk_cpu:>15.2f}"
            )


if __name__ == "__main__":
    main()
