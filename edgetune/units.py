"""Byte sizes as people write them: ``256KB``, ``1.5 MiB``, ``64k``, ``1000000``.

KB/MB/GB are binary (1 KB = 1024 B), the convention of embedded memory budgets; KiB etc.
are accepted too. Anything else is rejected with a message that says what is accepted.
"""
from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float, what: str = "") -> int:
    """Bytes in ``text``; ``what`` (e.g. "--budget") names the option in messages."""
    if isinstance(text, bool):
        raise UsageError(f"not a byte size: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0 or text != text or text == float("inf"):
            raise UsageError(f"a byte size must be a finite number >= 0, got {text}")
        return int(text)
    if str(text).strip().startswith("-"):
        raise UsageError(f"{what or 'a byte size'} must be a positive size (e.g. 256KB), got {text!r}")
    m = _RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"not a byte size: {text!r} (write e.g. 256KB, 1.5MB, 64KiB or 4096)")
    value = float(m.group(1)) * _UNITS[unit]
    if value == float("inf") or value > 2**62:
        raise UsageError(f"not a byte size: {text!r} is larger than any memory")
    return int(value)


def format_exact(n: int) -> str:
    """``format_bytes`` and the exact count, for limits: "4.0 MB (4194305 bytes)" is over 4.0 MB."""
    return f"{format_bytes(n)} ({int(n)} bytes)"


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
