"""Every private pynetdicom internal the SCP touches, in one place, checked at startup.

pynetdicom is pinned to the minor version these were checked against (pyproject: >=3.0,<3.1).
`check()` (run by configure_pynetdicom) verifies that each internal exists with the expected
shape; a hook whose internal is missing is skipped, pynetdicom's public behaviour is used and
one WARNING line names it. Nothing here raises inside a pynetdicom thread.

Hooks (name: internal -> what it buys; without it):
- move_routing: `QueryRetrieveServiceClass._move_scp` -> C-MOVE runs our own sub-operation
  sender; without it, C-MOVE is answered 0xA801 (pynetdicom's "destination unknown").
- get_routing: `QueryRetrieveServiceClass._get_scp` -> C-GET runs the same retrieve pipeline
  as C-MOVE, sending on the requesting association; without it, C-GET is answered 0xA702.
- raw_p_data: `assoc.dul.socket.socket` -> a C-GET's C-STORE-RQ P-DATA framed by us and
  written to the requesting association's socket from the event loop, several PDUs per
  write; `DIMSEServiceProvider.msg_queue.put` wrapped so the C-STORE-RSP wakes the loop
  (pynetdicom's `send_c_store` costs ~6 ms per 512 KB instance: a DUL hand-off per PDU,
  thread hops). Not over TLS. Without it, pynetdicom's DIMSE provider sends and receives.
- waiting_socket: `AssociationSocket` subclass swapped in (`__class__`, `_is_connected`,
  `event_queue`) -> the DUL waits in select() instead of 1 ms sleeps, the PDU length bound,
  and the replay that lets connections wait in the pre-negotiation stage (admission.py);
  without it, pynetdicom's socket and one thread per connection from accept() on.
- dul_wake: `DULServiceProvider.send_pdu` wrap and `_run_loop_delay` = 0 -> a queued response
  wakes the DUL at once; without it, up to 1 ms per response.
- reactor_wake: `pynetdicom.association.time` -> the association reactor's 1 ms poll
  (`time.sleep(0.001)` in `Association._run_reactor`) ends as soon as a DIMSE message is
  queued (waits on `DIMSEServiceProvider.msg_queue`); without it, each received request waits
  up to 1 ms for the reactor (measured: receive-only ingest with the spool +10-12 %).
- pending_p_data: `assoc.dul.send_pdu(P_DATA)` -> pending C-MOVE-RSPs encoded by us; without
  it, pynetdicom's `send_msg`.
- server_registry: `ae._servers` -> `ae.shutdown()` stops our server too; without it, only
  our own shutdown does.
- idle_timer: `DULServiceProvider._idle_timer` -> restarted when a C-MOVE or C-GET answers,
  so a retrieve that ran longer than --network_timeout is not aborted right after its final
  response (the timer only restarts on a received PDU, and the requester sends none while it
  waits, nor does the DUL read while it lends the socket); without it, that A-ABORT.
- spool_files: `pynetdicom.dimse_messages.NamedTemporaryFile` -> C-STORE data sets spool in
  this run's directory, so an association's unanswered files can be removed when it ends
  (importer/cstore_spool.py); without it, pynetdicom's files in $TMPDIR (an aborted transfer
  may leave its file behind).
- store_rsp: `Association.dimse.send_msg` (per association) -> a C-STORE-RSP is encoded by
  us and written to the socket from the association's thread (with raw_p_data; else queued on
  the DUL as one P-DATA); pynetdicom builds two pydicom Datasets per response (~16 % of
  dicom-import's GIL time when ingesting CT); without it, pynetdicom's `send_msg`.
- file_meta: `pynetdicom.dimse_messages.create_file_meta` / `write_file_meta_info` -> each
  received C-STORE's meta group is written from bytes we encode (the same bytes); without
  it, pydicom's Dataset and writer.

For benchmarks only: DICOM_ADAPTER_HOOKS_OFF=name,name switches hooks off (hook on vs off).
Removed after measuring less than 3 % (README, Performance notes): the `time` stand-in of the
association reactor and the `msg_queue.put` wrap that started uploads from the DUL thread.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

OFF_ENV = "DICOM_ADAPTER_HOOKS_OFF"

MOVE_ROUTING = "move_routing"
WAITING_SOCKET = "waiting_socket"
DUL_WAKE = "dul_wake"
PENDING_P_DATA = "pending_p_data"
SERVER_REGISTRY = "server_registry"
SPOOL_FILES = "spool_files"
GET_ROUTING = "get_routing"
RAW_P_DATA = "raw_p_data"
REACTOR_WAKE = "reactor_wake"
IDLE_TIMER = "idle_timer"
STORE_RSP = "store_rsp"
FILE_META = "file_meta"


def _params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def _init_sets(cls: type, *names: str) -> bool:
    """True if cls.__init__ assigns every `self.<name>` (instance attributes of the shape)."""
    source = inspect.getsource(cls.__init__)  # type: ignore[misc]
    return all(f"self.{name}" in source for name in names)


def _check_move_routing() -> bool:
    scp = _original_move_scp or QueryRetrieveServiceClass.__dict__.get("_move_scp")
    return callable(scp) and _params(scp)[:3] == ["self", "req", "context"]


def _check_get_routing() -> bool:
    scp = _original_get_scp or QueryRetrieveServiceClass.__dict__.get("_get_scp")
    return callable(scp) and _params(scp)[:3] == ["self", "req", "context"]


def _check_raw_p_data() -> bool:
    from pynetdicom.dimse import DIMSEServiceProvider

    return (
        _init_sets(DULServiceProvider, "socket")
        and _init_sets(AssociationSocket, "socket")
        and _init_sets(DIMSEServiceProvider, "msg_queue")
    )


def _check_reactor_wake() -> bool:
    from pynetdicom import association
    from pynetdicom.dimse import DIMSEServiceProvider

    return (
        getattr(association, "time", None) in (time, _reactor_time)
        and "time.sleep(0.001)" in inspect.getsource(association.Association._run_reactor)
        and _init_sets(DIMSEServiceProvider, "msg_queue")
    )


def _check_waiting_socket() -> bool:
    return (
        isinstance(AssociationSocket.__dict__.get("ready"), property)
        and _params(AssociationSocket.recv)[:2] == ["self", "nr_bytes"]
        and isinstance(AssociationSocket.__dict__.get("event_queue"), property)
        and _init_sets(AssociationSocket, "_is_connected", "socket")
    )


def _check_dul_wake() -> bool:
    return _params(DULServiceProvider.send_pdu)[:2] == ["self", "primitive"] and _init_sets(
        DULServiceProvider, "_run_loop_delay"
    )


def _check_idle_timer() -> bool:
    from pynetdicom.timer import Timer

    return _init_sets(DULServiceProvider, "_idle_timer") and callable(
        getattr(Timer, "restart", None)
    )


def _check_pending_p_data() -> bool:
    return isinstance(P_DATA().presentation_data_value_list, list) and _params(
        DULServiceProvider.send_pdu
    )[:2] == ["self", "primitive"]


def _check_server_registry() -> bool:
    from pynetdicom.ae import ApplicationEntity

    return _init_sets(ApplicationEntity, "_servers")


def _check_spool_files() -> bool:
    from pynetdicom import dimse_messages

    factory = getattr(dimse_messages, "NamedTemporaryFile", None)
    return factory is tempfile.NamedTemporaryFile or factory is _spool_factory


def _check_store_rsp() -> bool:
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider

    return (
        _params(DIMSEServiceProvider.send_msg)[:3] == ["self", "primitive", "context_id"]
        and isinstance(getattr(DIMSEServiceProvider, "maximum_pdu_size", None), property)
        and _init_sets(Association, "dimse")
        and _check_pending_p_data()
    )


def _check_file_meta() -> bool:
    from pydicom import filewriter
    from pynetdicom import dimse_messages, dsutils

    create = getattr(dimse_messages, "create_file_meta", None)
    write = getattr(dimse_messages, "write_file_meta_info", None)
    return (
        create in (dsutils.create_file_meta, _create_file_meta)
        and write in (filewriter.write_file_meta_info, _write_file_meta_info)
        and _params(dsutils.create_file_meta)
        == [
            "sop_class_uid",
            "sop_instance_uid",
            "transfer_syntax",
            "implementation_uid",
            "implementation_version",
        ]
    )


@dataclass(frozen=True)
class Hook:
    """One internal: its shape check and what is used without it."""

    name: str
    internal: str
    fallback: str
    check: Callable[[], bool]


HOOKS: tuple[Hook, ...] = (
    Hook(
        MOVE_ROUTING,
        "QueryRetrieveServiceClass._move_scp",
        "C-MOVE is answered 0xA801",
        _check_move_routing,
    ),
    Hook(
        WAITING_SOCKET,
        "AssociationSocket (ready, recv, _is_connected, event_queue)",
        "pynetdicom's socket; no pre-negotiation stage",
        _check_waiting_socket,
    ),
    Hook(
        DUL_WAKE,
        "DULServiceProvider.send_pdu, _run_loop_delay",
        "the DUL sleeps 1 ms between polls",
        _check_dul_wake,
    ),
    Hook(
        PENDING_P_DATA,
        "DULServiceProvider.send_pdu(P_DATA)",
        "pending C-MOVE-RSPs through send_msg",
        _check_pending_p_data,
    ),
    Hook(
        SERVER_REGISTRY,
        "ApplicationEntity._servers",
        "ae.shutdown() does not stop the server",
        _check_server_registry,
    ),
    Hook(
        SPOOL_FILES,
        "pynetdicom.dimse_messages.NamedTemporaryFile",
        "C-STORE data sets spool in $TMPDIR; an aborted transfer may leave its file",
        _check_spool_files,
    ),
)

HOOKS += (
    Hook(
        GET_ROUTING,
        "QueryRetrieveServiceClass._get_scp",
        "C-GET is answered 0xA702",
        _check_get_routing,
    ),
    Hook(
        RAW_P_DATA,
        "DULServiceProvider.socket, AssociationSocket.socket, DIMSEServiceProvider.msg_queue",
        "C-GET sub-operations through pynetdicom's DIMSE provider (slower)",
        _check_raw_p_data,
    ),
)

HOOKS += (
    Hook(
        REACTOR_WAKE,
        "pynetdicom.association.time (Association._run_reactor's 1 ms sleep)",
        "a received request waits up to 1 ms for the association's reactor",
        _check_reactor_wake,
    ),
)

HOOKS += (
    Hook(
        IDLE_TIMER,
        "DULServiceProvider._idle_timer",
        "a C-MOVE or C-GET longer than --network_timeout ends with an A-ABORT after its answer",
        _check_idle_timer,
    ),
)

HOOKS += (
    Hook(
        STORE_RSP,
        "DIMSEServiceProvider.send_msg, maximum_pdu_size; Association.dimse",
        "C-STORE-RSPs through pynetdicom's send_msg (slower)",
        _check_store_rsp,
    ),
    Hook(
        FILE_META,
        "pynetdicom.dimse_messages.create_file_meta, write_file_meta_info",
        "received meta groups written by pydicom (slower)",
        _check_file_meta,
    ),
)

_available: dict[str, bool] = {}
_lock = threading.Lock()


def check(off: Iterable[str] | None = None) -> dict[str, bool]:
    """Check every hook once per process; one WARNING per hook whose internal is missing.

    `off` (default: $DICOM_ADAPTER_HOOKS_OFF) switches hooks off for a benchmark.
    """
    with _lock:
        if _available:
            return dict(_available)
        names = off if off is not None else os.environ.get(OFF_ENV, "").split(",")
        switched_off = {name.strip() for name in names if name.strip()}
        for hook in HOOKS:
            if hook.name in switched_off:
                logger.info("pynetdicom hook %s off (%s)", hook.name, OFF_ENV)
                _available[hook.name] = False
                continue
            try:
                ok = bool(hook.check())
            except Exception:  # a changed internal may fail its check in any way
                ok = False
            if not ok:
                logger.warning(
                    "pynetdicom internal %s not as expected (pynetdicom %s): hook %s skipped, %s",
                    hook.internal,
                    _pynetdicom_version(),
                    hook.name,
                    hook.fallback,
                )
            _available[hook.name] = ok
        if not _available.get(WAITING_SOCKET, False):
            _available[DUL_WAKE] = False  # `_run_loop_delay` 0 would spin without it
        return dict(_available)


def available(name: str) -> bool:
    """True if hook `name` passed its check (checking now if nothing was checked yet)."""
    return check().get(name, False)


def reset() -> None:
    """Undo every process-wide hook and forget the checks (tests: restore after each test)."""
    with _lock:
        _available.clear()
    _unroute_moves()
    _unroute_gets()
    unwake_reactors()
    unfast_file_meta()
    if _spool_factory is not None:
        restore_spool_factory(_spool_factory)


def _pynetdicom_version() -> str:
    from pynetdicom import __version__

    return str(__version__)


# --------------------------------------------------------------------------------------------
# move_routing

_MOVE_RUNNER = "_dicom_adapter_move_runner"
_original_move_scp: Any = None


def route_moves(ae: Any, runner: Callable[[Any, Any, Any], None]) -> bool:
    """C-MOVE requests to `ae` go to runner(service, request, context) in the association's
    thread, not to pynetdicom's sub-operation loop. False when the hook is unavailable."""
    if not available(MOVE_ROUTING):
        return False
    _route_move_requests()
    setattr(ae, _MOVE_RUNNER, runner)
    return True


def _route_move_requests() -> None:
    """Patch pynetdicom's Q/R move SCP once: AEs marked by `route_moves` use their runner."""
    global _original_move_scp
    if _original_move_scp is not None:
        return
    original = QueryRetrieveServiceClass._move_scp
    _original_move_scp = original

    def _move_scp(self: Any, req: Any, context: Any) -> None:
        runner = getattr(self.ae, _MOVE_RUNNER, None)
        if runner is None:
            original(self, req, context)
            return
        runner(self, req, context)

    QueryRetrieveServiceClass._move_scp = _move_scp  # type: ignore[method-assign]


def _unroute_moves() -> None:
    global _original_move_scp
    if _original_move_scp is not None:
        QueryRetrieveServiceClass._move_scp = _original_move_scp  # type: ignore[method-assign]
        _original_move_scp = None


# --------------------------------------------------------------------------------------------
# get_routing

_GET_RUNNER = "_dicom_adapter_get_runner"
_original_get_scp: Any = None


def route_gets(ae: Any, runner: Callable[[Any, Any, Any], None]) -> bool:
    """C-GET requests to `ae` go to runner(service, request, context) in the association's
    thread, not to pynetdicom's sub-operation loop. False when the hook is unavailable."""
    if not available(GET_ROUTING):
        return False
    global _original_get_scp
    if _original_get_scp is None:
        original = QueryRetrieveServiceClass._get_scp
        _original_get_scp = original

        def _get_scp(self: Any, req: Any, context: Any) -> None:
            runner = getattr(self.ae, _GET_RUNNER, None)
            if runner is None:
                original(self, req, context)
                return
            runner(self, req, context)

        QueryRetrieveServiceClass._get_scp = _get_scp  # type: ignore[method-assign]
    setattr(ae, _GET_RUNNER, runner)
    return True


def _unroute_gets() -> None:
    global _original_get_scp
    if _original_get_scp is not None:
        QueryRetrieveServiceClass._get_scp = _original_get_scp  # type: ignore[method-assign]
        _original_get_scp = None


# --------------------------------------------------------------------------------------------
# reactor_wake


class _ReactorTime:
    """`time` as pynetdicom's association module sees it: its reactor's 1 ms poll sleep
    returns when a DIMSE message is queued for that association; everything else is `time`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        queue = getattr(getattr(threading.current_thread(), "dimse", None), "msg_queue", None)
        if seconds != 0.001 or queue is None:  # not the reactor's poll (an Association thread)
            time.sleep(seconds)
            return
        with queue.not_empty:  # the queue's own lock and condition: put() notifies it
            if not queue.queue:
                queue.not_empty.wait(seconds)


_reactor_time = _ReactorTime()


def wake_reactors() -> bool:
    """Install the waking poll for every association's reactor (process-wide)."""
    if not available(REACTOR_WAKE):
        return False
    from pynetdicom import association

    setattr(association, "time", _reactor_time)  # noqa: B010 - a module global of pynetdicom
    return True


def unwake_reactors() -> None:
    from pynetdicom import association

    if getattr(association, "time", None) is _reactor_time:
        setattr(association, "time", time)  # noqa: B010


# --------------------------------------------------------------------------------------------
# raw_p_data


def raw_socket(assoc: Any) -> Any:
    """The association's TCP socket, to write P-DATA PDUs to directly; None when the hook is
    unavailable or the connection is TLS (an SSL object must not be read and written from two
    threads at once).

    Hazard: the DUL thread also writes this socket (A-ABORT, what is queued with send_pdu);
    every writer on a C-GET goes through one lock (dimse/get_sender.py).
    """
    if not available(RAW_P_DATA):
        return None
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None
    return sock


def watch_dimse_messages(assoc: Any, wake: Callable[[], None]) -> Any:
    """pynetdicom's queue of received DIMSE messages ((context id, message) items; (None,
    None) once the association is aborted or closed), with `wake()` called after each put
    (in the DUL thread), so a waiter on the event loop needs no thread of its own."""
    messages = assoc.dimse.msg_queue
    original_put = type(messages).put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        original_put(messages, item, block, timeout)
        wake()

    messages.put = put
    return messages


def unwatch_dimse_messages(assoc: Any) -> None:
    """Undo watch_dimse_messages."""
    messages = assoc.dimse.msg_queue
    if "put" in vars(messages):
        del messages.put


# --------------------------------------------------------------------------------------------
# waiting_socket, dul_wake


def swap_socket_class(assoc_socket: Any, cls: type) -> bool:
    """Turn pynetdicom's AssociationSocket instance into `cls` (a subclass); False if not."""
    if not available(WAITING_SOCKET) or type(assoc_socket) is not AssociationSocket:
        return False
    assoc_socket.__class__ = cls
    return True


def socket_connected(assoc_socket: Any) -> bool:
    """pynetdicom's own flag: False once the transport connection closed."""
    return getattr(assoc_socket, "_is_connected", False) is not False


def wake_on_send(dul: Any, wake: Callable[[], None]) -> bool:
    """Call `wake()` after each PDU the DUL is asked to send, and drop its idle sleep.

    Only with the waiting socket: its select() is then the DUL's only wait.
    """
    if not available(DUL_WAKE):
        return False
    original_send_pdu = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        original_send_pdu(primitive)
        wake()

    dul.send_pdu = send_pdu
    dul._run_loop_delay = 0
    return True


# --------------------------------------------------------------------------------------------
# pending_p_data


def send_p_data(assoc: Any, context_id: int, fragment: bytes) -> bool:
    """Queue one P-DATA (a single PDV: `fragment` with its control byte) on the DUL."""
    if not available(PENDING_P_DATA):
        return False
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((context_id, fragment))
    assoc.dul.send_pdu(primitive)
    return True


# --------------------------------------------------------------------------------------------
# idle_timer


def restart_idle_timer(assoc: Any) -> None:
    """The association was active: its network timeout counts from now."""
    if available(IDLE_TIMER):
        timer = getattr(getattr(assoc, "dul", None), "_idle_timer", None)
        if timer is not None:
            timer.restart()


# --------------------------------------------------------------------------------------------
# server_registry


def register_server(ae: Any, server: Any) -> bool:
    """Add `server` to the AE's servers, so ae.shutdown() stops it as for pynetdicom's own."""
    if not available(SERVER_REGISTRY):
        return False
    ae._servers.append(server)
    return True


def unregistered_shutdown(shutdown: Callable[[], None]) -> None:
    """Run pynetdicom's server shutdown, tolerating a server that was never registered."""
    with contextlib.suppress(ValueError, AttributeError):
        shutdown()


# --------------------------------------------------------------------------------------------
# spool_files

_spool_factory: Any = None


def install_spool_factory(factory: Callable[..., Any]) -> bool:
    """pynetdicom creates each C-STORE spool file with `factory` (NamedTemporaryFile's API)."""
    global _spool_factory
    if not available(SPOOL_FILES):
        return False
    from pynetdicom import dimse_messages

    setattr(dimse_messages, "NamedTemporaryFile", factory)  # noqa: B010 - a private name
    _spool_factory = factory
    return True


def restore_spool_factory(factory: Callable[..., Any]) -> None:
    """Undo install_spool_factory(factory), if it is still the one installed."""
    global _spool_factory
    from pynetdicom import dimse_messages

    if getattr(dimse_messages, "NamedTemporaryFile", None) is factory:
        setattr(dimse_messages, "NamedTemporaryFile", tempfile.NamedTemporaryFile)  # noqa: B010
    if _spool_factory is factory:
        _spool_factory = None


# --------------------------------------------------------------------------------------------
# store_rsp


def answer_stores_directly(assoc: Any) -> bool:
    """C-STORE-RSPs on `assoc` are encoded by us (pdu.c_store_rsp) and queued on the DUL as one
    P-DATA; any other message, or a response our encoder does not carry (an OffendingElement,
    non-ASCII text, a command longer than the peer's PDU), goes through pynetdicom's send_msg.

    Skipped with it: pynetdicom's EVT_DIMSE_SENT for those responses (nothing here binds it).
    """
    if not available(STORE_RSP):
        return False
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_adapter.dimse import pdu

    dimse = assoc.dimse
    original_send_msg = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        responded_to = primitive.MessageIDBeingRespondedTo
        status = primitive.Status
        if (
            type(primitive) is C_STORE
            and responded_to is not None
            and isinstance(status, int)
            and primitive.OffendingElement is None  # not carried by pdu.c_store_rsp
        ):
            try:
                command = pdu.c_store_rsp(
                    responded_to,
                    primitive.AffectedSOPClassUID,
                    primitive.AffectedSOPInstanceUID,
                    status,
                    error_comment=primitive.ErrorComment,
                )
            except (pdu.PduError, TypeError, struct.error):
                command = None
            max_pdu = dimse.maximum_pdu_size
            if command is not None and (not max_pdu or len(command) <= max_pdu - 6):
                framed = pdu.pdv_header(context_id, len(command), command=True, last=True)
                if _send_now(assoc, framed + command):
                    return
                message = P_DATA()
                message.presentation_data_value_list.append((context_id, b"\x03" + command))
                dimse.dul.send_pdu(message)
                return
        original_send_msg(primitive, context_id)

    dimse.send_msg = send_msg
    return True


STALLED_SEND = 30.0  # s: a peer that takes no response bytes this long loses its connection


def _send_now(assoc: Any, data: bytes) -> bool:
    """Write a small PDU from this (the association's) thread, sparing the hop to the DUL
    thread and its wake-up: under load, each hop waits for a core and the GIL (measured: a
    P1 C-STORE spent ~2 ms between its response and the next request). False, nothing sent,
    when the socket is not ours to write (TLS, hook raw_p_data missing), the DUL has
    something queued that must go first, or the socket buffer is full: queue it then."""
    sock = raw_socket(assoc)
    queued = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if sock is None or queued is None or not queued.empty():
        return False
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except OSError:  # BlockingIOError included: the DUL path reports a broken connection
        return False
    view = memoryview(data)[sent:]
    deadline = time.monotonic() + STALLED_SEND
    try:
        while view:  # a partial PDU cannot be taken back: the rest goes now, or never
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [sock], [], left)[1]:
                raise TimeoutError("peer takes no data")
            with contextlib.suppress(BlockingIOError):
                view = view[sock.send(view, socket.MSG_DONTWAIT) :]
    except (OSError, ValueError) as exc:
        logger.warning("C-STORE-RSP not sent (%s): closing the connection", exc)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    return True


# --------------------------------------------------------------------------------------------
# file_meta


@dataclass(frozen=True)
class _MetaValues:
    """What pynetdicom's create_file_meta was called with, written by _write_file_meta_info."""

    arguments: dict[str, Any]


_original_meta: tuple[Any, Any] | None = None
_meta_defaults: dict[str, Any] = {}  # create_file_meta's defaults (implementation UID, name)


def _create_file_meta(**arguments: Any) -> _MetaValues:
    return _MetaValues(arguments)


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    from pydicom import filewriter
    from pynetdicom import dsutils

    from dicom_adapter.dicom.part10 import file_meta_group

    if not isinstance(file_meta, _MetaValues):
        filewriter.write_file_meta_info(fp, file_meta, enforce_standard)
        return
    values = {**_meta_defaults, **file_meta.arguments}
    try:
        raw = file_meta_group(
            str(values["sop_class_uid"]),
            str(values["sop_instance_uid"]),
            str(values["transfer_syntax"]),
            str(values["implementation_uid"]),
            values["implementation_version"],
        )
    except (ValueError, KeyError, TypeError):
        dataset = dsutils.create_file_meta(**file_meta.arguments)
        filewriter.write_file_meta_info(fp, dataset, enforce_standard)
        return
    fp.write(raw)


def fast_file_meta() -> bool:
    """Received C-STORE meta groups are written from our bytes (process-wide)."""
    global _original_meta
    if not available(FILE_META):
        return False
    from pynetdicom import dimse_messages, dsutils

    if _original_meta is None:
        _original_meta = (
            getattr(dimse_messages, "create_file_meta"),  # noqa: B009 - not exported
            getattr(dimse_messages, "write_file_meta_info"),  # noqa: B009
        )
    parameters = inspect.signature(dsutils.create_file_meta).parameters.values()
    _meta_defaults.update({p.name: p.default for p in parameters if p.default is not p.empty})
    setattr(dimse_messages, "create_file_meta", _create_file_meta)  # noqa: B010
    setattr(dimse_messages, "write_file_meta_info", _write_file_meta_info)  # noqa: B010
    return True


def unfast_file_meta() -> None:
    global _original_meta
    if _original_meta is None:
        return
    from pynetdicom import dimse_messages

    create, write = _original_meta
    setattr(dimse_messages, "create_file_meta", create)  # noqa: B010
    setattr(dimse_messages, "write_file_meta_info", write)  # noqa: B010
    _original_meta = None
