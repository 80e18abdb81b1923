"""Every private pynetdicom internal the SCP touches, in one place, checked at startup.

pynetdicom is pinned to the minor version these were checked against (pyproject: >=3.0,<3.1).
`check()` (run by configure_pynetdicom) verifies that each internal exists with the expected
shape; a hook whose internal is missing is skipped, pynetdicom's public behaviour is used and
one WARNING line names it. Nothing here raises inside a pynetdicom thread.

Hooks (name: internal -> what it buys; without it):
- reactor_clock: `pynetdicom.association.time` -> the association reactor wakes when a DIMSE
  message is queued, not after a blind 1 ms sleep; without it, pynetdicom's poll.
- move_routing: `QueryRetrieveServiceClass._move_scp` -> C-MOVE runs our own sub-operation
  sender; without it, C-MOVE is answered 0xA801 (pynetdicom's "destination unknown").
- waiting_socket: `AssociationSocket` subclass swapped in (`__class__`, `_is_connected`,
  `event_queue`) -> the DUL waits in select() instead of 1 ms sleeps, the PDU length bound,
  and the replay that lets connections wait in the pre-negotiation stage (admission.py);
  without it, pynetdicom's socket and one thread per connection from accept() on.
- dul_wake: `DULServiceProvider.send_pdu` wrap and `_run_loop_delay` = 0 -> a queued response
  wakes the DUL at once; without it, up to 1 ms per response.
- dataset_completion: `DIMSEServiceProvider.msg_queue.put` and `C_STORE._dataset_path` -> the
  upload starts the moment a dataset is complete; without it, in the C-STORE handler.
- reactor_resume: `Association._reactor_checkpoint` / `_is_paused` -> a back-to-back request
  waits for the reactor's resume; without it, pynetdicom's race (rare unexpected-message).
- pending_p_data: `assoc.dul.send_pdu(P_DATA)` -> pending C-MOVE-RSPs encoded by us; without
  it, pynetdicom's `send_msg`.
- server_registry: `ae._servers` -> `ae.shutdown()` stops our server too; without it, only
  our own shutdown does.

For benchmarks only: DICOM_ADAPTER_HOOKS_OFF=name,name switches hooks off (hook on vs off).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom.association as association_module
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

OFF_ENV = "DICOM_ADAPTER_HOOKS_OFF"

REACTOR_CLOCK = "reactor_clock"
MOVE_ROUTING = "move_routing"
WAITING_SOCKET = "waiting_socket"
DUL_WAKE = "dul_wake"
DATASET_COMPLETION = "dataset_completion"
REACTOR_RESUME = "reactor_resume"
PENDING_P_DATA = "pending_p_data"
SERVER_REGISTRY = "server_registry"


def _params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def _init_sets(cls: type, *names: str) -> bool:
    """True if cls.__init__ assigns every `self.<name>` (instance attributes of the shape)."""
    source = inspect.getsource(cls.__init__)  # type: ignore[misc]
    return all(f"self.{name}" in source for name in names)


def _check_reactor_clock() -> bool:
    return getattr(association_module, "time", None) in (time, _installed_clock) and (
        "time.sleep(0.001)" in inspect.getsource(Association._run_reactor)
    )


def _check_move_routing() -> bool:
    scp = _original_move_scp or QueryRetrieveServiceClass.__dict__.get("_move_scp")
    return callable(scp) and _params(scp)[:3] == ["self", "req", "context"]


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


def _check_dataset_completion() -> bool:
    return (
        _init_sets(DIMSEServiceProvider, "msg_queue")
        and hasattr(C_STORE, "_dataset_path")
        and hasattr(queue.Queue, "put")
    )


def _check_reactor_resume() -> bool:
    return _init_sets(Association, "_reactor_checkpoint", "_is_paused")


def _check_pending_p_data() -> bool:
    return isinstance(P_DATA().presentation_data_value_list, list) and _params(
        DULServiceProvider.send_pdu
    )[:2] == ["self", "primitive"]


def _check_server_registry() -> bool:
    from pynetdicom.ae import ApplicationEntity

    return _init_sets(ApplicationEntity, "_servers")


@dataclass(frozen=True)
class Hook:
    """One internal: its shape check and what is used without it."""

    name: str
    internal: str
    fallback: str
    check: Callable[[], bool]


HOOKS: tuple[Hook, ...] = (
    Hook(
        REACTOR_CLOCK,
        "pynetdicom.association.time",
        "the reactor polls every 1 ms",
        _check_reactor_clock,
    ),
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
        DATASET_COMPLETION,
        "DIMSEServiceProvider.msg_queue, C_STORE._dataset_path",
        "uploads start in the C-STORE handler",
        _check_dataset_completion,
    ),
    Hook(
        REACTOR_RESUME,
        "Association._reactor_checkpoint, _is_paused",
        "no wait for the reactor's resume",
        _check_reactor_resume,
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
    global _installed_clock
    with _lock:
        _available.clear()
    current: Any = getattr(association_module, "time", None)
    if _installed_clock is not None and current is _installed_clock:
        association_module.time = time  # type: ignore[attr-defined]
    _installed_clock = None
    _unroute_moves()


def _pynetdicom_version() -> str:
    from pynetdicom import __version__

    return str(__version__)


# --------------------------------------------------------------------------------------------
# reactor_clock


class _ReactorClock:
    """Stands in for the `time` module inside pynetdicom.association.

    The association reactor polls its DIMSE message queue with `time.sleep(0.001)` between
    looks, so every request waits up to 1 ms before its handler runs. Here that one sleep
    waits on the queue itself (the same 1 ms at most) and returns as soon as a message is
    queued. Every other call goes to the real `time` module.
    """

    REACTOR_POLL = 0.001

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == _ReactorClock.REACTOR_POLL:
            dimse = getattr(threading.current_thread(), "dimse", None)
            msg_queue = getattr(dimse, "msg_queue", None)
            not_empty = getattr(msg_queue, "not_empty", None)
            if not_empty is not None:
                with not_empty:
                    if not msg_queue.queue:  # type: ignore[union-attr]
                        not_empty.wait(seconds)
                return
        time.sleep(seconds)


_installed_clock: _ReactorClock | None = None


def install_reactor_clock() -> bool:
    """Make association reactors wake on their message queue (see _ReactorClock)."""
    global _installed_clock
    if not available(REACTOR_CLOCK):
        return False
    if _installed_clock is None:
        _installed_clock = _ReactorClock()
        association_module.time = _installed_clock  # type: ignore[attr-defined,assignment]
    return True


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
# dataset_completion


def on_dataset_complete(assoc: Any, callback: Callable[[Path], None]) -> bool:
    """Call callback(spool path) in the DUL thread as each C-STORE dataset completes.

    Wraps `put` of the association's DIMSE message queue: a complete C-STORE request carries
    the path of its spool file, reported just before the request is queued for the reactor.
    """
    if not available(DATASET_COMPLETION):
        return False
    msg_queue: Any = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    original = getattr(msg_queue, "put", None)
    if original is None:
        return False

    def put(item: Any, *args: Any, **kwargs: Any) -> None:
        path = getattr(item[1], "_dataset_path", None) if isinstance(item, tuple) else None
        if isinstance(path, Path):
            try:
                callback(path)
            except Exception:  # never break the DUL thread; the handler still stores
                logger.exception("early store could not start")
        original(item, *args, **kwargs)

    msg_queue.put = put
    return True


# --------------------------------------------------------------------------------------------
# reactor_resume


def wait_for_reactor_resume(assoc: Any, timeout: float = 1.0) -> None:
    """Before a DIMSE request on an association whose previous request just finished.

    pynetdicom pauses the association's reactor around each request, but its "paused" flag
    stays True from the previous request until the reactor thread runs again; a request sent
    in that moment is not protected, and the reactor can take its response off the queue
    ("Received unexpected C-STORE service message"), leaving the sender to wait out the
    DIMSE timeout. Back-to-back sends on a busy process hit this; wait for the resume first.
    """
    if not available(REACTOR_RESUME):
        return
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not checkpoint.is_set():
        return
    deadline = time.monotonic() + timeout
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        if not assoc.is_alive():
            return
        time.sleep(0.00005)


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
