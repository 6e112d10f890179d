"""A dependency-free progress line: count, rate and ETA on stderr.

On a terminal it redraws one line; in logs (Ray, CI) it prints a line every
few seconds instead of flooding them with carriage returns.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", stream=None, log_every: float = 5.0):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._log_every = log_every if not self._tty else 0.1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last_draw >= self._log_every:
            self._last_draw = now
            self._draw()

    def _line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / self.rate if self.rate > 0 else 0.0
        return f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({pct:5.1f}%)  {self.rate:,.0f} {self.unit}/s  ETA {eta:4.0f}s"

    def _draw(self) -> None:
        end = "\r" if self._tty else "\n"
        print(self._line(), end=end, file=self.stream, flush=True)

    def close(self) -> None:
        print(self._line().replace("ETA    0s", f"in {self.elapsed:.1f}s"), file=self.stream, flush=True)
