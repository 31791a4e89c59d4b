"""The cooling-fan vibration data set (Sunaga, Kondo, Matsutani, IEEE Micro 2023).

Read straight from the published layout: one zip per recording folder
``<size>_<speed>_<type>_<environment>[_<part>].zip``, holding one CSV per spectrum named
by its recording time (``YYYY-MM-DD-hh-mm-ss.csv``), 512 lines ``index, amplitude`` with
index 0..511. A spectrum becomes one float32 row of 512 amplitudes; rows keep the time
order of the file names.

Parsing is done with NumPy on the joined bytes of a whole zip (about 0.1 s per zip); the
result is kept in ``<cache>/parsed/cooling-fan/<name>-<size>-<mtime>.npz`` so later runs
read one small file per recording.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import DataError, UsageError
from .locate import cache_root, find_dataset
from .task import Task

N_BINS = 512
SIZES = ("8cm", "12cm", "14cm")
SPEEDS = ("h", "m", "l", "o", "hmlo")
TYPES = ("normal", "damage1", "damage2")
ENVIRONMENTS = ("silentA", "silentB", "noisy")
PARTS = ("", "1", "2")  # "" = a constant-speed recording without a part suffix

_NAME_RE = re.compile(r"^(\d+cm)_([a-z]+)_([a-z0-9]+)_([A-Za-z]+)(?:_(\d+))?$")
_CSV_RE = re.compile(r"(?:^|/)(\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d)\.csv$")


@dataclass(frozen=True)
class Recording:
    """One recording folder (one zip) of the data set."""
    name: str
    size: str
    speed: str
    type: str
    environment: str
    part: str
    path: Path


@dataclass
class FanSpectra:
    """Spectra of several recordings, stacked in recording then time order."""
    x: np.ndarray              # (n, 512) float32 amplitudes at index 0..511
    recording: np.ndarray      # (n,) int64 index into ``recordings``
    recordings: list[Recording]
    times: list[str]           # (n,) CSV time stamps, "YYYY-MM-DD-hh-mm-ss"


def parse_recording_name(name: str) -> tuple[str, str, str, str, str] | None:
    """``12cm_hmlo_damage1_noisy_1`` -> ("12cm", "hmlo", "damage1", "noisy", "1")."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    size, speed, typ, env, part = m.groups()
    return size, speed, typ, env, part or ""


def list_recordings(data_dir: str | os.PathLike | None = None, *,
                    size: str | Iterable[str] | None = None,
                    speed: str | Iterable[str] | None = None,
                    type: str | Iterable[str] | None = None,
                    environment: str | Iterable[str] | None = None,
                    part: str | Iterable[str] | None = None) -> list[Recording]:
    """The recordings (zips) that match every given filter, sorted by name.

    Each filter is one value or several; ``None`` matches everything. ``part`` is
    ``"1"``, ``"2"`` or ``""`` (constant-speed recordings, which have no part)."""
    folder = find_dataset("cooling-fan", data_dir).path
    filters = {
        "size": _as_set(size, SIZES, "size"),
        "speed": _as_set(speed, SPEEDS, "speed"),
        "type": _as_set(type, TYPES, "type"),
        "environment": _as_set(environment, ENVIRONMENTS, "environment"),
        "part": _as_set(part, PARTS, "part"),
    }
    out = []
    for p in sorted(folder.glob("*.zip")):
        fields = parse_recording_name(p.stem)
        if fields is None:
            continue
        rec = Recording(p.stem, *fields, path=p)
        if all(allowed is None or getattr(rec, key) in allowed for key, allowed in filters.items()):
            out.append(rec)
    return out


def _as_set(value: str | Iterable[str] | None, known: Sequence[str], what: str) -> set[str] | None:
    if value is None:
        return None
    values = {value} if isinstance(value, str) else {str(v) for v in value}
    if what == "part":
        values = {v.lstrip("_") for v in values}
    unknown = sorted(values - set(known))
    if unknown:
        shown = ", ".join(repr(k) for k in known)
        raise UsageError(f"unknown fan {what} {', '.join(map(repr, unknown))}: use {shown}")
    return values


# ---------------------------------------------------------------- parsing one zip

def parse_spectrum_csvs(blobs: Sequence[bytes], names: Sequence[str], where: str) -> np.ndarray:
    """Parse CSV files of 512 ``index, amplitude`` lines into an (n, 512) float32 array.

    ``names`` label each blob in error messages; ``where`` names the containing file. Each file
    is parsed on its own into a row of the result: the text of a whole zip as Python tokens
    (about 11 MB for one recording) is never held at once."""
    n = len(blobs)
    out = np.empty((n, N_BINS), np.float32)
    expected = np.arange(N_BINS, dtype=np.float64)
    for i, (blob, name) in enumerate(zip(blobs, names)):
        lines = blob.rstrip().count(b"\n") + 1 if blob.strip() else 0
        if lines != N_BINS:
            raise DataError(f"{where}: {name} has {lines} lines, expected {N_BINS} "
                            f"('index, amplitude' for index 0..{N_BINS - 1})")
        tokens = blob.replace(b",", b" ").split()
        values = None
        if len(tokens) == N_BINS * 2:
            try:
                values = np.array(tokens, dtype=np.float64).reshape(N_BINS, 2)
            except ValueError:
                values = None
        if values is None:  # find the offending line for the message
            _check_one_csv(blob, name, where)
            raise DataError(f"{where}: could not parse {name}")  # pragma: no cover
        bad = np.flatnonzero(values[:, 0] != expected)
        if bad.size:
            line = int(bad[0])
            raise DataError(f"{where}: {name} line {line + 1}: index is {values[line, 0]:g}, "
                            f"expected {line} (lines must be 'index, amplitude' in index order)")
        if not np.all(np.isfinite(values[:, 1])):
            line = int(np.flatnonzero(~np.isfinite(values[:, 1]))[0])
            raise DataError(f"{where}: {name} line {line + 1}: amplitude is not a finite number")
        out[i] = values[:, 1]  # float64 -> float32, as the whole-array cast rounded it
    return out


def _check_one_csv(blob: bytes, name: str, where: str) -> None:
    for lineno, line in enumerate(blob.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(b",")
        if len(fields) != 2:
            raise DataError(f"{where}: {name} line {lineno}: expected 2 comma-separated values "
                            f"'index, amplitude', got {len(fields)}: {line[:60]!r}")
        for f in fields:
            try:
                float(f)
            except ValueError:
                raise DataError(f"{where}: {name} line {lineno}: not a number: "
                                f"{f.strip()[:40].decode(errors='replace')!r}") from None


def read_recording_zip(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Parse one recording zip: (n, 512) float32 spectra in time order, and their times."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = []
            for info in z.infolist():
                m = _CSV_RE.search(info.filename)
                if m and not info.is_dir() and "__MACOSX" not in info.filename:
                    members.append((m.group(1), info.filename))
            members.sort()
            blobs = [z.read(name) for _, name in members]
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DataError(f"{path}: damaged or truncated zip file ({e}); "
                        f"delete it and fetch it again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not members:
        raise DataError(f"{path}: no spectrum files (YYYY-MM-DD-hh-mm-ss.csv) inside")
    times = [t for t, _ in members]
    if len(set(times)) != len(times):
        raise DataError(f"{path}: two spectra share one time stamp")
    x = parse_spectrum_csvs(blobs, [n for _, n in members], str(path))
    return x, times


def _cache_file(path: Path) -> Path:
    """``<stem>-<hash of the zip's absolute path>-<size>-<mtime_ns>.npz``."""
    st = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    return (cache_root() / "parsed" / "cooling-fan"
            / f"{path.stem}-{where}-{st.st_size}-{st.st_mtime_ns}.npz")


def load_recording(path: str | os.PathLike, *, cache: bool = True) -> tuple[np.ndarray, list[str]]:
    """Like :func:`read_recording_zip`, through the parsed cache (keyed by size + mtime)."""
    path = Path(path)
    if not cache:
        return read_recording_zip(path)
    try:
        cfile = _cache_file(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if cfile.is_file():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                x, times = z["x"], [str(t) for t in z["times"]]
            if x.dtype == np.float32 and x.shape == (len(times), N_BINS):
                return x, times
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            pass
    x, times = read_recording_zip(path)
    _write_cache(cfile, x=x, times=np.array(times))
    return x, times


def _write_cache(cfile: Path, **arrays: np.ndarray) -> None:
    from ..io_atomic import write_atomic
    try:
        write_atomic(cfile, lambda f: np.savez(f, **arrays))
        # Drop stale entries of the same file (same name and path hash, older size/mtime).
        prefix = cfile.name.rsplit("-", 2)[0]
        for old in cfile.parent.glob(prefix + "-*.npz"):
            if old != cfile and old.name.rsplit("-", 2)[0] == prefix:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache only costs speed


def load_fan(data_dir: str | os.PathLike | None = None, *, cache: bool = True,
             **filters: Any) -> FanSpectra:
    """Spectra of every recording matching ``filters`` (see :func:`list_recordings`)."""
    recs = list_recordings(data_dir, **filters)
    if not recs:
        raise DataError(f"no cooling-fan recordings match {filters or 'any filter'}")
    return _stack(recs, cache=cache)


def _stack(recs: list[Recording], *, cache: bool) -> FanSpectra:
    xs, idx, times = [], [], []
    for i, rec in enumerate(recs):
        x, t = load_recording(rec.path, cache=cache)
        xs.append(x)
        idx.append(np.full(len(x), i, dtype=np.int64))
        times.extend(t)
    return FanSpectra(np.concatenate(xs), np.concatenate(idx), recs, times)


# ---------------------------------------------------------------- built-in tasks

def damage_task(damage: str, data_dir: str | os.PathLike | None = None, *,
                cache: bool = True, **options: Any) -> Task:
    """Damage detection with a deployment gap: quiet rooms -> next to a ventilation fan.

    Classes ``normal`` (0) and ``damage1``/``damage2`` (1), 12 cm fan, ``hmlo`` recordings.
    Pre-train on ``silentA_1`` + ``silentB_1``, fine-tune on ``noisy_1``, test on
    ``noisy_2``; ``extra_tests["silent"]`` is ``silentA_2`` + ``silentB_2``. Splits are whole
    recording parts, so neighbouring spectra never fall on both sides."""
    if damage not in ("damage1", "damage2"):
        raise UsageError(f"unknown damage type '{damage}': use damage1 or damage2")
    if options:
        raise UsageError(f"{damage}: unknown option(s) {', '.join(sorted(options))}; "
                         f"this task takes only 'cache'")
    labels = ["normal", damage]
    recs = list_recordings(data_dir, size="12cm", speed="hmlo", type=labels)
    by_key = {(r.type, r.environment, r.part): r for r in recs}

    def split(envs: Sequence[str], part: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for cls, typ in enumerate(labels):
            for env in envs:
                rec = by_key.get((typ, env, part))
                if rec is None:
                    raise DataError(f"cooling-fan: recording 12cm_hmlo_{typ}_{env}_{part}.zip is "
                                    f"missing (needed by the {damage} task)")
                x, _ = load_recording(rec.path, cache=cache)
                xs.append(x)
                ys.append(np.full(len(x), cls, dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    silent = ("silentA", "silentB")
    x_pre, y_pre = split(silent, "1")
    x_ft, y_ft = split(("noisy",), "1")
    x_te, y_te = split(("noisy",), "2")
    x_si, y_si = split(silent, "2")
    return Task(
        name=damage, labels=labels,
        x_pretrain=x_pre, y_pretrain=y_pre, x_finetune=x_ft, y_finetune=y_ft,
        x_test=x_te, y_test=y_te, extra_tests={"silent": (x_si, y_si)},
        defaults={"hidden": [96, 96], "epochs": 100 if damage == "damage1" else 60,
                  "batch_size": 20, "lr": 0.01, "pretrain_epochs": 100},
        description=(f"12 cm fan, normal vs {damage} (hmlo): pre-train silentA_1+silentB_1, "
                     f"fine-tune noisy_1, test noisy_2; 'silent' = silentA_2+silentB_2"),
    )


def damage1_task(data_dir: str | os.PathLike | None = None, **options: Any) -> Task:
    """The paper's Damage1 task (unbalanced fan with holes); see :func:`damage_task`."""
    return damage_task("damage1", data_dir, **options)


def damage2_task(data_dir: str | os.PathLike | None = None, **options: Any) -> Task:
    """The paper's Damage2 task (chipped blade); see :func:`damage_task`."""
    return damage_task("damage2", data_dir, **options)


#: The fan spectra's 1-D CNN (``edgetune pretrain --task damage1-1d`` builds it). A spectrum's
#: bins sit at fixed frequencies, so the features are flattened, not averaged over position
#: (global average pooling gave 0.52 test accuracy where flatten gives 0.66 before and 0.98
#: after fine-tuning; docs/cnn.md).
FAN_CNN = "conv:8:9:4:4,relu,maxpool:2,conv:16:5:2:2,relu,maxpool:2,flatten,dense:32,relu"


def _one_channel(task: Task, name: str) -> Task:
    """The same task with every spectrum as one channel, (n, 1, 512), for a 1-D CNN."""
    return Task(
        name=name, labels=task.labels,
        x_pretrain=task.x_pretrain[:, None, :], y_pretrain=task.y_pretrain,
        x_finetune=task.x_finetune[:, None, :], y_finetune=task.y_finetune,
        x_test=task.x_test[:, None, :], y_test=task.y_test,
        extra_tests={k: (x[:, None, :], y) for k, (x, y) in task.extra_tests.items()},
        defaults={**{k: v for k, v in task.defaults.items() if k != "hidden"}, "arch": FAN_CNN,
                  "pretrain_epochs": 40, "pretrain_lr": 0.02},
        description=f"{task.description}; each spectrum one channel of {N_BINS} bins",
    )


def damage1_1d_task(data_dir: str | os.PathLike | None = None, **options: Any) -> Task:
    """:func:`damage1_task` with samples of shape (1, 512), for a 1-D CNN."""
    return _one_channel(damage_task("damage1", data_dir, **options), "damage1-1d")


def damage2_1d_task(data_dir: str | os.PathLike | None = None, **options: Any) -> Task:
    """:func:`damage2_task` with samples of shape (1, 512), for a 1-D CNN."""
    return _one_channel(damage_task("damage2", data_dir, **options), "damage2-1d")
