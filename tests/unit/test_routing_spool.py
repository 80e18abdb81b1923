"""Per-destination spool queues (importer/destinations.py): hard links, never copies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dicom_adapter.importer.destinations import (
    DestinationQueue,
    DestinationSpools,
    recorded_destinations,
)
from dicom_adapter.importer.routing import Destination
from dicom_adapter.spool.local import LocalSpool

WEB = Destination(stow_url="http://b.test/dicom-web/studies")
PACS = Destination(aet="PACS", host="pacs.test", port=104)
NO_HEADROOM = 0


def spools(root: Path, max_bytes: int = 0) -> DestinationSpools:
    nothing: Any = None  # commit touches only the spools
    local = LocalSpool(root, headroom_bytes=NO_HEADROOM, max_bytes=max_bytes)
    result = DestinationSpools(DestinationQueue(None, local, nothing, nothing))
    for destination in (WEB, PACS):
        spool = result.open_spool(destination)
        result.add(DestinationQueue(destination, spool, nothing, nothing))
    return result


def received(root: Path, name: str = "cstore-1.dcm") -> Path:
    path = root / "incoming" / name
    path.write_bytes(b"instance bytes")
    return path


def test_commit_links_one_inode_into_each_destination_queue(tmp_path: Path) -> None:
    fanout = spools(tmp_path)
    path = received(tmp_path)
    inode = path.stat().st_ino
    done = fanout.commit(path, "1.2.3", [WEB, PACS])
    assert [queue.destination for queue, _ in done] == [WEB, PACS]
    assert not path.exists()  # the received name is gone
    linked = [Path(p) for _, p in done]
    assert [p.parent for p in linked] == [
        tmp_path / "dest" / WEB.id / "queue",
        tmp_path / "dest" / PACS.id / "queue",
    ]
    assert {p.stat().st_ino for p in linked} == {inode}  # no copy
    assert linked[0].stat().st_nlink == 2
    linked[0].unlink()  # the first destination has it
    assert linked[1].stat().st_nlink == 1
    assert linked[0].name.endswith("-1.2.3.dcm") and linked[0].name == linked[1].name
    assert fanout.depth() == 1


def test_no_destination_is_the_default_queue(tmp_path: Path) -> None:
    fanout = spools(tmp_path)
    [(queue, path)] = fanout.commit(received(tmp_path), "1.2.4", [])
    assert queue is fanout.default
    assert path.parent == tmp_path / "queue"


def test_a_failed_link_leaves_nothing_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fanout = spools(tmp_path)
    path = received(tmp_path)
    real_link = os.link
    calls = []

    def link_once_then_fail(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_once_then_fail)
    with pytest.raises(OSError):
        fanout.commit(path, "1.2.5", [WEB, PACS])
    assert path.exists()  # still the association's: it is answered 0xA700 and removed
    assert not list(tmp_path.glob("**/queue/*.dcm"))


def test_destinations_are_recorded_beside_their_queue(tmp_path: Path) -> None:
    spools(tmp_path)
    assert sorted(recorded_destinations(tmp_path), key=lambda d: d.key) == sorted(
        [WEB, PACS], key=lambda d: d.key
    )


def test_the_byte_cap_counts_a_routed_instance_once_until_its_last_delivery(
    tmp_path: Path,
) -> None:
    size = len(b"instance bytes")
    fanout = spools(tmp_path, max_bytes=2 * size)
    root = fanout.default.spool
    assert isinstance(root, LocalSpool)
    done = fanout.commit(received(tmp_path), "1.2.3", [WEB, PACS])
    fanout.commit(received(tmp_path, "cstore-2.dcm"), "1.2.4", [WEB])
    assert root.used_bytes == 2 * size
    assert root.refusal(size) is not None  # the cap holds with routing
    assert root.recount() == 2 * size  # the walk sees dest/ and each inode once
    (web_queue, web_path), (pacs_queue, pacs_path) = done
    web_queue.spool.delivered(web_path)
    assert root.used_bytes == 2 * size  # still linked in PACS's queue
    pacs_queue.spool.delivered(pacs_path)
    assert root.used_bytes == size
    assert root.refusal(size) is None
