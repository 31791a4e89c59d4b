"""Change detection on a stream of scores: the Page-Hinkley test.

It watches for a sustained *rise* of the mean (a detector's normalised anomaly score after
the device is moved), and fires once per change: after firing it starts again from
nothing, so one change is one event (a detector that keeps firing on the same change is one
of the complaints river's users made). A short burst of high values adds at most
``burst_length x (clip - mean)`` to the statistic; ``threshold`` sets how long a shift must
last before it counts as a change rather than a run of alarms.
"""
from __future__ import annotations

import math

from ..errors import UsageError


class PageHinkley:
    """``update(x) -> bool``: True on the sample where a sustained upward shift is detected.

    ``delta``: the shift tolerated without counting (in the units of x); ``threshold``: the
    cumulative excess that signals a change; ``min_samples``: samples seen since the last
    reset before a change may be signalled; values are clipped to ``clip`` so that one
    extreme sample cannot signal a change on its own."""

    def __init__(self, delta: float = 0.1, threshold: float = 50.0, min_samples: int = 30,
                 clip: float = 4.0):
        for name, v in (("delta", delta), ("threshold", threshold), ("clip", clip)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise UsageError(f"Page-Hinkley {name} must be a non-negative number, got {v!r}")
        if threshold <= 0 or clip <= 0:
            raise UsageError("Page-Hinkley threshold and clip must be positive")
        if not isinstance(min_samples, int) or min_samples < 1:
            raise UsageError(f"Page-Hinkley min_samples must be a whole number >= 1, got {min_samples!r}")
        self.delta, self.threshold, self.min_samples, self.clip = float(delta), float(threshold), min_samples, float(clip)
        self.n_detections = 0
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.sum = 0.0
        self.min_sum = 0.0

    @property
    def statistic(self) -> float:
        return self.sum - self.min_sum

    def update(self, x: float) -> bool:
        if not math.isfinite(x):
            return False  # a non-finite score is not evidence of anything
        x = min(float(x), self.clip)
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.sum += x - self.mean - self.delta
        self.min_sum = min(self.min_sum, self.sum)
        if self.n >= self.min_samples and self.statistic > self.threshold:
            self.n_detections += 1
            self.reset()
            return True
        return False

    def state(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "sum": self.sum, "min_sum": self.min_sum,
                "n_detections": self.n_detections}

    def set_state(self, s: dict[str, float]) -> None:
        self.n, self.mean, self.sum = int(s["n"]), float(s["mean"]), float(s["sum"])
        self.min_sum, self.n_detections = float(s["min_sum"]), int(s["n_detections"])
