"""Tasks and inputs from CSV files.

A CSV task is a folder holding ``pretrain.csv``, ``finetune.csv`` and ``test.csv`` (and
optionally ``eval_NAME.csv``, an extra test set): one sample per row, a header row, the
label in the column named ``label`` (else the last column) and every other column a
feature. Labels may be whole numbers (0..C-1) or names; names are numbered in sorted order
over all files, and kept as the task's label names.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..errors import DataError

CSV_SPLITS = ("pretrain", "finetune", "test")
MAX_CSV_BYTES = 2 << 30  # refuse a file that would not fit a small machine's memory as floats


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if size > MAX_CSV_BYTES:
        raise DataError(f"{path}: {size} bytes is more than this reader takes ({MAX_CSV_BYTES}); convert it to .npz")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path}: empty CSV file")
    return [c.strip() for c in rows[0]], rows[1:]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_features(path: str | os.PathLike) -> np.ndarray:
    """Rows of features from a CSV file (a header row is recognised and skipped)."""
    path = Path(path)
    header, rows = _rows(path)
    if not all(_is_number(c) for c in header):
        data = rows
    else:
        data = [header] + rows
    return _floats(path, data, first_line=1 if data is rows else 0, skip=None)


def _floats(path: Path, rows: list[list[str]], *, first_line: int, skip: int | None) -> np.ndarray:
    if not rows:
        raise DataError(f"{path}: no data rows")
    width = len(rows[0])
    out = np.empty((len(rows), width - (skip is not None)), np.float32)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise DataError(f"{path}, line {i + first_line + 1}: {len(row)} columns, expected {width}")
        vals = [c for j, c in enumerate(row) if j != skip]
        try:
            out[i] = [float(c) for c in vals]
        except ValueError:
            bad = next(c for c in vals if not _is_number(c))
            raise DataError(f"{path}, line {i + first_line + 1}: {bad!r} is not a number") from None
    if not np.isfinite(out).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return out


def load_csv_task(folder: str | os.PathLike) -> "Task":
    """A task from a folder of CSV files (see the module's docstring)."""
    from .task import Task

    folder = Path(folder)
    files = {s: folder / f"{s}.csv" for s in CSV_SPLITS}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f"{folder}: a CSV task folder needs pretrain.csv, finetune.csv and test.csv; "
                        f"missing {', '.join(missing)}")
    for extra in sorted(folder.glob("eval_*.csv")):
        files[extra.stem] = extra
    raw = {}
    header0 = None
    for split, f in files.items():
        header, rows = _rows(f)
        if header0 is None:
            header0 = header
        elif header != header0:
            raise DataError(f"{f}: its header differs from {files['pretrain'].name}'s")
        col = header.index("label") if "label" in header else len(header) - 1
        if len(header) < 2:
            raise DataError(f"{f}: needs at least one feature column and a label column")
        raw[split] = (f, rows, col)
    labels_text = [r[col].strip() for _, rows, col in raw.values() for r in rows if len(r) > col]
    numeric = all(t.lstrip("-").isdigit() for t in labels_text)
    names = [] if numeric else sorted(set(labels_text))
    index = {n: k for k, n in enumerate(names)}
    arrays = {}
    for split, (f, rows, col) in raw.items():
        x = _floats(f, rows, first_line=1, skip=col)
        ys = [r[col].strip() for r in rows]
        y = np.asarray([int(t) for t in ys] if numeric else [index[t] for t in ys], np.int64)
        arrays[split] = (x, y)
    extra = {k[len("eval_"):]: v for k, v in arrays.items() if k.startswith("eval_")}
    return Task(name=folder.name, labels=names, extra_tests=extra,
                **{f"{a}_{s}": arrays[s][i] for s in CSV_SPLITS for i, a in enumerate("xy")})
