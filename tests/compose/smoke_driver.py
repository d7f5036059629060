"""The compose smoke test's client side: studies into the stack's Orthanc, SRs counted back.

Runs inside the pacs-screener:cpu image on the host network (smoke.sh), so it needs nothing
on the host but Docker:

    python3 smoke_driver.py push --count 20 --cxr /cxr --state /state/studies.json
    python3 smoke_driver.py count --state /state/studies.json      # studies with >= 1 SR
    python3 smoke_driver.py wait --state /state/studies.json --timeout 600
    python3 smoke_driver.py http --port 18080                      # /healthz and /metrics

Orthanc is reached with HTTP basic auth (ORTHANC_URL, ORTHANC_USERNAME, ORTHANC_PASSWORD
from the environment). Each study is one real chest radiograph of the corpus test split
(../shared/data/cxr) wrapped as a CR instance by the project's DICOM factory, uploaded
to Orthanc over REST and sent by Orthanc to the modality "screener" by C-STORE, as a PACS
forwards a study.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

MIN_SIDE = 256  # the screening gate's default minimum rows/columns


def _orthanc(method: str, path: str, body: bytes | None = None, timeout: float = 120) -> Any:
    """One Orthanc REST call with basic auth; the JSON answer."""
    url = os.environ.get("ORTHANC_URL", "http://127.0.0.1:18042").rstrip("/") + path
    token = f"{os.environ['ORTHANC_USERNAME']}:{os.environ['ORTHANC_PASSWORD']}"
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    if body is not None:
        request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def push(count: int, cxr: Path, state: Path, modality: str) -> None:
    """Make ``count`` single-image CR studies, upload them, send them to the listener."""
    from pydicom.filewriter import dcmwrite

    from screener.testing.dicom_factory import (
        StudyIdentity,
        corpus_image,
        corpus_rows,
        make_instance,
    )

    rows = sorted(
        (r for r in corpus_rows(cxr) if r["split"] == "test" and r["view"] in ("PA", "AP")),
        key=lambda r: r["id"],
    )
    studies: list[str] = []
    for row in rows:
        if len(studies) == count:
            break
        pixels = corpus_image(cxr, row["id"])
        if min(pixels.shape) < MIN_SIDE:
            continue
        ds = make_instance(
            pixels, study=StudyIdentity.new(), modality="CR", view_position=row["view"]
        )
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        answer = _orthanc("POST", "/instances", buffer.getvalue())
        studies.append(str(answer["ParentStudy"]))
    if len(studies) < count:
        sys.exit(f"smoke driver: only {len(studies)} corpus images fit, {count} requested")
    state.write_text(json.dumps(studies))
    started = time.monotonic()
    for study in studies:  # one C-STORE association per study, as a PACS forwards them
        body = json.dumps({"Resources": [study], "Synchronous": True}).encode()
        _orthanc("POST", f"/modalities/{modality}/store", body)
    print(f"pushed {len(studies)} studies in {time.monotonic() - started:.1f} s")


def sr_counts(state: Path) -> dict[str, int]:
    """SR instances per pushed study, as Orthanc holds them now."""
    counts: dict[str, int] = {}
    for study in json.loads(state.read_text()):
        series = _orthanc("GET", f"/studies/{study}/series?expand")
        counts[study] = sum(
            len(s["Instances"]) for s in series if s["MainDicomTags"].get("Modality") == "SR"
        )
    return counts


def wait(state: Path, timeout: float, settle: float) -> int:
    """Wait until every study has an SR, then ``settle`` seconds more (a duplicate SR
    would arrive late); print the smoke line; exit status 0 only when K = N."""
    deadline = time.monotonic() + timeout
    counts = sr_counts(state)
    while time.monotonic() < deadline and not all(counts.values()):
        time.sleep(5)
        counts = sr_counts(state)
        done = sum(1 for c in counts.values() if c)
        print(f"  {done}/{len(counts)} studies have an SR", flush=True)
    if all(counts.values()):
        time.sleep(settle)
        counts = sr_counts(state)
    duplicated = sum(1 for c in counts.values() if c > 1)
    missing = sum(1 for c in counts.values() if c == 0)
    exactly_one = sum(1 for c in counts.values() if c == 1)
    if duplicated or missing:
        print(f"  {missing} studies without an SR, {duplicated} with more than one")
    print(f"compose smoke: {exactly_one}/{len(counts)} studies with exactly one SR")
    return 0 if exactly_one == len(counts) else 1


def check_http(port: int) -> int:
    """GET /healthz (200) and /metrics (200, Prometheus text) of the HTTP service."""
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=15) as response:
            health = response.status
        with urllib.request.urlopen(base + "/metrics", timeout=15) as response:
            metrics = response.status
            text = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"http: {base} did not answer: {exc}")
        return 1
    ok = health == 200 and metrics == 200 and "# TYPE" in text
    print(f"http: /healthz {health}, /metrics {metrics} ({len(text.splitlines())} lines)")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--cxr", type=Path, required=True)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--modality", default="screener")
    c = sub.add_parser("count")
    c.add_argument("--state", type=Path, required=True)
    w = sub.add_parser("wait")
    w.add_argument("--state", type=Path, required=True)
    w.add_argument("--timeout", type=float, default=600)
    w.add_argument("--settle", type=float, default=20)
    h = sub.add_parser("http")
    h.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.command == "push":
        push(args.count, args.cxr, args.state, args.modality)
    elif args.command == "count":
        print(sum(1 for c in sr_counts(args.state).values() if c))
    elif args.command == "wait":
        sys.exit(wait(args.state, args.timeout, args.settle))
    else:
        sys.exit(check_http(args.port))


if __name__ == "__main__":
    main()
