"""tests/rig/poll.py: the one way tests wait for a condition."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from tests.rig.poll import PollTimeout, wait_until, wait_until_async


def test_returns_the_first_truthy_value() -> None:
    values = iter([None, [], ["found"]])
    assert wait_until(lambda: next(values), 5.0, "a value", interval=0) == ["found"]


def test_times_out_naming_what_it_waited_for_and_the_detail() -> None:
    calls = itertools.count()
    with pytest.raises(PollTimeout) as raised:
        wait_until(lambda: next(calls) < 0, 0.05, "the queue to drain", detail=lambda: "3 left")
    assert "waiting for the queue to drain" in str(raised.value)
    assert "3 left" in str(raised.value)
    assert next(calls) > 1  # polled, not called once and given up
    assert isinstance(raised.value, TimeoutError)


def test_a_predicate_that_raises_ends_the_wait_at_once() -> None:
    def died() -> bool:
        raise RuntimeError("exited with code 1")

    with pytest.raises(RuntimeError, match="exited with code 1"):
        wait_until(died, 60.0, "never")


def test_async_variant_awaits_coroutine_predicates_and_lets_the_loop_run() -> None:
    async def scenario() -> str | None:
        done: list[str] = []
        asyncio.get_running_loop().call_later(0.02, done.append, "set by the loop")

        async def check() -> str | None:
            return done[0] if done else None

        return await wait_until_async(check, 5.0, "the callback")

    assert asyncio.run(scenario()) == "set by the loop"


def test_async_variant_times_out_naming_what() -> None:
    with pytest.raises(PollTimeout, match="waiting for nothing"):
        asyncio.run(wait_until_async(lambda: False, 0.05, "nothing"))
