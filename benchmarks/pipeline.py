"""CPU per stage and end to end, against floors measured in the same run (issue 11).

Inputs: single-image CR studies, 2048 x 2048, 12 bits stored, made from corpus images, once
uncompressed (Explicit VR Little Endian) and once JPEG 2000 lossless. For each of them:

- **floors**: pydicom ``dcmread`` + ``pixel_array`` of the same files (the decode floor;
  for JPEG 2000 that is a full-resolution decode) and the two engine calls alone
  (segmenter, classifier; onnxruntime as configured), process CPU time in this process;
- **offline** ``screener screen --out``: CPU per image of the real command, as the CPU of a
  run over all files minus a run over one file (start-up and model loading cancel out);
- **service, per stage** (``--layout split``): every stage in its own process on the
  embedded defaults (SQLite, the embedded broker): ``screener listen`` (ingest and study
  assembly), ``screener reconcile`` (dispatch, sweep), one ``screener worker`` per queue
  (prepare, infer, report, deliver); dcmtk ``storescu`` sends the studies on one
  association, dcmtk ``storescp`` is the PACS the results go to;
- **service, end to end** (``--layout serve``): ``screener serve`` as a fresh machine runs
  it, CPU of its whole process tree.

CPU is each process's own time (``/proc/PID/stat`` utime + stime, children included) from
after a warm-up study (models loaded, caches warm) to the last job delivered, divided by the
studies; idle polling in that window is counted, as it costs the machine the same.
studies/hour is over the same window. Peak RSS is each process's VmHWM.

    .venv/bin/python benchmarks/pipeline.py --quick         # 4 studies per syntax
    .venv/bin/python benchmarks/pipeline.py --studies 40
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from screener.settings import Destination, Settings  # noqa: E402
from screener.testing.dicom_factory import (  # noqa: E402
    StudyIdentity,
    corpus_image,
    make_instance,
    pick_images,
    write_datasets,
)
from tests.dcmtk import StoreSCP, free_port, storescu, wait_for_port  # noqa: E402

CXR = REPO.parent / "shared" / "data" / "cxr"
SIZE = (2048, 2048)
TICK = os.sysconf("SC_CLK_TCK")
SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "j2k-lossless": JPEG2000Lossless}
SCREENER = [str(Path(sys.executable).parent / "screener")]
STAGES = ("listen", "reconcile", "prepare", "infer", "report", "deliver")


# ------------------------------------------------------------------------------ inputs


def make_studies(directory: Path, n: int, syntax: str, offset: int = 0) -> list[Path]:
    """``n`` single-image 2048-px CR studies (one file each) in ``syntax``."""
    rows = pick_images(CXR, 40, split="test", view="PA") + pick_images(
        CXR, 40, split="test", view="AP"
    )
    rows = rows[::2] + rows[1::2]  # PA and AP alternate
    paths: list[Path] = []
    for index in range(offset, offset + n):
        row = rows[index % len(rows)]
        ds = make_instance(
            corpus_image(CXR, row["id"]),
            study=StudyIdentity.new(),
            modality="CR",
            view_position=row["view"],
            target_size=SIZE,
            transfer_syntax=SYNTAXES[syntax],
        )
        paths += write_datasets([ds], directory)
    return paths


# ------------------------------------------------------------------------------ /proc


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, own + reaped children's CPU seconds) of one process."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / TICK


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid, _ = _stat(int(entry.name))
            except (OSError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += parents.get(current, [])
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree (live processes, and the children they reaped)."""
    total = 0.0
    for p in tree(pid):
        try:
            total += _stat(p)[1]
        except (OSError, ValueError):
            pass
    return total


def peak_rss_mb(pid: int) -> float:
    """The largest VmHWM (peak resident set) in a process tree, MB."""
    best = 0.0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


# ------------------------------------------------------------------------------ floors


def decode_floor_ms(files: list[Path], repeat: int = 2) -> float:
    """Median process CPU ms of pydicom dcmread + pixel_array per file."""
    samples = []
    for _ in range(repeat):
        for path in files:
            start = time.process_time()
            pydicom.dcmread(path).pixel_array  # noqa: B018 (the decode is the point)
            samples.append(time.process_time() - start)
    return 1000 * statistics.median(samples)


def decode_floor_kept_ms(files: list[Path]) -> float:
    """:func:`decode_floor_ms` in a fresh process whose allocator keeps freed memory, as the
    service's workers do (screener.allocator): most of pydicom's own decode CPU is faulting
    in fresh pages, so this floor is far lower. Printed beside the plain floor so that a
    ratio is never read against the flattering one by mistake."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from pathlib import Path;"
        "from screener.allocator import keep_freed_memory;"
        "assert keep_freed_memory();"
        "from benchmarks.pipeline import decode_floor_ms;"
        "print(decode_floor_ms([Path(p) for p in sys.argv[2:]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO), *map(str, files)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
    )
    if done.returncode != 0:
        print(f"decode floor with freed memory kept: {done.stderr[-500:]}")
        return float("nan")
    return float(done.stdout.strip().splitlines()[-1])


def engines_floor_ms(settings: Settings, files: list[Path]) -> float:
    """Median process CPU ms of the two engine calls (batch of one) per image."""
    from screener.imaging.preprocess import NET_SIZE
    from screener.screening.models import ScreeningModels
    from screener.screening.prepare import prepare_instance

    models = ScreeningModels.from_settings(settings)
    inputs = [x for f in files if (x := prepare_instance(f, settings).network_input) is not None]
    cls_input = np.zeros((1, 1, NET_SIZE, NET_SIZE), np.float32)
    for x in inputs[:1]:  # warm-up
        models.segmenter.infer(x[None])
        models.classifier.infer(cls_input)
    samples = []
    for x in inputs:
        start = time.process_time()
        models.segmenter.infer(x[None])
        models.classifier.infer(x[None])
        samples.append(time.process_time() - start)
    return 1000 * statistics.median(samples)


def offline_ms_per_image(files: list[Path], work: Path, env: dict[str, str]) -> float:
    """CPU ms per image of ``screener screen --out`` (all files minus one file, per image)."""

    def run(subset: list[Path], out: Path) -> float:
        before = os.times()
        done = subprocess.run(
            [*SCREENER, "screen", *map(str, subset), "--out", str(out), "--format", "jsonl"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        after = os.times()
        if done.returncode != 0:
            print(f"screener screen exited {done.returncode}: {done.stderr[-800:]}")
            return float("nan")
        return (after.children_user - before.children_user) + (
            after.children_system - before.children_system
        )

    one = run(files[:1], work / "screen-1")
    everything = run(files, work / "screen-all")
    return 1000 * (everything - one) / max(1, len(files) - 1)


# ------------------------------------------------------------------------------ service


@dataclass
class ServiceRun:
    layout: str
    syntax: str
    studies: int
    delivered: int
    wall_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds
    rss_mb: dict[str, float] = field(default_factory=dict)  # process -> peak RSS

    @property
    def per_hour(self) -> float:
        return 3600 * self.delivered / self.wall_s if self.wall_s else 0.0

    def ms_per_study(self, name: str | None = None) -> float:
        cpu = sum(self.cpu_s.values()) if name is None else self.cpu_s.get(name, float("nan"))
        return 1000 * cpu / max(1, self.delivered)


def service_settings(work: Path, pacs: StoreSCP) -> Settings:
    """Embedded defaults (SQLite, embedded broker) with a PACS destination and free ports."""
    settings = Settings(data_dir=work / "data")
    settings.listener.port = free_port()
    settings.listener.single_image_complete_modalities = ["CR"]
    settings.http.port = free_port()
    settings.delivery.destinations = [
        Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.port)
    ]
    return settings


def delivered_jobs(settings: Settings) -> int:
    import sqlite3

    path = str(settings.database_url).split("///", 1)[1]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        row = conn.execute(
            "SELECT count(*) FROM screening_jobs WHERE state = 'delivered'"
        ).fetchone()
    return int(row[0])


def wait_delivered(settings: Settings, n: int, procs: dict[str, subprocess.Popen[bytes]]) -> int:
    deadline = time.monotonic() + 60 * 30
    done = 0
    while time.monotonic() < deadline:
        try:
            done = delivered_jobs(settings)
        except Exception:  # the database is being created or is locked a moment
            done = 0
        if done >= n:
            break
        dead = [name for name, p in procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"service processes exited: {dead}")
        time.sleep(0.25)
    return done


def start_profilers(
    procs: dict[str, subprocess.Popen[bytes]], out: Path
) -> list[subprocess.Popen[bytes]]:
    """py-spy (``--native``, collapsed stacks) on every service process and its children,
    for the measured window only; its own CPU is not in the process trees measured."""
    out.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(p.pid),
                "--subprocesses",
                "--native",
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, p in procs.items()
    ]


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for spy in profilers:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
    for spy in profilers:
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()


def run_service(
    layout: str,
    syntax: str,
    warmup: list[Path],
    files: list[Path],
    work: Path,
    serve_concurrency: int = 0,
    profile_dir: Path | None = None,
) -> ServiceRun:
    from workers.runner import child_env

    run_dir = work / f"{layout}-{syntax}"
    pacs = StoreSCP(run_dir / "pacs", fork=False)
    pacs.start()
    settings = service_settings(run_dir, pacs)
    env = child_env(settings)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([*SCREENER, "db", "upgrade"], env=env, check=True, capture_output=True)
    if layout == "serve":
        concurrency = ["--concurrency", str(serve_concurrency)] if serve_concurrency else []
        commands = {"serve": [*SCREENER, "serve", *concurrency]}
    else:
        commands = {
            "listen": [*SCREENER, "listen"],
            "reconcile": [*SCREENER, "reconcile"],
            **{q: [*SCREENER, "worker", "--queues", q] for q in STAGES[2:]},
        }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, argv in commands.items():
            with (log_dir / f"{name}.log").open("wb") as log_file:
                procs[name] = subprocess.Popen(
                    argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                )
        wait_for_port(settings.listener.port, timeout=60)
        # storescu proposes only uncompressed syntaxes unless told (it cannot convert J2K)
        propose = ("-xv",) if syntax == "j2k-lossless" else ()
        sent = storescu(settings.listener.port, warmup, extra=propose)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
        wait_delivered(settings, len(warmup), procs)
        time.sleep(2)  # let the warm-up's tail (sweeps, settles) pass
        before = {name: tree_cpu(p.pid) for name, p in procs.items()}
        profilers = (
            start_profilers(procs, profile_dir / f"{layout}-{syntax}") if profile_dir else []
        )
        started = time.monotonic()
        sent = storescu(settings.listener.port, files, extra=propose)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
        done = wait_delivered(settings, len(warmup) + len(files), procs) - len(warmup)
        wall = time.monotonic() - started
        after = {name: tree_cpu(p.pid) for name, p in procs.items()}
        rss = {name: peak_rss_mb(p.pid) for name, p in procs.items()}
        stop_profilers(profilers)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait(5)
        pacs.stop()
    return ServiceRun(
        layout,
        syntax,
        len(files),
        done,
        wall,
        {k: after[k] - before[k] for k in after},
        rss,
    )


# ------------------------------------------------------------------------------ report


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=20, help="studies per transfer syntax")
    parser.add_argument("--quick", action="store_true", help="4 studies per syntax")
    parser.add_argument("--layout", choices=["split", "serve", "both"], default="both")
    parser.add_argument("--syntax", choices=[*SYNTAXES, "both"], default="both")
    parser.add_argument("--no-offline", action="store_true", help="skip screener screen")
    parser.add_argument(
        "--serve-concurrency", type=int, default=0, help="serve --concurrency (0: its default)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy collapsed stacks per service process here (CPU figures then include "
        "py-spy's pauses; profile, do not measure)",
    )
    args = parser.parse_args()
    n = 4 if args.quick else args.studies
    layouts = ["split", "serve"] if args.layout == "both" else [args.layout]
    syntaxes = list(SYNTAXES) if args.syntax == "both" else [args.syntax]
    console = Console(width=160)
    console.print(f"commit {commit()}; {os.cpu_count()} CPUs; {n} studies per syntax")
    floors: dict[str, dict[str, float]] = {}
    offline: dict[str, float] = {}
    runs: list[ServiceRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        base_settings = Settings(data_dir=work / "floor-data")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}
        base_env["SCREENER_DATA_DIR"] = str(work / "offline-data")
        for syntax in syntaxes:
            files = make_studies(work / syntax / "studies", n, syntax)
            warm = make_studies(work / syntax / "warmup", 1, syntax, offset=n)
            floors[syntax] = {
                "decode": decode_floor_ms(files),
                "decode, memory kept": decode_floor_kept_ms(files),
                "engines": engines_floor_ms(base_settings, files),
            }
            if not args.no_offline:
                offline[syntax] = offline_ms_per_image(files, work / syntax, base_env)
            for layout in layouts:
                runs.append(
                    run_service(
                        layout, syntax, warm, files, work, args.serve_concurrency, args.profile
                    )
                )
                console.print(f"done: {layout} {syntax}")
            shutil.rmtree(work / syntax, ignore_errors=True)
    print_tables(console, floors, offline, runs)


def print_tables(
    console: Console,
    floors: dict[str, dict[str, float]],
    offline: dict[str, float],
    runs: list[ServiceRun],
) -> None:
    table = Table(title="floors and offline screen --out (CPU ms per image)")
    for column in (
        "syntax",
        "decode floor",
        "decode floor, freed memory kept",
        "engines floor",
        "screen --out",
        "x decode floor",
        "x uncompressed decode floor",
    ):
        table.add_column(column, justify="right")
    plain = floors.get("uncompressed", {}).get("decode", float("nan"))
    for syntax, f in floors.items():
        value = offline.get(syntax, float("nan"))
        table.add_row(
            syntax,
            f"{f['decode']:.1f}",
            f"{f['decode, memory kept']:.1f}",
            f"{f['engines']:.1f}",
            f"{value:.0f}",
            f"{value / f['decode']:.2f}",
            f"{value / plain:.1f}",
        )
    console.print(table)
    for layout in ("split", "serve"):
        chosen = [r for r in runs if r.layout == layout]
        if not chosen:
            continue
        names = list(chosen[0].cpu_s)
        title = (
            "service per stage (one process per stage)"
            if layout == "split"
            else "service end to end (screener serve)"
        )
        table = Table(title=f"{title}: CPU ms per study, ratio to the decode floor")
        table.add_column("syntax")
        for name in names:
            table.add_column(f"{name} ms", justify="right")
        for column in ("total ms", "x decode", "x engines", "studies/h", "delivered"):
            table.add_column(column, justify="right")
        for name in names:
            table.add_column(f"{name} RSS MB", justify="right")
        for r in chosen:
            f = floors[r.syntax]
            total = r.ms_per_study()
            table.add_row(
                r.syntax,
                *[f"{r.ms_per_study(name):.0f}" for name in names],
                f"{total:.0f}",
                f"{total / plain:.1f}" + ("" if r.syntax == "uncompressed" else "*"),
                f"{total / f['engines']:.1f}",
                f"{r.per_hour:.0f}",
                f"{r.delivered}/{r.studies}",
                *[f"{r.rss_mb.get(name, float('nan')):.0f}" for name in names],
            )
        console.print(table)
    console.print(
        "x decode: against the uncompressed decode floor (* JPEG 2000 rows too); "
        "screen --out for JPEG 2000 is also given against its own full-resolution decode "
        "(x decode floor). CPU includes every thread and reaped child of each process. "
        "Ratios are against the plain decode floor (a default Python process); 'freed memory "
        "kept' is the same decode in a process whose allocator keeps freed memory, as the "
        "workers' do (screener.allocator)."
    )


if __name__ == "__main__":
    main()
