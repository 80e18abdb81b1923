"""Pre-negotiation stage of the SCP: a connection becomes an association only once it has sent
a whole, sane A-ASSOCIATE-RQ.

Until then it lives here, in one selector thread, not in a pynetdicom Association thread: it
takes no association slot, its buffer grows only with the bytes that arrived (an A-ASSOCIATE-RQ
may claim at most MAX_ASSOCIATE_RQ bytes), at most `limit` such connections are kept (the
oldest is dropped first), and each is closed when `timeout` (--acse_timeout) runs out. TLS
handshakes run here too, non-blocking, so the accept thread never waits on a peer.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_adapter.dimse import pdu

logger = logging.getLogger(__name__)

LINGER = 1.0  # seconds a refused peer gets to read our A-ABORT / A-ASSOCIATE-RJ
LINGER_BYTES = 65536
READ_CHUNK = 16384


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: Any
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    handshaken: bool = False
    closing: bool = False  # refused: draining what the peer still sends, then closed
    drained: int = 0


Handoff = Callable[[socket.socket, Any, bytes], None]


class PendingAssociations:
    """Connections that have not sent their A-ASSOCIATE-RQ yet; one thread, bounded.

    `admit` (accept thread) never blocks. A connection whose whole A-ASSOCIATE-RQ passed
    `pdu.check_associate_rq` goes to `handoff(sock, address, pdu_bytes)` (in this thread, with the
    socket blocking again), which starts the pynetdicom association.
    """

    def __init__(
        self,
        handoff: Handoff,
        *,
        limit: int,
        timeout: float,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self._handoff = handoff
        self._on_drop = on_drop  # a connection closed because the pending set was full
        self.limit = max(1, limit)
        self.timeout = timeout
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._inbox: deque[tuple[socket.socket, Any]] = deque()
        self._lock = threading.Lock()
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="PendingAssociations", daemon=True)
        self._stopped = False
        self.heartbeat = time.monotonic()  # last time the loop ran (liveness)
        self.dropped = 0  # connections dropped because the pending set was full

    def start(self) -> None:
        """Start the selector thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every pending connection."""
        self._stopped = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            inbox = list(self._inbox)
            self._inbox.clear()
        for sock, _ in inbox:
            _close(sock)
        for entry in list(self._pending.values()):
            _close(entry.sock)
        self._pending.clear()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def __len__(self) -> int:
        return len(self._pending) + len(self._inbox)

    def is_alive(self) -> bool:
        """True while the selector thread runs."""
        return self._thread.is_alive()

    def admit(self, sock: socket.socket, address: Any) -> None:
        """Take a just-accepted connection (from the accept thread; never blocks)."""
        if self._stopped:
            _close(sock)
            return
        with self._lock:
            self._inbox.append((sock, address))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _run(self) -> None:
        while not self._stopped:
            now = time.monotonic()
            self.heartbeat = now
            self._expire(now)
            wait = min([1.0, *(e.deadline - now for e in self._pending.values())])
            try:
                events = self._selector.select(max(0.0, wait))
            except (OSError, ValueError):  # a socket closed under us: rebuild on next loop
                logger.debug("pending-association select failed", exc_info=True)
                continue
            for key, _ in events:
                if key.fileobj is self._wake_reader:
                    try:
                        self._take_inbox()
                    except Exception:  # never let one peer stop the stage
                        logger.exception("taking new connections failed")
                    continue
                entry = self._pending.get(key.fileobj)  # type: ignore[call-overload]
                if entry is not None:
                    try:
                        self._service(entry)
                    except Exception:  # never let one peer stop the stage
                        logger.exception("pending connection from %s failed", entry.address)
                        self._forget(entry)

    def _take_inbox(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_reader.recv(4096):
                pass
        with self._lock:
            arrivals = list(self._inbox)
            self._inbox.clear()
        now = time.monotonic()
        for sock, address in arrivals:
            while len(self._pending) >= self.limit:
                oldest = next(iter(self._pending.values()))
                self.dropped += 1
                self._on_drop()
                logger.info(
                    "closing connection from %s: %d connections have not finished "
                    "association negotiation (--max_pending_associations); oldest dropped",
                    peer_text(oldest.address),
                    self.limit,
                )
                self._forget(oldest)
            try:
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                _close(sock)
                continue
            entry = _Pending(sock, address, now + self.timeout)
            self._pending[sock] = entry
            if isinstance(sock, ssl.SSLSocket):
                self._service(entry)  # start the handshake

    def _expire(self, now: float) -> None:
        for entry in list(self._pending.values()):
            if entry.deadline > now:
                continue
            if not entry.closing:
                logger.info(
                    "closing connection from %s: no A-ASSOCIATE-RQ within %.0f s (--acse_timeout)",
                    peer_text(entry.address),
                    self.timeout,
                )
            self._forget(entry)

    def _forget(self, entry: _Pending) -> None:
        self._pending.pop(entry.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(entry.sock)
        _close(entry.sock)

    def _want(self, entry: _Pending, events: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.modify(entry.sock, events)

    def _service(self, entry: _Pending) -> None:
        sock = entry.sock
        if entry.closing:
            self._drain(entry)
            return
        if isinstance(sock, ssl.SSLSocket) and not entry.handshaken:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want(entry, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(entry, selectors.EVENT_WRITE)
                return
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                logger.warning("TLS handshake with %s failed: %s", peer_text(entry.address), exc)
                self._forget(entry)
                return
            entry.handshaken = True
            self._want(entry, selectors.EVENT_READ)
        while True:
            buffer = entry.buffer
            needed = 6 if len(buffer) < 6 else 6 + pdu.parse_pdu_header(bytes(buffer[:6]))[1]
            try:
                chunk = sock.recv(min(needed - len(buffer), READ_CHUNK))
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return
            except ssl.SSLWantWriteError:
                self._want(entry, selectors.EVENT_WRITE)
                return
            except OSError as exc:
                logger.info(
                    "connection from %s lost before association: %s", peer_text(entry.address), exc
                )
                self._forget(entry)
                return
            if not chunk:
                logger.info(
                    "connection from %s closed before association", peer_text(entry.address)
                )
                self._forget(entry)
                return
            buffer += chunk
            if len(buffer) == 6 and not self._header_ok(entry):
                return
            if len(buffer) >= 6 and len(buffer) == 6 + pdu.parse_pdu_header(bytes(buffer[:6]))[1]:
                self._complete(entry)
                return
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return  # wait for the selector: more bytes will come

    def _header_ok(self, entry: _Pending) -> bool:
        pdu_type, length = pdu.parse_pdu_header(bytes(entry.buffer))
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            self._refuse(
                entry, f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", pdu.ABORT_UNEXPECTED_PDU
            )
            return False
        if length > pdu.MAX_ASSOCIATE_RQ:
            self._refuse(
                entry,
                f"A-ASSOCIATE-RQ of {length} bytes (at most {pdu.MAX_ASSOCIATE_RQ})",
                pdu.ABORT_UNEXPECTED_PARAMETER,
            )
            return False
        return True

    def _complete(self, entry: _Pending) -> None:
        data = bytes(entry.buffer)
        try:
            pdu.check_associate_rq(data[6:])
        except pdu.Refusal as refusal:
            self._refuse(entry, f"A-ASSOCIATE-RQ refused: {refusal}", refusal.answer)
            return
        self._pending.pop(entry.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(entry.sock)
        try:
            entry.sock.setblocking(True)
            self._handoff(entry.sock, entry.address, data)
        except Exception:
            logger.exception("could not start the association with %s", peer_text(entry.address))
            _close(entry.sock)

    def _refuse(self, entry: _Pending, reason: str, answer: bytes) -> None:
        """Answer A-ABORT or A-ASSOCIATE-RJ, half-close, and drop what still arrives."""
        logger.warning("refused connection from %s: %s", peer_text(entry.address), reason)
        entry.buffer = bytearray()
        entry.closing = True
        entry.deadline = time.monotonic() + LINGER
        try:
            entry.sock.send(answer)
            if not isinstance(entry.sock, ssl.SSLSocket):
                entry.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            self._forget(entry)
            return
        self._want(entry, selectors.EVENT_READ)

    def _drain(self, entry: _Pending) -> None:
        try:
            chunk = entry.sock.recv(READ_CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        entry.drained += len(chunk)
        if not chunk or entry.drained > LINGER_BYTES:
            self._forget(entry)


def peer_text(address: Any) -> str:
    """host:port of a peer's address, for log lines."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
