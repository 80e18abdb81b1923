"""Benchmark: what the spool's room check costs per C-STORE, against a walk of the spool.

A local spool (spool/local.py) with N queued files of 512 KiB (sparse: no disk written) and a
byte cap. Times, per call: `refusal(size)` (the per-C-STORE check: one statvfs and the byte
counter), `has_room()` (/readyz), and `recount()` (the walk that is done at start and at most
every RECOUNT_SECONDS while over the cap), the last being what a walk per C-STORE would cost.

Usage: python bench/bench_spool_room.py [--files 10000] [--calls 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_adapter.spool.local import LocalSpool

SIZE = 512 << 10


def per_call(function: Callable[[], object], calls: int) -> float:
    """Mean seconds per call over `calls` calls (a warm-up call first)."""
    function()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spool-room-") as tmp:
        root = Path(tmp) / "spool"
        spool = LocalSpool(root, headroom_bytes=0)
        for index in range(args.files):
            with (spool.queue / f"{index:020d}-0-1.2.3.{index}.dcm").open("wb") as stream:
                stream.truncate(SIZE)  # sparse: the size without the writes
        spool.close()
        spool = LocalSpool(root, headroom_bytes=0, max_bytes=(args.files + 10) * SIZE)
        check = per_call(lambda: spool.refusal(SIZE), args.calls)
        ready = per_call(spool.has_room, args.calls)
        walk = per_call(spool.recount, max(1, min(20, args.calls)))
        spool.close()
    print(f"spool of {args.files} queued files, cap set:")
    print(f"  refusal(size) per C-STORE: {check * 1e6:8.1f} us")
    print(f"  has_room() per /readyz:    {ready * 1e6:8.1f} us")
    print(f"  recount() (a full walk):   {walk * 1e6:8.1f} us ({walk / check:.0f}x the check)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
