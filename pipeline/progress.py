"""A quiet progress line with a rate and an ETA, for stages that run for minutes or hours.

Prints to stderr at most every `every` seconds (and once at the end), so logs from a DAG
task or a cluster driver stay readable:

    [quality] parts 12/40  rows 120,431  2,310 rows/s  ETA 0:01:20
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta


class Progress:
    def __init__(self, label: str, total_parts: int, every: float = 5.0, stream=None) -> None:
        self.label = label
        self.total = total_parts
        self.every = every
        self.stream = stream or sys.stderr
        self.parts = 0
        self.rows = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, parts: int = 0, rows: int = 0) -> None:
        self.parts += parts
        self.rows += rows
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.rows / elapsed
        if 0 < self.parts < self.total:
            eta = str(timedelta(seconds=round(elapsed * (self.total - self.parts) / self.parts)))
        elif self.parts >= self.total:
            eta = "done"
        else:
            eta = "?"
        return (
            f"[{self.label}] parts {self.parts}/{self.total}  rows {self.rows:,}  "
            f"{rate:,.{0 if rate >= 10 else 2}f} rows/s  elapsed {timedelta(seconds=round(elapsed))}  ETA {eta}"
        )

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        self._print()
