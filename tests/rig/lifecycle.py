"""One `with` protocol for the rig's services: entering starts, leaving stops."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """A service that `with` starts and stops (also when the body raised)."""

    def start(self) -> object:
        """Bring the service up (ready when it returns)."""
        raise NotImplementedError

    def stop(self) -> object:
        """Bring it down and release what it holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
