"""Progress bars for long work: on a terminal only, silent otherwise."""
from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar on stderr when it is a terminal (and the work is long enough); else nothing."""

    def __init__(self, total: int, desc: str, unit: str, minimum: int = 1) -> None:
        self._bar: Any = None
        if total >= minimum and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

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
