"""Hostile DIMSE input (issue 8, points 1 and 3): the port stays bounded and answers its peers.

One dicom-import subprocess per test (so RSS, threads and open files are its own) in front of
the fault suite's Orthanc (conftest.py).
Invariant of every scenario: a normal C-ECHO, and a C-STORE where cheap, is answered within
2 s during and after the attack.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from dicom_adapter.dimse import pdu
from tests.rig import (
    VERIFICATION,
    Importer,
    Orthanc,
    ProcStatus,
    echo,
    generate_ct_series,
    http_get,
    proc_status,
    send_file,
    wait_until,
)

ACSE_TIMEOUT = 2.0
MAX_ASSOCIATIONS = 4
MAX_PENDING = 64
ANSWER_WITHIN = 2.0
CLAIM = (4 << 30) - 1  # a PDU header claiming 4 GiB (the largest length there is)
CLAIMING_CONNECTIONS = 20


@pytest.fixture
def importer(orthanc: Orthanc, tmp_path: Path) -> Iterator[Importer]:
    with Importer(
        orthanc.dicomweb_url,
        f"--acse_timeout={ACSE_TIMEOUT}",
        f"--max_associations={MAX_ASSOCIATIONS}",
        f"--max_pending_associations={MAX_PENDING}",
        log_dir=tmp_path,
    ) as running:
        yield running


# ------------------------------------------------------------------------------------------
# what a user sees


def timed(action: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def assert_echo_in_time(importer: Importer) -> None:
    ok, took = timed(lambda: echo("127.0.0.1", importer.port, importer.aet, timeout=5.0))
    assert ok, "C-ECHO not answered"
    assert took < ANSWER_WITHIN, f"C-ECHO took {took:.2f} s"


def assert_store_in_time(importer: Importer, folder: Path) -> None:
    (path,) = generate_ct_series(folder / generate_uid(), 1, rows=16, cols=16)
    status, took = timed(
        lambda: send_file("127.0.0.1", importer.port, importer.aet, path, timeout=5.0)
    )
    assert status == 0x0000, f"C-STORE answered {status!r}"
    assert took < ANSWER_WITHIN, f"C-STORE took {took:.2f} s"


def pid_of(importer: Importer) -> int:
    assert importer.proc is not None
    return importer.proc.pid


def connect(importer: Importer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", importer.port), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the importer closes (or resets) the connection within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def first_pdu_type(sock: socket.socket, timeout: float) -> int | None:
    """The type of the first PDU the importer answers with (None: closed without one)."""
    sock.settimeout(timeout)
    try:
        head = sock.recv(6)
    except ConnectionResetError:
        return None
    return head[0] if head else None


def associate_rq(
    *, called: str = "IMPORTER", calling: str = "HOSTILE", abstract_syntax: str = VERIFICATION
) -> bytes:
    """An A-ASSOCIATE-RQ from the production codec, proposing one context."""
    context = pdu.ProposedContext(1, abstract_syntax, (ImplicitVRLittleEndian,))
    return pdu.associate_rq(calling, called, [context], 16384)


def with_contexts(count: int) -> bytes:
    """An A-ASSOCIATE-RQ with `count` Verification contexts, hand-built on purpose: past 128
    the context IDs wrap and repeat (the codec refuses to write that)."""
    body = pdu.associate_rq("HOSTILE", "IMPORTER", [], 16384)[6:]  # no context
    split = 68 + 4 + len(pdu.APPLICATION_CONTEXT)  # after the application context item
    syntaxes = item(0x30, VERIFICATION.encode()) + item(0x40, ImplicitVRLittleEndian.encode())
    contexts = b"".join(
        item(0x20, bytes(((2 * index + 1) & 0xFF, 0, 0, 0)) + syntaxes) for index in range(count)
    )
    body = body[:split] + contexts + body[split:]
    return pdu.pdu_header(pdu.A_ASSOCIATE_RQ, len(body)) + body


def item(item_type: int, value: bytes) -> bytes:
    """A raw item (type, reserved, 16-bit length) for the hand-built malformed requests."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


# ------------------------------------------------------------------------------------------
# point 1


def test_pdu_claiming_4_gib_is_aborted_without_allocating(importer: Importer) -> None:
    pid = pid_of(importer)
    assert_echo_in_time(importer)  # warm: the first association loads code
    before = proc_status(pid).rss_kib
    sockets = [connect(importer) for _ in range(CLAIMING_CONNECTIONS)]
    try:
        for sock in sockets:
            sock.sendall(pdu.pdu_header(pdu.A_ASSOCIATE_RQ, CLAIM) + b"\x00\x01\x00\x00")
        answers = [first_pdu_type(sock, 5.0) for sock in sockets]
        peak = proc_status(pid).rss_kib
    finally:
        for sock in sockets:
            sock.close()
    assert set(answers) <= {pdu.A_ABORT, None}, answers  # A-ABORT (or a reset right behind it)
    assert answers.count(pdu.A_ABORT) >= CLAIMING_CONNECTIONS // 2, answers
    assert peak - before < 20 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"
    assert_echo_in_time(importer)
    assert proc_status(pid).rss_kib - before < 20 * 1024


def test_pdu_longer_than_negotiated_is_aborted_after_association(importer: Importer) -> None:
    sock = connect(importer)
    try:
        sock.sendall(associate_rq(called=importer.aet))
        assert first_pdu_type(sock, 5.0) == pdu.A_ASSOCIATE_AC  # (we skip reading its body)
        # one byte more than --max_pdu_size (256 KiB) plus header slack: refused unread
        sock.sendall(pdu.pdu_header(pdu.P_DATA_TF, 262144 + 7) + bytes(10))
        assert abort_after_accept(sock, 2.0)
    finally:
        sock.close()
    assert_echo_in_time(importer)


def abort_after_accept(sock: socket.socket, timeout: float) -> bool:
    """True once an A-ABORT arrives (after the rest of the A-ASSOCIATE-AC) within `timeout`."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
            if pdu.pdu_header(pdu.A_ABORT, 4) in received:
                return True
    except (TimeoutError, ConnectionResetError):
        return False
    return False


# ------------------------------------------------------------------------------------------
# point 3


def test_half_open_connections_neither_take_slots_nor_burn_cpu(
    importer: Importer, tmp_path: Path
) -> None:
    pid = pid_of(importer)
    assert_echo_in_time(importer)
    baseline = proc_status(pid)
    half = associate_rq(called=importer.aet)[:40]  # half an A-ASSOCIATE-RQ
    stalled = [connect(importer) for _ in range(MAX_PENDING)]
    for sock in stalled[: MAX_PENDING // 2]:
        sock.sendall(half)
    try:
        # all of them fit the pending bound: none takes one of the 4 association slots
        assert_echo_in_time(importer)
        assert_store_in_time(importer, tmp_path)
        assert http_get(importer.metrics_url + "/readyz").status_code == 200
        # and every one is closed once --acse_timeout has passed
        waited_from = time.monotonic()
        cpu_before = proc_status(pid).cpu_seconds
        assert all(closed_by_peer(sock, ACSE_TIMEOUT + 3.0) for sock in stalled)
        assert time.monotonic() - waited_from < ACSE_TIMEOUT + 3.0
        time.sleep(1.0)  # a measuring window: what dead connections cost (main spun at 170 %)
        elapsed = time.monotonic() - waited_from
        cpu = proc_status(pid).cpu_seconds - cpu_before
        assert cpu / elapsed < 0.25, f"{cpu:.2f} s of CPU in {elapsed:.2f} s"
    finally:
        for sock in stalled:
            sock.close()
    assert_echo_in_time(importer)
    assert_store_in_time(importer, tmp_path)
    assert_back_to_baseline(pid, baseline)


def metric(importer: Importer, name: str) -> float:
    """The value of dicomadapter_import_<name> on /metrics (unlabelled)."""
    text = http_get(importer.metrics_url + "/metrics").text
    prefix = f"dicomadapter_import_{name} "
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


def test_pending_bound_drops_the_oldest_first(importer: Importer) -> None:
    extra = 16
    held = [connect(importer) for _ in range(MAX_PENDING + extra)]
    try:
        # the oldest `extra` are closed at once, long before --acse_timeout
        assert all(closed_by_peer(sock, ACSE_TIMEOUT / 2) for sock in held[:extra])
        assert not closed_by_peer(held[-1], 0.1)
        # an operator sees it: how many wait, how many were dropped
        wait_until(
            lambda: metric(importer, "pending_associations") == MAX_PENDING,
            5.0,
            f"{MAX_PENDING} pending associations on /metrics",
        )
        assert metric(importer, "pending_dropped_total") == extra
        assert_echo_in_time(importer)
    finally:
        for sock in held:
            sock.close()


def test_connect_flood_and_resets(importer: Importer, tmp_path: Path) -> None:
    pid = pid_of(importer)
    assert_echo_in_time(importer)
    baseline = proc_status(pid)
    stop = threading.Event()
    flooded = [0]

    def flood() -> None:
        while not stop.is_set():
            try:
                sock = connect(importer)
            except OSError:
                continue
            if flooded[0] % 2:  # every other one resets (RST) instead of closing
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.sendall(associate_rq(called=importer.aet)[:30])
            sock.close()
            flooded[0] += 1
            stop.wait(0.01)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        rounds = 0
        while flooded[0] < 120 or rounds < 3:  # about 1.5 s of flood at ~80 connections/s
            assert_echo_in_time(importer)
            assert_store_in_time(importer, tmp_path)
            rounds += 1
    finally:
        stop.set()
        thread.join(5.0)
    # a reset in the middle of an established association, too
    established = connect(importer)
    established.sendall(associate_rq(called=importer.aet))
    assert first_pdu_type(established, 5.0) == pdu.A_ASSOCIATE_AC
    established.sendall(pdu.pdu_header(pdu.P_DATA_TF, 1000) + bytes(10))  # then a cut PDU
    established.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    established.close()
    assert_echo_in_time(importer)
    assert_back_to_baseline(pid, baseline)
    wait_until(lambda: "lost: [Errno 104]" in importer.log_text(), 5.0, "the reset in the log")
    assert "Traceback" not in importer.log_text()
    levels = [record.get("level") for record in importer.log_records()]
    assert "ERROR" not in levels


@pytest.mark.parametrize(
    ("name", "payload", "answers"),
    [
        pytest.param(  # random bytes: named, so the test ID is the same in every run
            "garbage", b"\x01\x00\x00\x00\x00\x40" + os.urandom(64), {0x03, 0x07}, id="garbage"
        ),
        ("P-DATA first", b"\x04\x00\x00\x00\x00\x06" + bytes(6), {0x07}),
        ("unknown PDU type", b"\x99\x00\x00\x00\x00\x02\x00\x00", {0x07}),
        ("200 presentation contexts", with_contexts(200), {0x03, 0x07}),
        ("over-long UID", associate_rq(abstract_syntax="1." * 100 + "1"), {0x03, 0x07}),
        ("control characters in AE title", associate_rq(calling="\x01\x02\x1b[2J"), {0x03}),
    ],
)
def test_malformed_association_requests_are_refused_quickly(
    importer: Importer, name: str, payload: bytes, answers: set[int]
) -> None:
    sock = connect(importer)
    try:
        started = time.monotonic()
        sock.sendall(payload)
        answer = first_pdu_type(sock, 5.0)
        took = time.monotonic() - started
    finally:
        sock.close()
    assert answer in answers, f"{name}: answered PDU type {answer!r}"
    assert took < 1.0, f"{name}: answered after {took:.2f} s"
    assert_echo_in_time(importer)


def test_readyz_turns_not_ready_when_every_slot_is_taken(importer: Importer) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)]
    try:
        while len(held) < MAX_ASSOCIATIONS:
            held.append(ae.associate("127.0.0.1", importer.port, ae_title=importer.aet))
        assert all(assoc.is_established for assoc in held)
        assert http_get(importer.metrics_url + "/readyz").status_code == 503
    finally:
        for assoc in held:
            assoc.release()
    wait_until(
        lambda: http_get(importer.metrics_url + "/readyz").status_code == 200, 5.0, "/readyz 200"
    )
    assert http_get(importer.metrics_url + "/healthz").status_code == 200


def assert_back_to_baseline(pid: int, baseline: ProcStatus) -> None:
    """RSS, threads and open files return to within 10 % of `baseline` (polled, 10 s)."""

    def back() -> bool:
        now = proc_status(pid)
        return (
            now.rss_kib <= baseline.rss_kib * 1.1
            and now.threads <= baseline.threads * 1.1 + 1
            and now.fds <= baseline.fds * 1.1 + 1
        )

    wait_until(
        back,
        10.0,
        "RSS, threads and open files back to baseline",
        interval=0.2,
        detail=lambda: f"baseline {baseline}, now {proc_status(pid)}",
    )
