"""Fuzzing the listener process: mutated C-STOREs and raw PDUs (issue 9, bounded in time).

Against a real ``screener listen`` under an address-space limit: 5,000 mutated C-STOREs of
small valid CR instances (byte flips, truncations, cut-out and repeated slices, absurd
length fields) over reused associations, and 1,000 raw PDUs (random bytes, absurd lengths
for every PDU type, truncated and slow association requests, garbage after association).
Asserted: the listener stays up, its peak RSS stays under a bound, valid stores mixed in
succeed during and after, exactly the acknowledged data sets are stored (DB rows and spool
files), every stored file passes the listener's own checks, and nothing lands outside the
spool. Seeded, so a failure reproduces; ~60-90 s on a loaded 2-core machine.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from blake3 import blake3

from screener.dicom.dataset_check import check_pixel_encoding, check_structure, read_header
from screener.testing.dicom_factory import StudyIdentity
from tests.listener_support import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    ListenerProcess,
    RawSCU,
    associate_rq,
    database_rows,
    encode_body,
    small_instance,
)

SEED = int(os.environ.get("SCREENER_FUZZ_SEED", "20240909"))
N_STORES = 5000
N_RAW = 1000
CR = "1.2.840.10008.5.1.4.1.1.1"
GIB = 1024**3
RSS_BOUND_MIB = 400  # the listener idles at ~120 MiB


def _mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    kind = rng.randrange(7)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2:  # cut out a slice (an element, or part of one, removed)
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 64)]
    elif kind == 3:  # repeat a slice
        start = rng.randrange(len(data))
        data[start:start] = data[start : start + rng.randint(1, 64)]
    elif kind == 4:  # an absurd 32-bit length somewhere
        pos = rng.randrange(0, len(data) - 4)
        data[pos : pos + 4] = struct.pack("<L", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30]))
    elif kind == 5:  # an absurd 16-bit length somewhere
        pos = rng.randrange(0, len(data) - 2)
        data[pos : pos + 2] = struct.pack("<H", rng.choice([0xFFFF, 0xFFFE, 0x8001]))
    else:  # random garbage appended
        data += rng.randbytes(rng.randint(1, 200))
    return bytes(data)


def _raw_payload(rng: random.Random, request: bytes) -> tuple[bytes, bytes, float]:
    """(payload before association, payload after an accepted association, trickle seconds)."""
    kind = rng.randrange(6)
    absurd = [0, 1, 3, 5, 67, 65537, 1 << 24, 0x7FFFFFFF, 0xFFFFFFFF]
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300)), b"", 0.0
    if kind == 1:
        pdu_type = rng.choice([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF])
        header = struct.pack(">BBL", pdu_type, 0, rng.choice(absurd))
        return header + rng.randbytes(rng.randint(0, 64)), b"", 0.0
    if kind == 2:  # a truncated association request
        return request[: rng.randrange(1, len(request))], b"", 0.0
    if kind == 3:  # garbage after association
        return request, rng.randbytes(rng.randint(1, 300)), 0.0
    if kind == 4:  # an absurd PDU after association
        pdu_type = rng.choice([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x09])
        return request, struct.pack(">BBL", pdu_type, 0, rng.choice(absurd)) + b"\0" * 10, 0.0
    return request[: rng.randrange(7, len(request))], b"", 1.5  # a slow, incomplete peer


def _raw_connection(port: int, before: bytes, after: bytes, trickle: float) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if trickle:
                step = max(1, len(before) // 10)
                for i in range(0, len(before), step):
                    sock.sendall(before[i : i + step])
                    time.sleep(trickle / 10)
            else:
                sock.sendall(before)
            if after:
                sock.settimeout(10)
                header = sock.recv(6)
                if header[:1] == b"\x02":
                    sock.sendall(after)
            sock.settimeout(0.5)
            try:
                sock.recv(1 << 16)
            except OSError:
                pass
    except OSError:
        pass  # the listener closing on us is the expected answer


def test_fuzzed_cstores_and_raw_pdus(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    listener = ListenerProcess(
        tmp_path / "data",
        env={
            "SCREENER_LISTENER__ASSOCIATION_REQUEST_TIMEOUT_SECONDS": "2",
            "SCREENER_LISTENER__MAX_PENDING_PER_ADDRESS": "256",
            "SCREENER_LISTENER__MAX_ASSOCIATIONS_PER_ADDRESS": "64",
        },
    )
    listener.start(memory_limit_bytes=3 * GIB)
    peak_rss = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set() and listener.alive():
            try:
                peak_rss[0] = max(peak_rss[0], listener.status_kb("VmRSS"))
            except (OSError, KeyError):
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    study = StudyIdentity.new()
    bases = [
        encode_body(
            small_instance(
                study,
                seed=i,
                size=16,
                instance_number=i + 1,
                transfer_syntax=pydicom.uid.ImplicitVRLittleEndian if i % 2 else EXPLICIT_VR_LE,  # type: ignore[arg-type]
            )
        )
        for i in range(6)
    ]
    acknowledged: set[str] = set()
    valid_sent: list[str] = []
    statuses: dict[int | None, int] = {}
    contexts = [(CR, [EXPLICIT_VR_LE]), (CR, [IMPLICIT_VR_LE])]
    started = time.monotonic()
    try:
        # raw PDUs run in the background while the C-STOREs are fuzzed
        request = associate_rq(contexts, calling="FUZZRAW")
        raw_jobs = [_raw_payload(rng, request) for _ in range(N_RAW)]
        pool = ThreadPoolExecutor(max_workers=6)
        raw_futures = [pool.submit(_raw_connection, listener.port, *job) for job in raw_jobs]

        scu: RawSCU | None = None
        for n in range(N_STORES):
            if scu is None:
                scu = RawSCU(listener.port, contexts, calling="FUZZER")
            if n % 50 == 0:  # a pristine valid store: must succeed, fuzzing or not
                ds = small_instance(study, seed=1000 + n, size=16, instance_number=1000 + n)
                sop_class, uid, ts, body = encode_body(ds)
                status = scu.store(sop_class, uid, ts, body)
                assert status == 0, f"valid store {n} answered {status}"
                acknowledged.add("blake3:" + blake3(body).hexdigest())
                valid_sent.append(uid)
                continue
            sop_class, uid, ts, body = bases[rng.randrange(len(bases))]
            mutated = _mutate(rng, body)
            status = scu.store(sop_class, uid, ts, mutated)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 0:
                acknowledged.add("blake3:" + blake3(mutated).hexdigest())
            elif status is None:  # the listener ended the association: a new one
                scu.sock.close()
                scu = None
        if scu is not None:
            scu.release()
        for future in raw_futures:
            future.result(timeout=120)
        pool.shutdown()
        assert listener.alive(), listener.log_text()[-3000:]
        after = RawSCU(listener.port, contexts, calling="AFTER")
        ds = small_instance(study, seed=99999, size=16)
        sop_class, uid, ts, body = encode_body(ds)
        assert after.store(sop_class, uid, ts, body) == 0
        acknowledged.add("blake3:" + blake3(body).hexdigest())
        after.release()
        elapsed = time.monotonic() - started
    finally:
        sampling.set()
        sampler.join(timeout=5)
        hwm = listener.status_kb("VmHWM") if listener.alive() else -1
        listener.stop()
    data_dir = listener.data_dir
    rows = database_rows(data_dir)
    stored_hashes = {digest for _, digest, _ in rows}
    assert stored_hashes == acknowledged, "exactly the acknowledged data sets are stored"
    spool = data_dir / "spool"
    files = sorted(spool.rglob("*.dcm"))
    assert len(files) == len(rows)
    digest_of_file = {str(Path(file_path).resolve()): digest for _, digest, file_path in rows}
    for path in files:
        assert path.resolve().is_relative_to(spool.resolve())
        raw = path.read_bytes()
        meta = pydicom.filereader.read_file_meta_info(path)
        body = raw[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
        assert "blake3:" + blake3(body).hexdigest() == digest_of_file[str(path.resolve())]
        ts = str(meta.TransferSyntaxUID)
        length = check_structure(body, ts)
        check_pixel_encoding(body, ts, length, read_header(body, ts, length))
        pydicom.dcmread(path)
    new_files = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    outside = [
        p
        for p in new_files
        if not p.resolve().is_relative_to(spool.resolve())
        and not p.name.startswith("screener.sqlite3")
        and p != listener.log_path
    ]
    assert outside == [], outside
    print(
        f"\nfuzz seed {SEED}: {N_STORES} C-STOREs ({len(valid_sent)} pristine) and {N_RAW} raw "
        f"PDU connections in {elapsed:.0f} s; statuses {statuses}; "
        f"{len(rows)} stored; peak RSS {max(peak_rss[0], hwm) // 1024} MiB"
    )
    assert max(peak_rss[0], hwm) < RSS_BOUND_MIB * 1024
