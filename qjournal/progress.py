"""Progress bars for long work: on a terminal only, silent otherwise."""
from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar on stderr when it is a terminal (and the work is long enough); else nothing."""

    def __init__(self, total: int, desc: str, unit: str, minimum: int = 1, show: bool = True) -> None:
        self._bar: Any = None
        if show and total >= minimum and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def add(self, n: int) -> None:
        """More work than the total said (the total grows as work is found)."""
        if self._bar is not None:
            self._bar.total = (self._bar.total or 0) + n
            self._bar.refresh()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
