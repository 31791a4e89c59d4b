"""Shared helpers: BLAS threads, machine description, timing, tables and targets.

Nothing here imports torch or matplotlib; the sections that need them import them lazily.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- BLAS threads

from edgetune.threads import get_blas_threads, set_blas_threads  # noqa: E402,F401  (one implementation, re-exported)

DEFAULT_BLAS_THREADS = get_blas_threads()


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_description() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        text = f"{cfg.get('name')} {cfg.get('version')}"
        extra = cfg.get("openblas configuration")
        if extra:
            text += f" ({' '.join(str(extra).split())})"
        return text
    except Exception:  # older NumPy: no dict mode
        return "unknown (numpy.show_config() has no dict mode)"


def machine_info(torch_threads: int | None = None) -> dict[str, str]:
    info = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores ({platform.machine()})",
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas": blas_description(),
        "blas threads": f"default {DEFAULT_BLAS_THREADS}" if DEFAULT_BLAS_THREADS else "unknown (not OpenBLAS)",
        "load": "1/5/15-min load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    try:
        import torch

        info["torch"] = f"{torch.__version__} (default {torch_threads or torch.get_num_threads()} threads)"
    except ImportError:
        info["torch"] = "not installed (pip install edgetune[torch])"
    info["peft"] = peft_version() or "not installed"
    return info


def peft_version() -> str | None:
    """PEFT's version if installed, without importing it (its import takes seconds)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return None
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


# ---------------------------------------------------------------- timing

def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_call(fn: Callable[[], Any], *, repeats: int = 5, number: int = 1, warmup: int = 1) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` timings of ``number`` calls."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter
    out = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(number):
            fn()
        out.append((clock() - t0) / number)
    return median(out)


# ---------------------------------------------------------------- report

def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


@dataclass
class Table:
    title: str
    columns: list[tuple[str, str]]          # (key, header)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        head = [h for _, h in self.columns]
        cells = [[fmt(r.get(k)) for k, _ in self.columns] for r in self.rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for c in cells:
            lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Target:
    name: str
    measured: float | None     # the measured value, in the unit of ``threshold``
    threshold: float
    higher_is_better: bool = True
    unit: str = "x"
    detail: str = ""

    @property
    def status(self) -> str:
        if self.measured is None or self.measured != self.measured:
            return "N/A"
        ok = self.measured >= self.threshold if self.higher_is_better else self.measured <= self.threshold
        return "PASS" if ok else "MISS"

    def row(self) -> dict[str, Any]:
        op = ">=" if self.higher_is_better else "<="
        return {"target": self.name, "want": f"{op} {fmt(float(self.threshold))}{self.unit}",
                "measured": "-" if self.measured is None else f"{fmt(float(self.measured))}{self.unit}",
                "status": self.status, "detail": self.detail}


@dataclass
class Report:
    """Everything one suite run prints: tables, targets and free-text findings."""
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)   # raw numbers for --json

    def table(self, title: str, columns: list[tuple[str, str]]) -> Table:
        t = Table(title, columns)
        self.tables.append(t)
        return t

    def targets_table(self) -> Table:
        t = Table("Targets", [("target", "target"), ("want", "want"), ("measured", "measured"),
                              ("status", "status"), ("detail", "detail")])
        for tg in self.targets:
            t.add(**tg.row())
        return t


def emit(text: str, file=None) -> None:
    print(text, file=file or sys.stdout, flush=True)


def finish(results: Any, json_path: str | None) -> None:
    """The machine lines under a table, and the raw results as JSON (written atomically)."""
    for k, v in machine_info().items():
        if k in ("cpu", "python", "numpy"):
            emit(f"- {k}: {v}")
    if json_path:
        from edgetune.io_atomic import write_json_atomic

        write_json_atomic(json_path, results)
