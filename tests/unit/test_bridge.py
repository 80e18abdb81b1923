"""Unit tests for the thread/event-loop boundary (dicom_adapter.bridge.Bridge)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass

import pytest

from dicom_adapter.bridge import Bridge
from dicom_adapter.errors import BridgeClosedError, BridgeError

WAIT = 5.0  # upper bound for things that should happen at once; never slept


@dataclass
class LoopThread:
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-event-loop", daemon=True)
    thread.start()
    yield LoopThread(loop, thread)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    assert not thread.is_alive()
    loop.close()


@pytest.fixture
def bridge(loop_thread: LoopThread) -> Iterator[Bridge]:
    bridge = Bridge(loop_thread.loop, blocking_workers=2)
    yield bridge
    close(bridge, 0)


def close(bridge: Bridge, grace: float) -> None:
    """Run bridge.close(grace) on its loop from this (non-loop) thread."""
    asyncio.run_coroutine_threadsafe(bridge.close(grace), bridge.loop).result(WAIT + grace)


async def add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


# --------------------------------------------------------------------------------------------
# run / run_with_timeout
# --------------------------------------------------------------------------------------------


def test_run_returns_value(bridge: Bridge) -> None:
    assert bridge.run(add, 2, 3) == 5


def test_run_passes_kwargs(bridge: Bridge) -> None:
    assert bridge.run(add, 2, b=40) == 42


def test_run_executes_on_the_loop_thread(bridge: Bridge, loop_thread: LoopThread) -> None:
    async def where() -> str:
        return threading.current_thread().name

    assert bridge.run(where) == "test-event-loop"


def test_run_propagates_exception(bridge: Bridge) -> None:
    with pytest.raises(ValueError, match=r"^boom$"):
        bridge.run(fail, "boom")


def test_run_with_timeout_returns_in_time(bridge: Bridge) -> None:
    assert bridge.run_with_timeout(WAIT, add, 1, 1) == 2


def test_run_with_timeout_propagates_exception(bridge: Bridge) -> None:
    with pytest.raises(ValueError, match=r"^bad$"):
        bridge.run_with_timeout(WAIT, fail, "bad")


def test_run_with_timeout_cancels_the_coroutine(bridge: Bridge) -> None:
    started = threading.Event()
    cancelled = threading.Event()
    finished = threading.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finished.set()

    began = time.monotonic()
    with pytest.raises(TimeoutError):
        bridge.run_with_timeout(0.1, slow)
    assert time.monotonic() - began < WAIT
    assert started.is_set()
    assert cancelled.wait(WAIT)
    assert not finished.is_set()


def test_run_from_loop_thread_is_refused(bridge: Bridge) -> None:
    async def reentrant() -> BaseException | None:
        try:
            bridge.run(add, 1, 2)
        except BridgeError as exc:
            return exc
        return None

    # A bounded outer call: a deadlock would surface as TimeoutError, not a hung test.
    error = bridge.run_with_timeout(WAIT, reentrant)
    assert isinstance(error, BridgeError)
    assert not isinstance(error, BridgeClosedError)
    assert "loop" in str(error)


def test_run_with_timeout_from_loop_thread_is_refused(bridge: Bridge) -> None:
    async def reentrant() -> BaseException | None:
        try:
            bridge.run_with_timeout(1.0, add, 1, 2)
        except BridgeError as exc:
            return exc
        return None

    assert isinstance(bridge.run_with_timeout(WAIT, reentrant), BridgeError)


def test_iterate_from_loop_thread_is_refused(bridge: Bridge) -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1

    async def reentrant() -> BaseException | None:
        try:
            next(bridge.iterate(numbers))
        except BridgeError as exc:
            return exc
        return None

    assert isinstance(bridge.run_with_timeout(WAIT, reentrant), BridgeError)


# --------------------------------------------------------------------------------------------
# iterate
# --------------------------------------------------------------------------------------------


def test_iterate_yields_in_order(bridge: Bridge) -> None:
    finalized = threading.Event()

    async def numbers(count: int, start: int = 0) -> AsyncIterator[int]:
        try:
            for i in range(start, start + count):
                await asyncio.sleep(0)
                yield i
        finally:
            finalized.set()

    assert list(bridge.iterate(numbers, 5, start=10)) == [10, 11, 12, 13, 14]
    assert finalized.is_set()


def test_iterate_empty(bridge: Bridge) -> None:
    async def nothing() -> AsyncIterator[int]:
        return
        yield  # pragma: no cover

    assert list(bridge.iterate(nothing)) == []


def test_iterate_early_break_closes_generator(bridge: Bridge) -> None:
    produced: list[int] = []
    finalized = threading.Event()
    closed_at_yield: list[int] = []

    async def numbers() -> AsyncIterator[int]:
        try:
            for i in range(100):
                produced.append(i)
                try:
                    yield i
                except GeneratorExit:
                    closed_at_yield.append(i)
                    raise
        finally:
            finalized.set()

    received: list[int] = []
    for item in bridge.iterate(numbers):
        received.append(item)
        if item == 2:
            break
    assert received == [0, 1, 2]
    assert finalized.is_set()  # closed before the consumer went on, not at garbage collection
    assert produced == [0, 1, 2]  # nothing pulled ahead
    assert closed_at_yield == [2]  # closed right where the consumer stopped


def test_iterate_explicit_close_runs_finally_on_loop(
    bridge: Bridge, loop_thread: LoopThread
) -> None:
    finally_thread: list[str] = []

    async def numbers() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            finally_thread.append(threading.current_thread().name)

    iterator = bridge.iterate(numbers)
    assert isinstance(iterator, Generator)
    assert next(iterator) == 1
    iterator.close()
    assert finally_thread == ["test-event-loop"]


def test_iterate_consumer_exception_closes_generator(bridge: Bridge) -> None:
    finalized = threading.Event()

    async def numbers() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            finalized.set()

    with pytest.raises(KeyError):
        for _ in bridge.iterate(numbers):
            raise KeyError("consumer failed")
    assert finalized.is_set()


def test_iterate_propagates_generator_exception(bridge: Bridge) -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1
        raise ValueError("page 2 failed")

    received: list[int] = []
    with pytest.raises(ValueError, match="page 2 failed"):
        for item in bridge.iterate(numbers):
            received.append(item)
    assert received == [1]


def test_iterate_runs_on_loop_thread(bridge: Bridge) -> None:
    async def names() -> AsyncIterator[str]:
        yield threading.current_thread().name

    assert list(bridge.iterate(names)) == ["test-event-loop"]


# --------------------------------------------------------------------------------------------
# submit / close
# --------------------------------------------------------------------------------------------


def test_submit_runs_task_and_close_waits(bridge: Bridge) -> None:
    done = threading.Event()

    async def work(delay: float) -> None:
        await asyncio.sleep(delay)
        done.set()

    bridge.submit(work, 0.2)
    close(bridge, WAIT)
    assert done.is_set()
    assert bridge.pending_tasks == 0


def test_submit_passes_arguments(bridge: Bridge) -> None:
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    async def record(number: int, *, label: str) -> None:
        seen.append((number, label))
        done.set()

    bridge.submit(record, 7, label="report")
    assert done.wait(WAIT)
    assert seen == [(7, "report")]


def test_close_cancels_tasks_beyond_grace(bridge: Bridge) -> None:
    started = threading.Event()
    cancelled = threading.Event()
    finished = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finished.set()

    bridge.submit(forever)
    assert started.wait(WAIT)
    began = time.monotonic()
    close(bridge, 0.1)
    assert time.monotonic() - began < WAIT
    assert cancelled.is_set()
    assert not finished.is_set()
    assert bridge.pending_tasks == 0


def test_close_waits_for_fast_and_cancels_slow(bridge: Bridge) -> None:
    fast_done = threading.Event()
    slow_cancelled = threading.Event()

    async def fast() -> None:
        await asyncio.sleep(0.05)
        fast_done.set()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            slow_cancelled.set()
            raise

    bridge.submit(fast)
    bridge.submit(slow)
    close(bridge, 0.5)
    assert fast_done.is_set()
    assert slow_cancelled.is_set()


def test_submit_failure_is_logged_not_raised(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise RuntimeError("report delivery failed")

    with caplog.at_level(logging.ERROR, logger="dicom_adapter.bridge"):
        bridge.submit(broken)
        close(bridge, WAIT)
    failures = [r for r in caplog.records if r.name == "dicom_adapter.bridge"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert str(failures[0].exc_info[1]) == "report delivery failed"


def test_after_close_run_and_submit_are_refused(bridge: Bridge) -> None:
    close(bridge, 0)
    with pytest.raises(BridgeClosedError):
        bridge.run(add, 1, 2)
    with pytest.raises(BridgeClosedError):
        bridge.run_with_timeout(1.0, add, 1, 2)

    never = threading.Event()

    async def work() -> None:
        never.set()

    with pytest.raises(BridgeClosedError):
        bridge.submit(work)

    async def numbers() -> AsyncIterator[int]:
        never.set()
        yield 1

    with pytest.raises(BridgeClosedError):
        next(bridge.iterate(numbers))
    assert not never.is_set()


def test_closed_error_is_out_of_resources(bridge: Bridge) -> None:
    close(bridge, 0)
    with pytest.raises(BridgeClosedError) as info:
        bridge.run(add, 1, 2)
    assert info.value.status == 0xA700


# --------------------------------------------------------------------------------------------
# run_blocking
# --------------------------------------------------------------------------------------------


def test_run_blocking_runs_in_worker_thread(bridge: Bridge, loop_thread: LoopThread) -> None:
    def blocking(a: int, *, b: int) -> tuple[str, int]:
        time.sleep(0.01)  # the kind of call that must not run on the loop
        return threading.current_thread().name, a * b

    async def call() -> tuple[str, str, int]:
        loop_name = threading.current_thread().name
        worker_name, product = await bridge.run_blocking(blocking, 6, b=7)
        return loop_name, worker_name, product

    loop_name, worker_name, product = bridge.run(call)
    assert loop_name == loop_thread.thread.name
    assert worker_name != loop_name
    assert worker_name.startswith("bridge-blocking")
    assert product == 42


def test_run_blocking_propagates_exception(bridge: Bridge) -> None:
    def broken() -> None:
        raise OSError("association rejected")

    async def call() -> None:
        await bridge.run_blocking(broken)

    with pytest.raises(OSError, match="association rejected"):
        bridge.run(call)


def test_run_blocking_keeps_loop_responsive(bridge: Bridge) -> None:
    release = threading.Event()

    def blocked() -> str:
        assert release.wait(WAIT)
        return "released"

    async def call() -> str:
        task = asyncio.ensure_future(bridge.run_blocking(blocked))
        await asyncio.sleep(0)
        # The loop still runs other coroutines while the worker thread blocks.
        assert await add(1, 1) == 2
        release.set()
        return await task

    assert bridge.run_with_timeout(WAIT, call) == "released"


def test_run_blocking_after_close_is_refused(bridge: Bridge) -> None:
    close(bridge, 0)

    async def call() -> int:
        return await bridge.run_blocking(int, "1")

    future = asyncio.run_coroutine_threadsafe(call(), bridge.loop)
    with pytest.raises(BridgeClosedError):
        future.result(WAIT)
