"""The one polling helper of the tests: wait for a condition, never sleep a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

POLL_INTERVAL = 0.05


class PollTimeout(TimeoutError):
    """A polled condition did not hold in time; the message names what was awaited."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = POLL_INTERVAL,
    detail: Callable[[], str] | None = None,
    pause: Callable[[float], object] = time.sleep,
) -> T:
    """Call `predicate` until it returns a truthy value, and return that value.

    Raises PollTimeout naming `what` (plus `detail()`, e.g. a log tail) after `timeout`
    seconds. The predicate may raise to end the wait early (the awaited process died).
    `pause(seconds)` waits between calls: time.sleep unless something can wake it sooner.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PollTimeout(_message(what, timeout, detail))
        pause(min(interval, remaining))


@overload
async def wait_until_async(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    what: str,
    *,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def wait_until_async(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


async def wait_until_async(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    detail: Callable[[], str] | None = None,
) -> Any:
    """`wait_until` for a running event loop: awaits between calls (and awaits the predicate's
    result when it is awaitable), so the code under test keeps running."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PollTimeout(_message(what, timeout, detail))
        await asyncio.sleep(min(interval, remaining))


def _message(what: str, timeout: float, detail: Callable[[], str] | None) -> str:
    text = f"timed out after {timeout} s waiting for {what}"
    return f"{text}\n{detail()}" if detail is not None else text
