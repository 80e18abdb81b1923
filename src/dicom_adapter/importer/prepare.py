"""What happens to a received instance before it is stored: the Java adapter's order.

Destinations are chosen from the attributes as received (routing, before this), then each
step runs in turn: redaction, then transcoding. A step rewrites the received file in place
(it writes a sibling file and `os.replace`s it over the original), so the file keeps its
owner: the association's cleanup or the spool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

Step = Callable[[Path], None]


class Preparation:
    """The configured steps, run on the C-STORE thread before the instance is stored."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = tuple(steps)

    def __call__(self, path: Path) -> None:
        for step in self.steps:
            step(path)


def build_preparation(steps: Sequence[Step | None]) -> Preparation | None:
    """The configured steps in order (None entries are steps that are off); None when none."""
    active = [step for step in steps if step is not None]
    return Preparation(active) if active else None
