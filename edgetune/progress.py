"""A dependency-free progress bar on stderr.

Draws only on a terminal (a log file gets no carriage-return noise) and at most ten
times a second, so it costs nothing measurable inside a training loop.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str = "", *, enabled: bool | None = None,
                 stream: TextIO | None = None, min_interval: float = 0.1):
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.n = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._last = 0.0
        self._min_interval = min_interval

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self._min_interval or self.n >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.n / self.total, 1.0)
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = now - self._start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (f"\r{self.desc} [{bar}] {self.n}/{self.total} "
                f"{elapsed:5.1f}s<{eta:5.1f}s {self.postfix}")
        self.stream.write(line[:120].ljust(80))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
