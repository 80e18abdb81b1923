"""Benchmark: the kernel's share of relaying an instance, the floor of any fetch-and-send.

A producer process writes N messages of `--kb` KiB into a loopback TCP socket; this process
reads each whole into one preallocated buffer (`recv_into`) and writes it on to a second
socket, whose reader (a third process) discards it. The relay's CPU per message is almost all
system time: the copies into and out of the kernel and the loopback TCP work, which any
consumer that fetches an instance over HTTP and sends it over DIMSE pays as well, whatever its
language. Python's own share (a handful of calls per message) is printed separately.

Usage: python bench/bench_relay.py [--messages 2000] [--kb 514] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """(client, server side) of one loopback TCP connection, TCP_NODELAY on both."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def child(run: Callable[[], None]) -> int:
    """Fork a child running `run()`; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(0)
    return pid


def relay_once(messages: int, size: int) -> dict[str, float]:
    """One measurement: the relay's user and system CPU (ms) and wall time per message."""
    producer, relay_in = connected_pair()
    relay_out, sink = connected_pair()

    def produce() -> None:
        data = os.urandom(size)
        for _ in range(messages):
            producer.sendall(data)

    def discard() -> None:
        view = memoryview(bytearray(1 << 20))
        left = messages * size
        while left > 0:
            got = sink.recv_into(view)
            if not got:
                return
            left -= got

    pids = [child(produce), child(discard)]
    producer.close()
    sink.close()
    view = memoryview(bytearray(size))
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(messages):
        got = 0
        while got < size:
            n = relay_in.recv_into(view[got:])
            if not n:
                raise RuntimeError("the producer stopped early")
            got += n
        relay_out.sendall(view)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    relay_out.close()
    relay_in.close()
    for pid in pids:
        os.waitpid(pid, 0)
    return {
        "user_ms": (after.ru_utime - before.ru_utime) * 1e3 / messages,
        "system_ms": (after.ru_stime - before.ru_stime) * 1e3 / messages,
        "wall_ms": wall * 1e3 / messages,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--kb", type=int, default=514, help="message size (a 512x512 CT: 514)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.messages < 1 or args.kb < 1 or args.reps < 1:
        parser.error("--messages, --kb and --reps need at least 1")
    runs = [relay_once(args.messages, args.kb * 1024) for _ in range(args.reps)]
    for rep, run in enumerate(runs):
        print(
            f"rep {rep}: relay CPU per message user {run['user_ms']:.3f} ms, "
            f"system {run['system_ms']:.3f} ms (wall {run['wall_ms']:.3f} ms)",
            flush=True,
        )
    result = {
        "messages": args.messages,
        "kb": args.kb,
        "reps": args.reps,
        **{
            f"{key}_median": round(statistics.median(r[key] for r in runs), 3)
            for key in ("user_ms", "system_ms", "wall_ms")
        },
    }
    result["cpu_ms_median"] = round(result["user_ms_median"] + result["system_ms_median"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
