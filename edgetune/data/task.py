"""A fine-tuning task: pre-train, fine-tune and test splits, plus what describes them.

A task comes from a built-in name (``BUILTIN_TASKS``: ``damage1``, ``damage2``, ``har``,
and their convolutional forms ``damage1-1d``, ``damage2-1d``, ``har-raw``) or from an ``.npz``
file with the arrays ``x_pretrain, y_pretrain, x_finetune, y_finetune, x_test, y_test``
(optional: ``labels``, and extra test sets as ``x_eval_<name>`` / ``y_eval_<name>``).
"""
from __future__ import annotations

import importlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError, UsageError

SPLITS = ("pretrain", "finetune", "test")

@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: where its loader is, which data set it reads, one sample's shape."""
    loader: str                    # "module:function", called as (data_dir, **options) -> Task
    data_set: str                  # the data set it reads (edgetune data fetch NAME)
    input_shape: tuple[int, ...]   # (features,), or channels first (C, L)


# Built-in tasks by name. Loaders are imported only when asked for, so the core stays light.
BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "damage1": BuiltinTask("edgetune.data.fan:damage1_task", "cooling-fan", (512,)),
    "damage2": BuiltinTask("edgetune.data.fan:damage2_task", "cooling-fan", (512,)),
    "damage1-1d": BuiltinTask("edgetune.data.fan:damage1_1d_task", "cooling-fan", (1, 512)),
    "damage2-1d": BuiltinTask("edgetune.data.fan:damage2_1d_task", "cooling-fan", (1, 512)),
    "har": BuiltinTask("edgetune.data.har:har_task", "hapt", (150,)),
    "har-raw": BuiltinTask("edgetune.data.har:har_raw_task", "hapt", (6, 128)),
}


@dataclass
class Task:
    name: str
    x_pretrain: np.ndarray
    y_pretrain: np.ndarray
    x_finetune: np.ndarray
    y_finetune: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str] = field(default_factory=list)
    # Further test sets reported after fine-tuning, e.g. {"silent": (x, y)} for forgetting.
    extra_tests: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Paper defaults for this task: epochs, batch_size, lr, hidden (list of widths).
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        # Validate every split first: the class count is read from labels only once they
        # are known to be whole, non-negative numbers.
        n_named = len(self.labels) or None
        named = ""
        if n_named:
            shown = ", ".join(self.labels[:5]) + (" ..." if n_named > 5 else "")
            named = f"the 'labels' array names {n_named} classes: {shown}"
        for split in SPLITS:
            x, y = validate_xy(getattr(self, f"x_{split}"), getattr(self, f"y_{split}"),
                               n_classes=n_named, what=f"{self.name}: {split}", y_name=f"y_{split}",
                               classes_from=named)
            setattr(self, f"x_{split}", x)
            setattr(self, f"y_{split}", y)
        if not self.labels:
            seen = np.unique(np.concatenate([self.y_pretrain, self.y_finetune, self.y_test]))
            n_classes = int(seen[-1]) + 1
            if len(seen) != n_classes:
                where = next(f"y_{s}" for s in SPLITS if getattr(self, f"y_{s}").max() == n_classes - 1)
                missing = sorted(set(range(n_classes)) - set(seen.tolist()))
                shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise DataError(f"{self.name}: labels must be the classes 0..K-1 without gaps, but the "
                                f"largest label is {n_classes - 1} (in {where}) and {len(missing)} classes below it never "
                                f"occur ({shown}); fix the labels or give a 'labels' array naming every class")
            self.labels = [str(i) for i in range(n_classes)]
        width = self.x_pretrain.shape[1:]
        for split in SPLITS[1:]:
            w = getattr(self, f"x_{split}").shape[1:]
            if w != width:
                raise DataError(f"{self.name}: x_{split} has samples of shape {_shape(w)} but x_pretrain has "
                                f"{_shape(width)}")
        for key, (x, y) in list(self.extra_tests.items()):
            x, y = validate_xy(x, y, n_classes=len(self.labels), what=f"{self.name}: eval '{key}'",
                               y_name=f"y_eval_{key}", classes_from=named)
            if x.shape[1:] != width:
                raise DataError(f"{self.name}: eval '{key}' has samples of shape {_shape(x.shape[1:])}, "
                                f"expected {_shape(width)}")
            self.extra_tests[key] = (x, y)

    @property
    def n_features(self) -> int:
        """Values per sample (a sample of shape (C, L) has C * L)."""
        return int(np.prod(self.x_pretrain.shape[1:]))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (features,), or channels first (C, L) / (C, H, W)."""
        return tuple(int(v) for v in self.x_pretrain.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def summary(self) -> str:
        parts = [f"{s} {len(getattr(self, 'y_' + s))}" for s in SPLITS]
        parts += [f"{k} {len(y)}" for k, (_, y) in self.extra_tests.items()]
        shape = f"{self.n_features} features" if len(self.input_shape) == 1 else \
            f"samples of shape {_shape(self.input_shape)}"
        return (f"{self.name}: {shape}, {self.n_classes} classes "
                f"({', '.join(self.labels)}); samples: " + ", ".join(parts))

    def drop_pretrain(self) -> None:
        """Free the pre-train split once nothing reads it any more (``edgetune finetune`` after its
        backbone is trained): the arrays become empty, the sample shape (``n_features``,
        ``input_shape``) and the labels stay."""
        self.x_pretrain = np.empty((0, *self.x_pretrain.shape[1:]), self.x_pretrain.dtype)
        self.y_pretrain = np.empty(0, self.y_pretrain.dtype)

    def save_npz(self, path: str | os.PathLike) -> Path:
        from ..io_atomic import write_atomic

        arrays: dict[str, np.ndarray] = {}
        for s in SPLITS:
            arrays[f"x_{s}"] = getattr(self, f"x_{s}")
            arrays[f"y_{s}"] = getattr(self, f"y_{s}")
        arrays["labels"] = np.array(self.labels)
        for k, (x, y) in self.extra_tests.items():
            arrays[f"x_eval_{k}"] = x
            arrays[f"y_eval_{k}"] = y
        return write_atomic(path, lambda f: np.savez(f, **arrays))


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")" if len(shape) != 1 else str(shape[0])


def validate_xy(x: Any, y: Any, *, n_classes: int | None = None, what: str = "data", y_name: str = "y",
                classes_from: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Check and convert a feature matrix and its labels; raise DataError naming the problem.

    ``y_name`` names the label array in messages; ``classes_from`` says where ``n_classes``
    came from, so a wrong class list is told apart from a wrong label.
    """
    try:
        x = np.asarray(x)
        y = np.asarray(y)
    except ValueError as e:  # ragged nested lists
        raise DataError(f"{what}: x and y must be rectangular arrays ({e})") from None
    if x.ndim < 2:
        raise DataError(f"{what}: x must be a 2-D array (samples, features), or (samples, channels, ...) "
                        f"for a convolutional backbone; got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{what}: x is empty (0 samples)")
    if 0 in x.shape[1:]:
        raise DataError(f"{what}: x has 0 features (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{what}: x must be real numbers, got dtype {x.dtype}")
    if y.ndim != 1:
        raise DataError(f"{what}: y must be a 1-D array of class indices, got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{what}: x contains NaN or inf (first at sample {bad[0]}, feature {bad[1]})")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{what}: y must hold whole class indices, got non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: y must hold class indices (integers), got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or (n_classes is not None and y.max() >= n_classes):
        hi = f"0..{n_classes - 1}" if n_classes is not None else ">= 0"
        source = f" ({classes_from})" if classes_from else ""
        raise DataError(f"{what}: {y_name}: labels must be in {hi}{source}, "
                        f"found {int(y.min())}..{int(y.max())}")
    if x.dtype != np.float32 and x.dtype != np.float64:
        x = x.astype(np.float32)
    return x, y


def _check_npz_headers(path: Path) -> None:
    """Refuse an array whose header claims more bytes than its zip member holds.

    A damaged or crafted header (say, a shape of 10**14 rows) would otherwise make NumPy
    try to allocate it before noticing the data is not there.
    """
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-len(".npy")]
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:  # a newer format: np.load checks it
                        continue
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise DataError(f"{path}: array '{name}' has an unreadable header ({e})") from None
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed > info.file_size:
                shown = "x".join(map(str, shape)) or "scalar"
                raise DataError(f"{path}: array '{name}' claims shape {shown} ({claimed} bytes of "
                                f"{dtype}) but the file holds only {info.file_size} bytes for it: "
                                f"the file is damaged")


def read_npz_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` task file, with each header checked against the bytes the
    file holds before anything is read (a damaged or hostile file gets a DataError)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a valid .npz task file (not a zip archive of .npy arrays)")
    try:
        _check_npz_headers(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a valid .npz task file ({e})") from None


def load_npz_task(path: str | os.PathLike) -> Task:
    path = Path(path)
    arrays = read_npz_arrays(path)
    missing = [f"{a}_{s}" for s in SPLITS for a in "xy" if f"{a}_{s}" not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)} "
                        f"(a task file needs x_/y_ pretrain, finetune and test)")
    labels = [str(v) for v in arrays["labels"].tolist()] if "labels" in arrays else []
    extra = {}
    for k in arrays:
        if k.startswith("x_eval_"):
            name = k[len("x_eval_"):]
            if f"y_eval_{name}" not in arrays:
                raise DataError(f"{path}: {k} has no matching y_eval_{name}")
            extra[name] = (arrays[k], arrays[f"y_eval_{name}"])
    return Task(name=path.stem, labels=labels, extra_tests=extra,
                **{f"{a}_{s}": arrays[f"{a}_{s}"] for s in SPLITS for a in "xy"})


def load_task(spec: str, data_dir: str | os.PathLike | None = None, **options: Any) -> Task:
    """A built-in task by name, a task file (``.npz``) or a folder of CSV files by path."""
    if spec in BUILTIN_TASKS:
        mod_name, fn_name = BUILTIN_TASKS[spec].loader.split(":")
        fn: Callable[..., Task] = getattr(importlib.import_module(mod_name), fn_name)
        return fn(data_dir, **options)
    if Path(spec).is_dir():
        from .csv_task import load_csv_task
        return load_csv_task(spec)
    if spec.endswith(".npz") or os.path.sep in spec or Path(spec).is_file():
        return load_npz_task(spec)
    raise UsageError(f"unknown task '{spec}': use one of {', '.join(sorted(BUILTIN_TASKS))}, the path of an "
                     f".npz task file or a folder of CSV files (pretrain.csv, finetune.csv, test.csv)")
