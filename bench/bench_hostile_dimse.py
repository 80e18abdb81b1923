"""Measure: dicom-import under hostile DIMSE connections (issue 8 points 1 and 3).

One Orthanc and one dicom-import subprocess (default flags, --acse_timeout 30 s). Prints the
importer's RSS, threads and open files (/proc) and C-ECHO latency: at baseline; with 20
connections whose PDU header claims 4 GiB; while 200 clients hold half an A-ASSOCIATE-RQ
(with the CPU the importer spends over 3 s of that); during a flood of ~80 connects/s that
close at once; and afterwards.

Usage: python bench/bench_hostile_dimse.py
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import Importer, Orthanc, echo, proc_status


def echo_ms(importer: Importer) -> float:
    """Milliseconds for one C-ECHO association (-1 when it failed)."""
    started = time.monotonic()
    ok = echo("127.0.0.1", importer.port, importer.aet, timeout=5.0)
    return round((time.monotonic() - started) * 1000, 1) if ok else -1.0


def connect(importer: Importer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", importer.port), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def main() -> int:
    with Orthanc() as orthanc, Importer(orthanc.dicomweb_url) as importer:
        assert importer.proc is not None
        pid = importer.proc.pid
        echo_ms(importer)
        print("baseline", proc_status(pid), flush=True)
        claims = [connect(importer) for _ in range(20)]
        for sock in claims:
            sock.sendall(struct.pack(">BBI", 0x01, 0, (4 << 30) - 1) + b"\0\1\0\0")
        time.sleep(0.5)  # measuring window
        print("20 x 4 GiB claims:", proc_status(pid), "echo ms", echo_ms(importer), flush=True)
        for sock in claims:
            sock.close()
        half = b"\x01\x00\x00\x00\x01\x00" + b"\x00\x01\x00\x00" + importer.aet.encode().ljust(16)
        held = []
        for _ in range(200):
            sock = connect(importer)
            sock.sendall(half)
            held.append(sock)
        print("200 half-open:", proc_status(pid), "echo ms", echo_ms(importer), flush=True)
        before = proc_status(pid).cpu_seconds
        time.sleep(3.0)  # measuring window
        spent = proc_status(pid).cpu_seconds - before
        print(f"CPU while they idle: {spent / 3.0:.1%}", flush=True)
        for sock in held:
            sock.close()
        latencies = []
        end = time.monotonic() + 3.0
        connects = 0
        while time.monotonic() < end:
            for _ in range(8):
                connect(importer).close()
                connects += 1
            if connects % 40 == 0:
                latencies.append(echo_ms(importer))
            time.sleep(0.1)
        print(f"flood: {connects} connects in 3 s; echo ms {latencies}", flush=True)
        time.sleep(1.0)  # let closed connections go
        print("after", proc_status(pid), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
