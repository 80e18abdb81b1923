"""The one place where threads (pynetdicom handlers, Pub/Sub callbacks) meet the asyncio loop.

Hazards: a thread that blocks on the loop from the loop thread deadlocks, so `run` and
`iterate` refuse that; a timed-out call cancels its coroutine so nothing keeps running
unobserved; `close` waits for tracked fire-and-forget tasks before the loop goes away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ParamSpec, TypeVar, cast

from dicom_adapter.errors import BridgeClosedError, BridgeError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class Bridge:
    """Runs coroutines on one event loop on behalf of other threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, blocking_workers: int = 8) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=blocking_workers, thread_name_prefix="bridge-blocking"
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop every coroutine runs on."""
        return self._loop

    def _check_caller(self) -> None:
        if self._closed:
            raise BridgeClosedError("the adapter is shutting down")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            raise BridgeError("Bridge.run called from the event loop thread (would deadlock)")

    def run(
        self,
        coro_fn: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run `coro_fn(*args)` on the loop and wait for it; use `run_with_timeout` to bound it."""
        return self.run_with_timeout(None, coro_fn, *args, **kwargs)

    def run_with_timeout(
        self,
        timeout: float | None,
        coro_fn: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run a coroutine from a thread; on timeout cancel it and raise TimeoutError."""
        self._check_caller()
        return self.result(self.start(coro_fn, *args, **kwargs), timeout)

    def start(
        self,
        coro_fn: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> concurrent.futures.Future[T]:
        """Start a coroutine from any thread (even one that must not block); see `result`."""
        if self._closed:
            raise BridgeClosedError("the adapter is shutting down")

        async def call() -> T:
            return await coro_fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(call(), self._loop)

    def result(self, future: concurrent.futures.Future[T], timeout: float | None) -> T:
        """Wait from a thread for a started coroutine; on timeout cancel it, raise TimeoutError."""
        self._check_caller()
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"bridge call timed out after {timeout} s") from None
        except concurrent.futures.CancelledError:
            raise BridgeClosedError("the call was cancelled by shutdown") from None

    def iterate(
        self,
        agen_fn: Callable[P, AsyncIterator[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Iterator[T]:
        """Pull an async generator item by item from a thread; closes it when abandoned."""
        self._check_caller()
        agen = agen_fn(*args, **kwargs)
        finished = False
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(_anext(agen), self._loop)
                try:
                    done, item = future.result()
                except concurrent.futures.CancelledError:
                    raise BridgeClosedError("the iteration was cancelled by shutdown") from None
                if done:
                    finished = True
                    return
                yield cast(T, item)
        finally:
            if not finished and not self._loop.is_closed():
                closer = asyncio.run_coroutine_threadsafe(_aclose(agen), self._loop)
                try:
                    closer.result(timeout=10)
                except Exception:  # closing is best effort; the generator is abandoned
                    logger.warning("async generator did not close cleanly", exc_info=True)

    def submit(
        self,
        coro_fn: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """Start a tracked fire-and-forget task (thread-safe); `close` waits for it."""
        if self._closed:
            raise BridgeClosedError("the adapter is shutting down")

        async def call() -> None:
            try:
                await coro_fn(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("background task failed")

        def start() -> None:
            if self._closed:
                logger.warning("background task dropped: the adapter is shutting down")
                return
            task = self._loop.create_task(call())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._loop.call_soon_threadsafe(start)

    async def run_blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call (pynetdicom SCU, big decode) in the bounded pool, from the loop."""

        def call() -> T:
            return fn(*args, **kwargs)

        if self._closed:
            raise BridgeClosedError("the adapter is shutting down")
        return await self._loop.run_in_executor(self._pool, call)

    @property
    def pending_tasks(self) -> int:
        """Number of tracked background tasks still running."""
        return len(self._tasks)

    async def close(self, grace: float) -> None:
        """Refuse new work, wait up to `grace` seconds for tracked tasks, cancel the rest."""
        self._closed = True
        await asyncio.sleep(0)  # let `start` callbacks queued before closing register their tasks
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _anext(agen: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return False, await agen.__anext__()
    except StopAsyncIteration:
        return True, None


async def _aclose(agen: AsyncIterator[Any]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        await aclose()
