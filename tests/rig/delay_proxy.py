"""A lean HTTP/1.1 proxy adding a fixed delay to every request: network latency for benches.

A real network costs the sending machine no CPU, so this proxy does as little as it can: per
request it reads the head, waits `delay`, and then moves the body and the answer through
unchanged, with `os.splice` (kernel to kernel, no copy into Python) wherever a Content-Length
frames it. Only heads are parsed, to find where a request or an answer ends on a keep-alive
connection. One thread per client connection, each with its own upstream connection.
`close_each=True` emulates a client opening a new connection for every request (the Java
adapter): answers carry `Connection: close` and a new connection first waits one more `delay`
(the TCP handshake's round trip).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from tests.rig.lifecycle import Service

HEAD_LIMIT = 1 << 16
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Peer:
    """A blocking socket with a read buffer (what was received past a head stays here)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buffer = bytearray()

    def head(self) -> bytes | None:
        """Bytes up to and including the blank line; None at EOF before any byte."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > HEAD_LIMIT:
                raise ValueError("head too large")
            data = self.sock.recv(1 << 16)
            if not data:
                if self.buffer:
                    raise ConnectionError("EOF inside a head")
                return None
            self.buffer += data
        head = bytes(self.buffer[: end + 4])
        del self.buffer[: end + 4]
        return head

    def line(self) -> bytes:
        """One CRLF-terminated line (chunked framing)."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("EOF inside a line")
            self.buffer += data
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line


class _Pipe:
    """A kernel pipe for splicing socket to socket."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, PIPE_BYTES)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)

    def relay(self, src: _Peer, dst: _Peer, count: int) -> None:
        """Move exactly `count` bytes from `src` to `dst`: the buffered ones, then spliced."""
        if src.buffer and count:
            take = min(count, len(src.buffer))
            dst.sock.sendall(src.buffer[:take])
            del src.buffer[:take]
            count -= take
        while count:
            moved = os.splice(src.sock.fileno(), self.write_fd, min(count, PIPE_BYTES))
            if moved == 0:
                raise ConnectionError("EOF inside a body")
            count -= moved
            while moved:
                moved -= os.splice(self.read_fd, dst.sock.fileno(), moved)

    def relay_to_eof(self, src: _Peer, dst: _Peer) -> None:
        """An answer framed by the connection's end."""
        if src.buffer:
            dst.sock.sendall(src.buffer)
            src.buffer.clear()
        while moved := os.splice(src.sock.fileno(), self.write_fd, PIPE_BYTES):
            while moved:
                moved -= os.splice(self.read_fd, dst.sock.fileno(), moved)


def _headers(head: bytes) -> dict[bytes, bytes]:
    """Lower-cased header names to values (the last one wins; enough for framing)."""
    lines = head[:-4].split(b"\r\n")[1:]
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _relay_chunked(src: _Peer, dst: _Peer) -> None:
    """A chunked body, chunk by chunk, trailers included (copied: rare here)."""
    while True:
        size_line = src.line()
        dst.sock.sendall(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while (trailer := src.line()) != b"\r\n":
                dst.sock.sendall(trailer)
            dst.sock.sendall(trailer)
            return
        while len(src.buffer) < size + 2:
            data = src.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("EOF inside a chunk")
            src.buffer += data
        dst.sock.sendall(src.buffer[: size + 2])
        del src.buffer[: size + 2]


def _relay_body(pipe: _Pipe, headers: dict[bytes, bytes], src: _Peer, dst: _Peer) -> None:
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        _relay_chunked(src, dst)
    else:
        pipe.relay(src, dst, int(headers.get(b"content-length", b"0")))


class DelayProxy(Service):
    """`with DelayProxy(host, port, delay=0.1) as proxy:` serves on `proxy.url`."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        delay: float = 0.0,
        close_each: bool = False,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.close_each = close_each
        self.connections = 0  # accepted so far
        self.requests = 0  # forwarded so far
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._cpu_done = 0.0  # CPU seconds of connection threads that ended
        self._open: set[socket.socket] = set()

    @property
    def url(self) -> str:
        """Root URL of the proxy (the upstream's paths are served under it unchanged)."""
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU the proxy's threads used so far (ended ones and, via /proc, live ones)."""
        with self._lock:
            total = self._cpu_done
            live = [t.native_id for t in self._threads if t.is_alive()]
        for tid in live:
            with contextlib.suppress(OSError):  # it may end meanwhile (then counted above)
                total += thread_cpu_seconds(tid) if tid is not None else 0.0
        return total

    def start(self) -> None:
        """Accept connections on a thread."""
        accept = threading.Thread(target=self._accept, name="delay-proxy", daemon=True)
        with self._lock:
            self._threads.append(accept)
        accept.start()

    def stop(self) -> None:
        """Close the listener and every connection, join the threads."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=30)

    def _accept(self) -> None:
        started = time.thread_time()
        try:
            while True:
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    return
                worker = threading.Thread(
                    target=self._serve, args=(client,), name="delay-proxy-conn", daemon=True
                )
                with self._lock:
                    self.connections += 1
                    self._open.add(client)
                    self._threads.append(worker)
                worker.start()
        finally:
            self._ended(started)

    def _ended(self, started: float) -> None:
        with self._lock:
            self._cpu_done += time.thread_time() - started

    def _serve(self, client_sock: socket.socket) -> None:
        started = time.thread_time()
        client = _Peer(client_sock)
        upstream: _Peer | None = None
        pipe = _Pipe()
        try:
            if self.close_each and self.delay > 0:
                time.sleep(self.delay)
            while True:
                head = client.head()
                if head is None:
                    return
                request = _headers(head)
                if self.delay > 0:
                    time.sleep(self.delay)
                if upstream is None:
                    upstream = _Peer(socket.create_connection(self.upstream))
                    with self._lock:
                        self._open.add(upstream.sock)
                upstream.sock.sendall(head)
                _relay_body(pipe, request, client, upstream)
                with self._lock:
                    self.requests += 1
                if not self._answer(pipe, head, upstream, client):
                    return
                if request.get(b"connection", b"").lower() == b"close" or self.close_each:
                    return
        except (OSError, ValueError):
            return
        finally:
            pipe.close()
            with self._lock:
                for peer in (client, upstream):
                    if peer is not None:
                        self._open.discard(peer.sock)
            for peer in (client, upstream):
                if peer is not None:
                    peer.sock.close()
            self._ended(started)

    def _answer(self, pipe: _Pipe, request_head: bytes, upstream: _Peer, client: _Peer) -> bool:
        """Relay one answer (after any 1xx); True when both connections may carry another."""
        while True:
            head = upstream.head()
            if head is None:
                raise ConnectionError("upstream closed before answering")
            status = int(head.split(b" ", 2)[1])
            if status >= 200 or status == 101:
                break
            client.sock.sendall(head)
        headers = _headers(head)
        keep = headers.get(b"connection", b"").lower() != b"close"
        if self.close_each:
            lines = [
                line
                for line in head[:-4].split(b"\r\n")
                if not line.lower().startswith(b"connection:")
            ]
            head = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"
        client.sock.sendall(head)
        no_body = request_head.startswith(b"HEAD ") or status in (204, 304)
        if no_body:
            return keep
        if b"content-length" in headers or b"chunked" in headers.get(b"transfer-encoding", b""):
            _relay_body(pipe, headers, upstream, client)
            return keep
        pipe.relay_to_eof(upstream, client)
        return False


def thread_cpu_seconds(tid: int) -> float:
    """CPU (user + system) of one thread of this process, from /proc."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
