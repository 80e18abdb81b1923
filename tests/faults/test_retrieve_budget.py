"""Fetched instances share one memory budget, and every ending of a C-MOVE gives it back.

In-process importer (tests/component harness) with a scripted DICOMweb upstream; the move
destination is the pynetdicom storage SCP of the C-MOVE harness in tests/rig/component.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dicom_adapter.dicomweb import multipart
from dicom_adapter.dicomweb.instances import MemoryBudget, collect_instances
from dicom_adapter.status import Status
from tests.rig import refused_port, wait_until
from tests.rig.component import (
    Archive,
    RunningImporter,
    Setup,
    c_move,
    cancel_at_second_pending,
    dictionary_flag,
    make_study,
    study_level,
)


def wait_until_returned(importer: RunningImporter, timeout: float = 5.0) -> None:
    """Poll until the importer's fetch budget is back at zero."""
    budget = importer.service.fetch_budget
    wait_until(
        lambda: budget.in_use == 0,
        timeout,
        "the fetch budget back at zero",
        interval=0.02,
        detail=lambda: f"{budget.in_use} bytes still reserved",
    )


def test_cancelled_move_gives_the_budget_back(setup: Setup) -> None:
    instances = make_study(40)
    importer, destination = setup(Archive(instances))
    destination.hold_at = 3  # the queue fills behind the held C-STORE
    budget = importer.service.fetch_budget

    reserved_while_held = 0

    def note_reserved() -> None:
        nonlocal reserved_while_held
        wait_until(lambda: len(destination.received) >= 3, 5.0, "3 instances at the destination")
        reserved_while_held = budget.in_use

    statuses = cancel_at_second_pending(importer, destination, instances[0].study, note_reserved)

    assert statuses[-1].Status == Status.CANCEL
    assert reserved_while_held > 0  # prefetched instances were held in memory
    wait_until_returned(importer)


@pytest.mark.parametrize("ending", ["wado-breaks", "destination-refuses", "destination-down"])
def test_failed_move_gives_the_budget_back(setup: Setup, ending: str) -> None:
    instances = make_study(30)
    flags: tuple[str, ...] = ()
    refusing = contextlib.ExitStack()
    if ending == "destination-down":  # nothing listens where the dictionary points
        flags = (dictionary_flag(refusing.enter_context(refused_port())),)
    statuses = {i.uid: 0xA700 for i in instances} if ending == "destination-refuses" else {}
    archive = Archive(instances, truncate_after_parts=20 if ending == "wado-breaks" else None)
    with refusing:
        importer, _ = setup(archive, *flags, statuses=statuses)
        result = c_move(importer, study_level(instances[0].study))

    assert result.status in (
        Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES,
        Status.OUT_OF_RESOURCES_SUBOPERATIONS,
    )
    assert result.counts()[1] > 0
    assert importer.service.fetch_budget.peak > 0
    wait_until_returned(importer)


def test_budget_spools_what_does_not_fit_and_is_shared(tmp_path: Path) -> None:
    part = 600 << 10
    budget = MemoryBudget(1 << 20)  # room for one part in memory, not two

    async def events(count: int) -> AsyncIterator[multipart.Event]:
        for n in range(count):
            yield multipart.PartStart({"content-type": "application/dicom"})
            for _ in range(part // (64 << 10) + 1):
                yield multipart.PartData(bytes([n]) * (64 << 10))
            yield multipart.PartEnd()

    async def main() -> None:
        kept = [
            item async for item in collect_instances(events(3), spool_dir=tmp_path, budget=budget)
        ]
        assert [item.path is None for item in kept] == [True, False, False]
        assert 0 < budget.in_use <= budget.limit
        assert len(list(tmp_path.iterdir())) == 2
        other = [  # a second fetch at the same time: no room left in memory either
            item async for item in collect_instances(events(1), spool_dir=tmp_path, budget=budget)
        ]
        assert other[0].path is not None
        kept[0].discard()
        assert budget.in_use == 0
        again = [
            item async for item in collect_instances(events(1), spool_dir=tmp_path, budget=budget)
        ]
        assert again[0].path is None and budget.in_use > 0
        for item in [*kept, *other, *again]:
            await item.adiscard()
        assert budget.in_use == 0
        assert list(tmp_path.iterdir()) == []

    asyncio.run(asyncio.wait_for(main(), 30))
