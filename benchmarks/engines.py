"""Engine throughput: images/s per backend and batch size, side by side, plus the whole path.

    .venv/bin/python benchmarks/engines.py [--batches 1 8 32] [--seconds 3] [--full-path]

Table 1: engine call 1 + engine call 2 (segmenter + classifier) per image, per backend
(onnxruntime with 1 and 2 intra-op threads, torch reference, TensorRT where available),
relative to onnxruntime-1-thread at batch 1 of the same run. Table 2 (``--full-path``): the
whole per-image path (DICOM decode -> scores + CAM) with onnxruntime at each batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.manifest import load_manifest  # noqa: E402
from engines.runtime.base import Engine, load_engine  # noqa: E402


def rate(fn: Callable[[], None], images: int, seconds: float) -> tuple[float, float]:
    """(images per wall-clock second, CPU milliseconds of this process per image). The CPU
    time is robust to other work on a shared machine; wall-clock throughput is not."""
    fn()  # warm-up
    done, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        fn()
        done += images
    wall = time.perf_counter() - start
    return done / wall, 1000.0 * (time.process_time() - cpu0) / done


def backends() -> list[tuple[str, str, int]]:
    out = [
        ("onnxruntime", "onnxruntime x1 thread", 1),
        ("onnxruntime", "onnxruntime x2 threads", 2),
    ]
    try:
        import torch  # noqa: F401

        out.append(("torch", "torch x2 threads (reference)", 2))
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        out.append(("tensorrt", "tensorrt fp16", 1))
    except ImportError:
        pass
    return out


def engine_table(batches: list[int], seconds: float) -> list[dict[str, object]]:
    manifest = load_manifest()
    seg_path = manifest.path(manifest.segmenter)
    cls_path = manifest.path(manifest.scheme(manifest.production_scheme).classifier)
    rows = []
    for backend, label, threads in backends():
        seg = load_engine(backend, seg_path, intra_op_threads=threads, max_batch=max(batches))
        cls = load_engine(backend, cls_path, intra_op_threads=threads, max_batch=max(batches))
        for batch in batches:
            x = np.random.default_rng(0).random((batch, 1, 224, 224), dtype=np.float32)

            def step(x: np.ndarray = x, seg: Engine = seg, cls: Engine = cls) -> None:
                seg.infer(x)
                cls.infer(x)

            ips, cpu_ms = rate(step, batch, seconds)
            rows.append({"engine": label, "batch": batch, "images_per_s": ips, "cpu_ms": cpu_ms})
    return rows


def full_path_table(
    batches: list[int], seconds: float, image_size: int = 0
) -> list[dict[str, object]]:
    from screener.results import ThresholdInfo
    from screener.screening.models import ScreeningModels
    from screener.screening.prepare import prepare_instance
    from screener.settings import Settings
    from screener.testing.dicom_factory import (
        StudyIdentity,
        corpus_image,
        make_instance,
        pick_images,
        write_datasets,
    )

    cxr = ROOT.parent / "shared" / "data" / "cxr"
    settings = Settings()
    models = ScreeningModels.from_settings(settings)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        picked = pick_images(cxr, max(batches), split="test", view="PA")
        paths = write_datasets(
            [
                make_instance(
                    corpus_image(cxr, r["id"]),
                    study=StudyIdentity.new(),
                    bits_stored=12,
                    target_size=(image_size, image_size) if image_size else None,
                )
                for r in picked
            ],
            Path(tmp),
        )
        for batch in batches:
            chunk = paths[:batch]

            def step(chunk: list[Path] = chunk) -> None:
                prepared = [prepare_instance(p, settings) for p in chunk]
                models.infer(prepared, ThresholdInfo(0.5))

            ips, cpu_ms = rate(step, batch, seconds)
            rows.append(
                {
                    "engine": f"whole path {image_size or 'corpus'}px, ort x1",
                    "batch": batch,
                    "images_per_s": ips,
                    "cpu_ms": cpu_ms,
                }
            )
    return rows


def print_table(title: str, rows: list[dict[str, object]]) -> None:
    base = float(rows[0]["images_per_s"])  # type: ignore[arg-type]
    print(f"\n{title}")
    print(f"{'engine':32} {'batch':>5} {'images/s':>9} {'x baseline':>10} {'CPU ms/img':>10}")
    for row in rows:
        ips = float(row["images_per_s"])  # type: ignore[arg-type]
        cpu = float(row["cpu_ms"])  # type: ignore[arg-type]
        print(f"{row['engine']!s:32} {row['batch']!s:>5} {ips:9.2f} {ips / base:10.2f} {cpu:10.1f}")
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--full-path", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--image-size", type=int, default=0, help="store DICOMs at SxS (0: corpus size, <= 512)"
    )
    args = parser.parse_args()
    rows = engine_table(args.batches, args.seconds)
    print_table("segmenter + classifier engine calls (images/s; baseline = first row)", rows)
    if args.full_path:
        full = full_path_table(args.batches, args.seconds, args.image_size)
        print_table("whole per-image path: DICOM decode -> scores + CAM", full)
        rows += full
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
