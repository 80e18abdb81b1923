"""What the uploader and the C-STORE handler need of a spool, local directory or gs:// prefix,
and what the uploader needs of the store it delivers to (StoreService, DimseStore).

An item is named by a PurePath whose `.name` is its queue name,
`<arrival ns>-<serial>-<SOP Instance UID>.dcm` (so names sort by arrival); for a local
spool it is the file itself, for a gs:// spool the object name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Protocol

from dicom_adapter.dicom.attributes import InstanceIdentity

SUFFIX = ".dcm"
_UNSAFE = re.compile(r"[^0-9A-Za-z.]")


def queue_name(arrival: int, serial: int, sop_instance_uid: str) -> str:
    """`<arrival ns>-<serial>-<UID>.dcm`, the UID made safe for a file or object name."""
    return f"{arrival}-{serial}-{_UNSAFE.sub('_', sop_instance_uid)}{SUFFIX}"


def name_arrival_ns(name: str) -> int | None:
    """The arrival time encoded in a queue name, None for a name that is not ours."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def name_sop_instance_uid(name: str) -> str:
    """The SOP Instance UID part of a queue name (as made safe by queue_name)."""
    return name.removesuffix(SUFFIX).split("-", 2)[-1]


class Spool(Protocol):
    """A durable queue of received instances, with a failed area beside it."""

    @property
    def incoming(self) -> Path | None:
        """Where C-STORE data sets are received (None: the temp directory)."""
        ...

    @property
    def files_in_place(self) -> bool:
        """True when materialize() returns the queued file itself and release() does nothing
        (then neither is worth a thread hop)."""
        ...

    @property
    def rescan_seconds(self) -> float:
        """How often the uploader looks for items it was not told about (operator requeues)."""
        ...

    def has_room(self) -> bool:
        """False when new instances must be refused (0xA700)."""
        ...

    def refusal(self, size: int) -> str | None:
        """Why an instance of `size` bytes must be refused now (0xA700), or None."""
        ...

    def refused(self, size: int) -> None:
        """An instance of `size` bytes could not be written: not ready until it would fit."""
        ...

    def add_incoming(self, delta: int) -> None:
        """Bytes of data sets being received changed by `delta` (from the receiving files)."""
        ...

    def free_bytes(self) -> int:
        """Bytes free where instances are received (for the refusal's log line)."""
        ...

    def commit(self, path: Path, sop_instance_uid: str) -> PurePath:
        """Make a received file durable in the queue; only then may it be acknowledged."""
        ...

    def queued(self) -> Sequence[PurePath]:
        """The queue in arrival order (blocking: call it off the event loop)."""
        ...

    def depth(self) -> int:
        """How many instances wait in the queue (cheap: /metrics calls it)."""
        ...

    def oldest_age(self) -> float:
        """Seconds since the oldest queued instance arrived (cheap: /metrics calls it)."""
        ...

    def materialize(self, item: PurePath) -> Path:
        """A local file holding the item; FileNotFoundError when it is gone (blocking)."""
        ...

    def release(self, item: PurePath, local: Path) -> None:
        """Done with materialize()'s file (blocking)."""
        ...

    def delivered(self, item: PurePath) -> None:
        """The upstream stored it: remove it from the queue (blocking)."""
        ...

    def fail(self, item: PurePath, reason: dict[str, Any]) -> object:
        """Move it to the failed area with its reason; returns where it went (blocking)."""
        ...

    def close(self) -> None:
        """Give up the spool (what is queued stays for the next run)."""
        ...


@dataclass(frozen=True)
class StoreOutcome:
    """A store's result (STOW-RS or C-STORE): the DIMSE status, plus why, for a reason file."""

    status: int
    http_status: int = 0
    body_excerpt: str = ""
    comment: str = ""  # ErrorComment when the instance was not stored
    named: bool = False  # the answer had a result of this instance's own (not the request's)


class InstanceStore(Protocol):
    """What an uploader needs of a destination (StoreService for STOW-RS, DimseStore)."""

    async def store(self, path: Path, identity: InstanceIdentity) -> int:
        """Store one instance; the DIMSE status."""

    async def store_answer(self, path: Path, identity: InstanceIdentity) -> StoreOutcome:
        """Store one instance for a waiting C-STORE; the status and its ErrorComment."""

    async def store_batch(
        self, items: Sequence[tuple[Path, InstanceIdentity]], *, may_exist: bool = False
    ) -> list[StoreOutcome]:
        """Store several spooled instances; one outcome each, in order."""

    async def store_outcome(
        self, path: Path, identity: InstanceIdentity, *, may_exist: bool = False
    ) -> StoreOutcome:
        """Store one spooled instance; the status plus details for a failed-area reason."""
