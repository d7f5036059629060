"""The receive budget and the per-message caps of :mod:`screener.dicom.fast_receive`.

A message's data set bytes stay charged while it is held, and only then: given back when
the handler is done with it and when the association ends (not at the next command
fragment); command sets are capped; the DUL's end runs (wake-up sockets closed).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import screener.dicom.listener as listener_module
from screener.dicom.fast_receive import ReceiveBudget
from screener.dicom.listener import ListenerHandle, start_listener
from screener.settings import Settings
from tests.listener_support import (
    RawSCU,
    _pdu,
    _pdv,
    _status_of,
    c_store_command,
    encode_body,
    read_pdu,
    small_instance,
    spool_files,
)

MIB = 1024 * 1024
COMMAND_CAP = 64 * 1024  # fast_receive.MAX_COMMAND_BYTES


@pytest.fixture
def start(sqlite_settings: Settings) -> Iterator[Callable[..., ListenerHandle]]:
    """Start a listener with the given ``listener.*`` settings (stopped after the test)."""
    handles: list[ListenerHandle] = []

    def run(**listener: Any) -> ListenerHandle:
        sqlite_settings.listener.port = 0
        sqlite_settings.study_quiet_seconds = 3600
        for key, value in listener.items():
            setattr(sqlite_settings.listener, key, value)
        handle = start_listener(sqlite_settings, migrate=False, assemble=False)
        handles.append(handle)
        return handle

    yield run
    for handle in handles:
        handle.stop(drain_seconds=5)


def _budget(handle: ListenerHandle) -> ReceiveBudget:
    return handle.servers[0].server.limits.budget


def _settles_at_zero(budget: ReceiveBudget, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if budget.used == 0:
            return True
        time.sleep(0.02)
    return budget.used == 0


def _ended(sock: socket.socket, seconds: float = 10.0) -> bool:
    """Whether the listener aborted or closed the association within ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data or data[0] == 0x07:  # closed, or an A-ABORT
                return True
    except TimeoutError:
        return False
    except OSError:  # reset: closed
        return True
    return False


def test_budget_is_given_back_when_associations_end(
    start: Callable[..., ListenerHandle],
) -> None:
    """Six ~10 MiB instances, one per association, under a 32 MiB budget: all stored (the
    DUL's end, which gives the last data set's bytes back, runs)."""
    handle = start(max_dataset_mb=12, receive_budget_mb=32)
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(6):
        sop_class, sop_instance, ts, body = encode_body(small_instance(size=2300, seed=i))
        scu = RawSCU(handle.port, [(sop_class, [ts])], calling="PACS")
        assert scu.store(sop_class, sop_instance, ts, body) == 0x0000, f"association {i + 1}"
        scu.release()
    assert _settles_at_zero(_budget(handle))
    time.sleep(0.5)
    assert len(os.listdir("/proc/self/fd")) <= fds + 2  # wake-up socket pairs closed


def test_budget_is_given_back_once_the_store_is_answered(
    start: Callable[..., ListenerHandle],
) -> None:
    """An idle association that stored one instance holds none of the budget."""
    handle = start(max_dataset_mb=12, receive_budget_mb=16)
    a = encode_body(small_instance(size=2300, seed=1))  # ~10 MiB
    b = encode_body(small_instance(size=2300, seed=2))
    scu_a = RawSCU(handle.port, [(a[0], [a[2]])], calling="PACS_A")
    try:
        assert scu_a.store(*a) == 0x0000
        assert _settles_at_zero(_budget(handle), 2.0)  # A still open, idle
        scu_b = RawSCU(handle.port, [(b[0], [b[2]])], calling="PACS_B")
        assert scu_b.store(*b) == 0x0000
        scu_b.release()
    finally:
        scu_a.release()


def test_empty_command_fragments_do_not_reset_the_data_set_cap(
    start: Callable[..., ListenerHandle], sqlite_settings: Settings
) -> None:
    """Empty command PDVs between data set fragments: the message is still one message, and
    a data set larger than max_dataset_mb ends the association."""
    handle = start(max_dataset_mb=2, receive_budget_mb=64)
    sop_class, sop_instance, ts, body = encode_body(small_instance(size=1600))  # ~5 MiB
    scu = RawSCU(handle.port, [(sop_class, [ts])])
    cid = scu.contexts[sop_class][ts]
    out = [_pdu([_pdv(cid, 0x03, c_store_command(sop_class, sop_instance, 1))])]
    step = MIB // 2
    for begin in range(0, len(body), step):
        out.append(_pdu([_pdv(cid, 0x01, b"")]))  # an empty command fragment
        last = begin + step >= len(body)
        out.append(_pdu([_pdv(cid, 0x02 if last else 0x00, body[begin : begin + step])]))
    assert _sending_ends_the_association(scu, b"".join(out))
    assert not spool_files(sqlite_settings.spool_dir)
    assert _settles_at_zero(_budget(handle))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def _sending_ends_the_association(scu: RawSCU, data: bytes) -> bool:
    """Send ``data`` from a thread (the listener may stop reading) and whether the listener
    ended the association; the socket is closed afterwards."""
    sender = threading.Thread(target=lambda: _send_quietly(scu.sock, data))
    sender.start()
    try:
        return _ended(scu.sock)
    finally:
        sender.join(10)
        scu.sock.close()


def test_pipelined_data_sets_stay_charged_until_handled(
    start: Callable[..., ListenerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    """C-STOREs sent without waiting for the responses, the handler slow: the data sets
    waiting for it count against the budget (the association ends past it), and the
    budget is whole again once the association has ended."""
    real = listener_module.record_instance

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(listener_module, "record_instance", slow)
    handle = start(max_dataset_mb=5, receive_budget_mb=12)
    budget = _budget(handle)
    messages = [encode_body(small_instance(size=1450, seed=i)) for i in range(8)]  # ~4 MiB
    sop_class, _, ts, _ = messages[0]
    scu = RawSCU(handle.port, [(sop_class, [ts])])
    cid = scu.contexts[sop_class][ts]
    out = []
    for i, (c, instance, _, body) in enumerate(messages):
        out.append(_pdu([_pdv(cid, 0x03, c_store_command(c, instance, i + 1))]))
        for begin in range(0, len(body), MIB):
            last = begin + MIB >= len(body)
            out.append(_pdu([_pdv(cid, 0x02 if last else 0x00, body[begin : begin + MIB])]))
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], budget.used)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sender = threading.Thread(target=lambda: _send_quietly(scu.sock, b"".join(out)))
    sender.start()
    statuses: list[int | None] = []
    scu.sock.settimeout(30)
    try:
        while len(statuses) < len(messages):
            pdu = read_pdu(scu.sock)
            if pdu is None or pdu[0] != 0x04:
                break
            statuses.append(_status_of(pdu[1][6:]))
    except OSError:
        pass
    finally:
        sender.join(10)
        scu.sock.close()
    assert _settles_at_zero(budget)
    stop.set()
    watcher.join()
    assert len(statuses) < len(messages)  # not all eight (32 MiB) held under 12 MiB
    assert peak[0] > 4 * MIB  # a waiting data set was counted


def test_a_command_set_larger_than_the_cap_ends_the_association(
    start: Callable[..., ListenerHandle],
) -> None:
    """Command fragments that never end: the association is aborted past the cap."""
    handle = start(max_dataset_mb=8, receive_budget_mb=16)
    ct = "1.2.840.10008.5.1.4.1.1.1"
    scu = RawSCU(handle.port, [(ct, ["1.2.840.10008.1.2.1"])])
    cid = next(iter(scu.contexts[ct].values()))
    flood = _pdu([_pdv(cid, 0x01, b"\0" * (16 * 1024))]) * (4 * COMMAND_CAP // 16384)
    assert _sending_ends_the_association(scu, flood)
