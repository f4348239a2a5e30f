"""A step source for step-driven training loops (inversion, generators, meta-learning episodes).

Lightning resumes a mid-epoch checkpoint exactly only when the loader is stateful
(``state_dict``/``load_state_dict``); a plain ``range`` would restart the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class ResumableRange:
    """Iterates ``0 .. length - 1`` and resumes where a checkpoint left off.

    Args:
        length: number of steps in one pass.
    """

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"a step source needs at least one step, got {length}")
        self.length = length
        self._next = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        # A loop that stops after len(self) items never resumes the generator to its end: a pass that
        # reached the last step starts the next epoch from 0.
        start, self._next = self._next % self.length, 0
        for step in range(start, self.length):
            # Advance before yielding: a checkpoint saved after step s resumes at s + 1.
            self._next = step + 1
            yield step
        self._next = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next": self._next % self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = int(state["next"])
