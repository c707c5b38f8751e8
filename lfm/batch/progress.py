"""A progress line for batch jobs: rows done / total, rows/s, output tokens/s and ETA, on stderr.

On a terminal it redraws one line at most twice a second; in a log file (not a tty) it prints a line every 10 s.
"""

from __future__ import annotations

import sys
import time


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, done: int = 0, enabled: bool = True, stream=None) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.tokens = 0
        self.errors = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self._last = time.monotonic()

    def update(self, rows: int, tokens: int, errors: int = 0) -> None:
        self.done += rows
        self.tokens += tokens
        self.errors += errors
        now = time.monotonic()
        if self.enabled and now - self._last >= (0.5 if self.tty else 10.0):
            self._last = now
            self._draw(False)

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        new = self.done - self.start_done
        rps = new / dt
        err = f"  {self.errors} errors" if self.errors else ""
        if not self.total:  # a streamed input (Ray Data readers): no total, no ETA
            return f"{self.done} rows  {rps:.2f} rows/s  {self.tokens / dt:.1f} tok/s  elapsed {_hms(dt)}{err}"
        eta = (self.total - self.done) / rps if rps > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        eta_s = _hms(eta) if eta != float("inf") else "?"
        return (f"{self.done}/{self.total} rows ({pct:.0f}%)  {rps:.2f} rows/s  {self.tokens / dt:.1f} tok/s  "
                f"elapsed {_hms(dt)}  ETA {eta_s}{err}")

    def _draw(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(True)
