"""Child processes and ports: free ports, environments, stopping, /proc readings, metrics."""

from __future__ import annotations

import contextlib
import os
import signal as _signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """Return a TCP port that is free on all interfaces right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections for the block's life: bound, never listening, so no
    server started meanwhile (the importer under test on port 0 included) can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """Return the last `chars` characters of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]


def local_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: TCP_NODELAY on, loopback never proxied."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    for key in ("NO_PROXY", "no_proxy"):
        parts = [p for p in env.get(key, "").split(",") if p]
        for host in ("127.0.0.1", "localhost"):
            if host not in parts:
                parts.append(host)
        env[key] = ",".join(parts)
    if extra:
        env.update(extra)
    return env


def accepts_tcp(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def raise_if_exited(proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    """RuntimeError if `proc` has exited: whatever a poll waits for from it will not come."""
    code = proc.poll()
    if code is not None:
        tail = f"; log tail:\n{log_tail(log)}" if log is not None else ""
        raise RuntimeError(f"{what} exited with code {code} during startup{tail}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a process, wait up to `timeout`, SIGKILL if needed; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(_signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name with labels: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def http_get(url: str, timeout: float = 10.0) -> httpx.Response:
    """GET without proxies (the metrics and health endpoints of a service under test)."""
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.get(url)


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    """The samples served at `<metrics_url>/metrics`."""
    response = http_get(metrics_url + "/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


@dataclass(frozen=True)
class ProcStatus:
    """What /proc says about a running process: memory, threads, open files, CPU used so far."""

    rss_kib: int  # VmRSS
    peak_rss_kib: int  # VmHWM: the high-water mark of the whole process life
    threads: int
    fds: int
    cpu_seconds: float  # user + system, all threads


def tree_cpu_seconds(pid: int) -> float:
    """CPU (user + system) of a process, its reaped children and its live descendants: a
    forking server's whole cost so far (`storescp --fork`)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    total = sum(int(field) for field in stat[11:15]) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):  # it may end meanwhile (then: in cutime, or lost)
            total += tree_cpu_seconds(int(child))
    return total


def proc_status(pid: int) -> ProcStatus:
    """One reading of /proc/<pid>/{status,stat,fd}, the only place tests and benches parse them."""
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            status[key] = int(value.split()[0])
    # after "(comm)", which may itself contain spaces and parentheses
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return ProcStatus(
        rss_kib=status["VmRSS"],
        peak_rss_kib=status["VmHWM"],
        threads=status["Threads"],
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_seconds=(int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
    )
