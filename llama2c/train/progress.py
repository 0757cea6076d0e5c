"""Progress lines for slow stretches of a run, and durations as text (no torch).

A ``Progress`` says nothing for a task that finishes quickly; once a task has
run ``after`` seconds it emits ``what done/total | elapsed | ETA t`` at most
every ``every`` seconds, so a long iteration (many micro-batches of a big
batch on a CPU) or a long evaluation is never silent.
"""
from __future__ import annotations

import time
from typing import Callable, Optional


def fmt_duration(seconds: float) -> str:
    """12.3 s, 4m05s, 1h02m (rounded down to what matters)."""
    if seconds != seconds or seconds < 0:     # NaN or negative: unknown
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 100 * 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


class Progress:
    def __init__(self, emit: Callable[[str], None], after: float = 5.0, every: float = 5.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.emit, self.after, self.every, self.clock = emit, float(after), float(every), clock
        self.what: Optional[str] = None
        self.total = 0
        self.t0 = self.last = 0.0

    def begin(self, what: str, total: int) -> None:
        self.what, self.total = what, int(total)
        self.t0 = self.last = self.clock()

    def step(self, done: int) -> Optional[str]:
        """Reports ``done`` of ``total`` when the task is slow; returns the line emitted."""
        if self.what is None:
            return None
        now = self.clock()
        elapsed = now - self.t0
        if elapsed < self.after or (now - self.last < self.every and self.last != self.t0):
            return None
        self.last = now
        eta = elapsed / done * (self.total - done) if done > 0 else float("nan")
        line = f"{self.what} {done}/{self.total} | {fmt_duration(elapsed)} | ETA {fmt_duration(eta)}"
        self.emit(line)
        return line

    def end(self) -> float:
        """Ends the task; returns its duration in seconds."""
        self.what = None
        return self.clock() - self.t0
