"""When dicom-export tries a message again: per-message backoff and the sink's circuit breaker."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits in [b/2, b], b = initial·2^(n-1) ≤ max."""

    initial: float = 1.0
    maximum: float = 600.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 = the first delivery)."""
        exponent = min(max(attempt, 1) - 1, 60)  # 2**60 s is past any maximum
        base = min(self.maximum, self.initial * 2.0**exponent)
        return base * (0.5 + rand() / 2)


Probe = Callable[[], Awaitable[None]]
"""One cheap reachability check of the sink (an association, one request); raises if down."""


class CircuitBreaker:
    """Holds every export while the sink is unreachable; one probe per interval reopens it.

    Closed: exports run. `trip` opens it (one WARNING) and starts a single prober task that
    calls `probe` every `interval` seconds; the first probe that returns closes the breaker
    (one INFO) and every waiting export goes on. Nothing is fetched while it is open, so an
    outage costs one probe per interval, not one download and one attempt per message.
    """

    def __init__(
        self, probe: Probe, interval: float, *, on_change: Callable[[float], None] | None = None
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._on_change = on_change or (lambda is_open: None)
        self._closed = asyncio.Event()
        self._closed.set()
        self._prober: asyncio.Task[None] | None = None
        self._opened_at = 0.0
        self.openings = 0

    @property
    def is_open(self) -> bool:
        """True while exports are held."""
        return not self._closed.is_set()

    def trip(self, reason: Exception) -> None:
        """The sink is unreachable: hold exports and probe it (no-op when already open)."""
        if self.is_open:
            return
        self._closed.clear()
        self._on_change(1)
        self._opened_at = time.monotonic()
        self.openings += 1
        logger.warning(
            "the sink is unreachable (%s); holding exports and probing it every %.1f s",
            reason,
            self._interval,
        )
        self._prober = asyncio.get_running_loop().create_task(self._probe_until_reachable())

    async def _probe_until_reachable(self) -> None:
        probes = 0
        while True:
            await asyncio.sleep(self._interval)
            probes += 1
            try:
                await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: still unreachable
                logger.debug("sink probe %d failed: %s", probes, exc)
                continue
            break
        self._closed.set()
        self._on_change(0)
        logger.info(
            "the sink is reachable again after %.1f s (%d probes); resuming exports",
            time.monotonic() - self._opened_at,
            probes,
        )

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until exports may run; False when `timeout` passed first."""
        if self._closed.is_set():
            return True
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop probing (shutdown)."""
        prober, self._prober = self._prober, None
        if prober is not None and not prober.done():
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
