"""Human activity recognition from the raw UCI HAPT smartphone signals.

Source: ``RawData/`` of the UCI "Smartphone-Based Recognition of Human Activities and
Postural Transitions" data set (30 volunteers, waist-worn phone, 50 Hz), read from a
folder or straight from a zip (``RawData/`` may sit under a top folder inside the zip):

- ``acc_expEE_userUU.txt`` / ``gyro_expEE_userUU.txt``: one row ``x y z`` per sample
  (accelerometer in g, gyroscope in rad/s);
- ``labels.txt``: ``experiment user activity start end`` (0-based inclusive rows).

Windows follow the UCI HAR recipe: 128 samples (2.56 s) with 50 % overlap, cut inside each
labelled segment of the six basic activities (1..6); postural transitions (7..12) are
ignored. Each window becomes the feature vector described by ``HAR_FEATURE_NAMES`` (see
:func:`window_features`) for the ``har`` task, or stays raw, (6, 128) ``RAW_CHANNELS``
(body acceleration and gyroscope, see :func:`raw_signals`), for the ``har-raw`` task.
Extraction takes a few seconds, so both are cached in ``<cache>/parsed/hapt/``, keyed by
the source's size and mtime.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DataError, UsageError
from .locate import cache_root, find_dataset
from .task import Task

RATE_HZ = 50.0
WINDOW = 128
STEP = 64
ACTIVITIES = ["walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying"]

CHANNELS = ["acc_x", "acc_y", "acc_z", "acc_mag", "gyro_x", "gyro_y", "gyro_z", "gyro_mag"]
# Per channel, in this order. "energy" is the mean square; bands are fractions of the
# window's variance (mean removed) in 0.39-1.5, 1.5-3, 3-6, 6-12 and 12-25 Hz.
BANDS_HZ = [(0.0, 1.5), (1.5, 3.0), (3.0, 6.0), (6.0, 12.0), (12.0, 25.01)]
PER_CHANNEL = ["mean", "std", "min", "max", "p25", "median", "p75", "energy",
               "mean_cross_rate", "mean_abs_diff",
               "dom_freq", "spec_centroid", "spec_entropy"] + \
              [f"band_{lo:g}_{min(hi, 25):g}hz" for lo, hi in BANDS_HZ]
CORRELATIONS = ["corr_acc_xy", "corr_acc_xz", "corr_acc_yz",
                "corr_gyro_xy", "corr_gyro_xz", "corr_gyro_yz"]
HAR_FEATURE_NAMES: list[str] = [f"{c}_{f}" for c in CHANNELS for f in PER_CHANNEL] + CORRELATIONS
FEATURE_VERSION = 1  # bump when the features change, so caches are rebuilt

_FILE_RE = re.compile(r"(acc|gyro)_exp(\d+)_user(\d+)\.txt$")


# ---------------------------------------------------------------- features

#: Windows whose features are computed together (bounds the float64 intermediates to ~10 MB).
FEATURE_BLOCK = 256


def window_features(w: np.ndarray) -> np.ndarray:
    """Features of windows ``w`` (n, 128, 6: acc xyz, gyro xyz) -> (n, 150) float32.

    Per channel (acc x/y/z, |acc|, gyro x/y/z, |gyro|):
      mean, std, min, max, 25th/50th/75th percentiles, energy (mean square),
      mean-crossing rate (fraction of sample pairs that cross the window mean),
      mean absolute difference between neighbouring samples (jerkiness),
      dominant frequency in Hz (largest non-DC FFT bin), spectral centroid in Hz,
      spectral entropy (0 = one frequency .. 1 = flat spectrum), and the fraction of
      the variance in five frequency bands (0.39-1.5, 1.5-3, 3-6, 6-12, 12-25 Hz).
    Then the Pearson correlations of acc x/y, x/z, y/z and gyro x/y, x/z, y/z.
    Everything is vectorised over all windows at once (float64 inside, float32 out)."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 3 or w.shape[1:] != (WINDOW, 6):
        raise DataError(f"HAR windows must have shape (n, {WINDOW}, 6), got {w.shape}")
    acc, gyro = w[:, :, 0:3], w[:, :, 3:6]
    sig = np.concatenate([acc, np.linalg.norm(acc, axis=2, keepdims=True),
                          gyro, np.linalg.norm(gyro, axis=2, keepdims=True)], axis=2)
    sig = sig.transpose(0, 2, 1)  # (n, 8 channels, 128)
    mean = sig.mean(axis=2)
    centred = sig - mean[:, :, None]
    std = centred.std(axis=2)
    p25, med, p75 = np.percentile(sig, [25, 50, 75], axis=2)
    energy = np.mean(sig * sig, axis=2)
    sign = centred >= 0
    mcr = np.mean(sign[:, :, 1:] != sign[:, :, :-1], axis=2)
    mad = np.mean(np.abs(np.diff(sig, axis=2)), axis=2)

    spec = np.abs(np.fft.rfft(centred, axis=2)) ** 2  # (n, 8, 65)
    spec[:, :, 1:-1] *= 2.0                            # one-sided power
    spec /= WINDOW * WINDOW                            # sums to the variance
    freqs = np.fft.rfftfreq(WINDOW, d=1.0 / RATE_HZ)
    power = spec[:, :, 1:]
    f = freqs[1:]
    total = power.sum(axis=2)
    safe_total = np.where(total > 1e-12, total, 1.0)
    p = power / safe_total[:, :, None]
    dom = f[np.argmax(power, axis=2)]
    centroid = (p * f).sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=2) / np.log(len(f))
    flat = total <= 1e-12  # a constant signal: no frequency content at all
    dom = np.where(flat, 0.0, dom)
    centroid = np.where(flat, 0.0, centroid)
    ent = np.where(flat, 0.0, ent)
    bands = [np.where(flat, 0.0, p[:, :, (f > lo) & (f <= hi)].sum(axis=2)) for lo, hi in BANDS_HZ]

    per_channel = np.stack([mean, std, sig.min(axis=2), sig.max(axis=2), p25, med, p75, energy,
                            mcr, mad, dom, centroid, ent, *bands], axis=2)  # (n, 8, 18)
    corr = []
    for group in (0, 4):
        for a, b in ((0, 1), (0, 2), (1, 2)):
            ca, cb = centred[:, group + a], centred[:, group + b]
            den = std[:, group + a] * std[:, group + b] * WINDOW
            num = np.sum(ca * cb, axis=1)
            corr.append(np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), 0.0))
    feats = np.concatenate([per_channel.reshape(len(w), -1), np.stack(corr, axis=1)], axis=1)
    return feats.astype(np.float32)


# ---------------------------------------------------------------- raw windows

#: Channels of a raw window (``har-raw``), in this order: body acceleration (total
#: acceleration minus the gravity estimate of :func:`gravity`) in g, gyroscope in rad/s.
RAW_CHANNELS = ["body_acc_x", "body_acc_y", "body_acc_z", "gyro_x", "gyro_y", "gyro_z"]
RAW_VERSION = 1  # bump when the raw windows change, so caches are rebuilt
#: Gravity is what a 3rd-order Butterworth low-pass at 0.3 Hz keeps (the UCI HAR authors'
#: corner frequency), applied forward and backward, so it has no phase delay.
GRAVITY_CUTOFF_HZ = 0.3
GRAVITY_ORDER = 3
def gravity(acc: np.ndarray, rate: float = RATE_HZ, cutoff: float = GRAVITY_CUTOFF_HZ,
            order: int = GRAVITY_ORDER) -> np.ndarray:
    """The slow part of signals ``acc`` (rows, k): a zero-phase low-pass of one recording.

    The gain at frequency f is ``1 / (1 + (tan(pi f / rate) / tan(pi cutoff / rate)) ** (2 order))``:
    the squared magnitude of the digital (bilinear) Butterworth low-pass of that order, which
    is what filtering forward and backward with it (``filtfilt``) applies. It is applied in
    the frequency domain to the recording followed by its mirror image (rows n-2 .. 1), a
    periodic signal without a jump at either end: near a recording's ends the estimate
    assumes the motion continues as its reflection."""
    acc = np.asarray(acc, dtype=np.float64)
    n = len(acc)
    ext = np.concatenate([acc, acc[-2:0:-1]])
    freq = np.fft.rfftfreq(len(ext), d=1.0 / rate)
    ratio = np.tan(np.pi * freq / rate) / np.tan(np.pi * cutoff / rate)
    with np.errstate(over="ignore"):
        gain = 1.0 / (1.0 + ratio ** (2 * order))
    return np.fft.irfft(np.fft.rfft(ext, axis=0) * gain[:, None], n=len(ext), axis=0)[:n]


def raw_signals(data: np.ndarray) -> np.ndarray:
    """One recording's (rows, 6) acc x y z (g), gyro x y z (rad/s) -> the ``RAW_CHANNELS``:
    body acceleration (acc minus :func:`gravity` of acc) and the gyroscope as recorded."""
    out = np.array(data, dtype=np.float64)
    out[:, 0:3] -= gravity(out[:, 0:3])
    return out


# ---------------------------------------------------------------- reading RawData

class _RawSource:
    """RawData files from a folder or a zip, with names relative to ``RawData/``."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if path.suffix.lower() == ".zip":
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"{path}: damaged or truncated zip file ({e}); "
                                f"delete it and fetch it again") from None
            labels = sorted((n for n in self._zip.namelist()
                             if n.endswith("RawData/labels.txt") and "__MACOSX" not in n), key=len)
            if not labels:
                raise DataError(f"{path}: no RawData/labels.txt inside; is this the HAPT data set?")
            self._prefix = labels[0][: -len("labels.txt")]

    def where(self, name: str) -> str:
        if self._zip is not None:
            return f"{self.path}:{self._prefix}{name}"
        return str(self.path / name)

    def names(self) -> list[str]:
        if self._zip is not None:
            n = len(self._prefix)
            return [m[n:] for m in self._zip.namelist() if m.startswith(self._prefix) and "/" not in m[n:]]
        return [p.name for p in self.path.iterdir() if p.is_file()]

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(self._prefix + name)
            return (self.path / name).read_bytes()
        except KeyError:
            raise DataError(f"{self.where(name)}: missing") from None
        except FileNotFoundError:
            raise DataError(f"{self.where(name)}: missing") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DataError(f"{self.where(name)}: damaged zip member ({e}); "
                            f"delete {self.path} and fetch it again") from None
        except OSError as e:
            raise DataError(f"{self.where(name)}: cannot read ({e.strerror or e})") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def parse_table(blob: bytes, columns: int, where: str, dtype: Any = np.float64) -> np.ndarray:
    """Whitespace-separated numbers, ``columns`` per line -> (rows, columns) array."""
    lines = blob.strip().splitlines() if blob.strip() else []
    try:
        values = np.array(blob.split(), dtype=dtype)
    except ValueError:
        values = None
    if values is None or values.size != len(lines) * columns:
        conv = int if np.issubdtype(dtype, np.integer) else float
        for i, line in enumerate(lines, 1):
            fields = line.split()
            if len(fields) != columns:
                raise DataError(f"{where} line {i}: expected {columns} numbers, got {len(fields)}")
            for fld in fields:
                try:
                    conv(fld)
                except ValueError:
                    raise DataError(f"{where} line {i}: not {'an integer' if conv is int else 'a number'}: "
                                    f"{fld[:40].decode(errors='replace')!r}") from None
        raise DataError(f"{where}: could not parse")  # pragma: no cover
    table = values.reshape(len(lines), columns)
    if np.issubdtype(table.dtype, np.floating) and not np.all(np.isfinite(table)):
        row = int(np.argwhere(~np.isfinite(table))[0][0])
        raise DataError(f"{where} line {row + 1}: value is not a finite number")
    return table


@dataclass
class HarWindows:
    """All windows of the six basic activities, as features or raw, and where they came from."""
    x: np.ndarray           # (n, len(HAR_FEATURE_NAMES)) features, or (n, 6, 128) raw windows; float32
    activity: np.ndarray    # (n,) int64 class index 0..5 (activity id - 1)
    subject: np.ndarray     # (n,) int64 user 1..30
    experiment: np.ndarray  # (n,) int64 experiment 1..61
    start: np.ndarray       # (n,) int64 first row of the window in its experiment's files
    segment: np.ndarray     # (n,) int64 row of labels.txt the window was cut from


def extract_windows(path: str | os.PathLike) -> HarWindows:
    """Read RawData (folder or zip), cut windows and compute their features (no cache)."""
    src = _RawSource(Path(path))
    try:
        return _extract(src, raw=False)
    finally:
        src.close()


def extract_raw_windows(path: str | os.PathLike) -> HarWindows:
    """Read RawData (folder or zip) and cut the same windows as :func:`extract_windows`,
    kept raw: (n, 6, 128) float32, channels ``RAW_CHANNELS`` (see :func:`raw_signals`)."""
    src = _RawSource(Path(path))
    try:
        return _extract(src, raw=True)
    finally:
        src.close()


@dataclass
class _Experiment:
    """One experiment's labelled segments of activities 1..6 and their window starts."""
    exp: int
    user: int
    first_row: int                                   # its first line in labels.txt (0-based)
    segments: list[tuple[int, int, int, np.ndarray]]  # (labels row, activity, end, starts)


def _plan(labels: np.ndarray, where: str) -> list[_Experiment]:
    """Every window, from labels.txt alone: which experiment, segment and start row."""
    plan = []
    for exp in np.unique(labels[:, 0]):
        rows = np.flatnonzero(labels[:, 0] == exp)
        users = np.unique(labels[rows, 1])
        if len(users) != 1:
            raise DataError(f"{where}: experiment {exp} lists several users")
        basic = rows[(labels[rows, 2] >= 1) & (labels[rows, 2] <= 6)]
        if basic.size == 0:
            continue
        segments = []
        for r in basic:
            _, _, act, start, end = (int(v) for v in labels[r])
            if start < 0 or end < start:
                raise DataError(f"{where} line {r + 1}: bad segment {start}..{end}")
            segments.append((int(r), act, end, np.arange(start, end + 2 - WINDOW, STEP)))
        plan.append(_Experiment(int(exp), int(users[0]), int(rows[0]), segments))
    return plan


def _read_experiment(src: _RawSource, e: _Experiment, names: set[str]) -> np.ndarray:
    """(rows, 6) float64: acc x y z (g) and gyro x y z (rad/s), checked against the segments."""
    sig = []
    for kind in ("acc", "gyro"):
        name = f"{kind}_exp{e.exp:02d}_user{e.user:02d}.txt"
        if name not in names:
            raise DataError(f"{src.where(name)}: missing (labels.txt line {e.first_row + 1} "
                            f"refers to experiment {e.exp}, user {e.user})")
        sig.append(parse_table(src.read(name), 3, src.where(name)))
    n_rows = min(len(sig[0]), len(sig[1]))
    for r, _, end, _ in e.segments:
        if end >= n_rows:
            short = "acc" if len(sig[0]) <= len(sig[1]) else "gyro"
            raise DataError(
                f"{src.where('labels.txt')} line {r + 1}: segment ends at row {end} but "
                f"{short}_exp{e.exp:02d}_user{e.user:02d}.txt has only {n_rows} rows")
    return np.concatenate([sig[0][:n_rows], sig[1][:n_rows]], axis=1)


def _extract(src: _RawSource, *, raw: bool) -> HarWindows:
    labels = parse_table(src.read("labels.txt"), 5, src.where("labels.txt"), dtype=np.int64)
    if len(labels) == 0:
        raise DataError(f"{src.where('labels.txt')}: no labelled segments")
    plan = _plan(labels, src.where("labels.txt"))
    meta = [np.stack([np.full(starts.size, act - 1), np.full(starts.size, e.user),
                      np.full(starts.size, e.exp), starts, np.full(starts.size, r)], axis=1)
            for e in plan for r, act, _, starts in e.segments]
    n = sum(len(m) for m in meta)
    if n == 0:
        raise DataError(f"{src.where('labels.txt')}: no window of {WINDOW} samples fits in any "
                        f"segment of activities 1..6")
    # One output array, filled an experiment at a time: the peak is the result plus one
    # recording, never a list of blocks and their concatenation.
    x = np.empty((n, len(RAW_CHANNELS), WINDOW) if raw else (n, len(HAR_FEATURE_NAMES)), np.float32)
    names = set(src.names())
    k = 0
    for e in plan:
        data = _read_experiment(src, e, names)
        if raw:
            data = raw_signals(data)
        for _, _, _, starts in e.segments:
            # A block of windows at a time: the float64 feature intermediates of all ~10k
            # windows at once took ~0.5 GB.
            for lo in range(0, starts.size, FEATURE_BLOCK):
                idx = starts[lo:lo + FEATURE_BLOCK, None] + np.arange(WINDOW)[None, :]
                w = data[idx]  # (m, 128, 6)
                x[k:k + len(w)] = w.transpose(0, 2, 1) if raw else window_features(w.astype(np.float32))
                k += len(w)
    m = np.concatenate(meta).astype(np.int64)
    return HarWindows(x, m[:, 0], m[:, 1], m[:, 2], m[:, 3], m[:, 4])


def _source_key(path: Path, version: str) -> str:
    h = hashlib.sha256(f"{version}:{path.resolve()}".encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def load_har_windows(data_dir: str | os.PathLike | None = None, *, cache: bool = True) -> HarWindows:
    """All HAR windows and features, through the parsed cache (``features-<key>.npz``)."""
    return _load(data_dir, cache=cache, raw=False)


def load_har_raw_windows(data_dir: str | os.PathLike | None = None, *, cache: bool = True) -> HarWindows:
    """All HAR windows kept raw, (n, 6, 128), through the parsed cache (``raw-<key>.npz``).
    The same windows in the same order as :func:`load_har_windows`."""
    return _load(data_dir, cache=cache, raw=True)


def _load(data_dir: str | os.PathLike | None, *, cache: bool, raw: bool) -> HarWindows:
    path = find_dataset("hapt", data_dir).path
    extract = extract_raw_windows if raw else extract_windows
    if not cache:
        return extract(path)
    kind, version = ("raw", f"raw{RAW_VERSION}") if raw else ("features", f"v{FEATURE_VERSION}")
    shape = (len(RAW_CHANNELS), WINDOW) if raw else (len(HAR_FEATURE_NAMES),)
    try:
        cfile = cache_root() / "parsed" / "hapt" / f"{kind}-{_source_key(path, version)}.npz"
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    fields = list(HarWindows.__dataclass_fields__)
    if cfile.is_file():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                hw = HarWindows(**{k: z[k] for k in fields})
            if hw.x.dtype == np.float32 and hw.x.shape[1:] == shape and \
                    all(len(getattr(hw, k)) == len(hw.x) for k in fields):
                return hw
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            pass
    hw = extract(path)
    from ..io_atomic import write_atomic
    try:
        write_atomic(cfile, lambda f: _save_npz(f, {k: getattr(hw, k) for k in fields}))
        for old in cfile.parent.glob(f"{kind}-*.npz"):
            if old != cfile:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache only costs speed
    return hw


def _save_npz(f: Any, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (an uncompressed zip of .npy files), a megabyte at a time:
    ``np.savez`` copies 16 MB buffers, which put 14 MB on the first raw load's peak."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            a = np.asarray(a, order="C")
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(a))
                flat, step = a.reshape(-1), max(1, (1 << 20) // a.itemsize)
                for lo in range(0, flat.size, step):
                    member.write(flat[lo:lo + step].tobytes())


# ---------------------------------------------------------------- the task

def split_by_time(hw: HarWindows, mask: np.ndarray, fraction: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Split the windows in ``mask`` per (subject, activity) by time: the first
    ``fraction`` of each group's windows (in experiment, start order) versus the rest.
    The one window that overlaps both sides is dropped. Returns two index arrays."""
    first, rest = [], []
    idx = np.flatnonzero(mask)
    for subj in np.unique(hw.subject[idx]):
        for act in np.unique(hw.activity[idx]):
            g = idx[(hw.subject[idx] == subj) & (hw.activity[idx] == act)]
            if g.size == 0:
                continue
            g = g[np.lexsort((hw.start[g], hw.experiment[g]))]
            k = int(round(g.size * fraction))
            a, b = g[:k], g[k:]
            if a.size and b.size and hw.experiment[a[-1]] == hw.experiment[b[0]] \
                    and hw.start[b[0]] < hw.start[a[-1]] + WINDOW:
                b = b[1:]
            first.append(a)
            rest.append(b)
    return np.concatenate(first), np.concatenate(rest)


def _subjects(value: Iterable[int] | range, what: str) -> set[int]:
    try:
        s = {int(v) for v in value}
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a list of subject numbers 1..30") from None
    if not s or min(s) < 1 or max(s) > 30:
        raise UsageError(f"{what} must be subject numbers in 1..30, got {sorted(s)}")
    return s


def _check_fraction(finetune_fraction: float) -> float:
    if not 0.0 < float(finetune_fraction) < 1.0:
        raise UsageError(f"finetune_fraction must be between 0 and 1, got {finetune_fraction}")
    return float(finetune_fraction)


def subject_splits(hw: HarWindows, pre: set[int], finetune_fraction: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The new-subject protocol of ``har`` and ``har-raw``: indices of the pre-training
    windows (users in ``pre``) and of the other users' windows split by time
    (:func:`split_by_time`) into fine-tune and test."""
    in_pre = np.isin(hw.subject, sorted(pre))
    if not in_pre.any() or in_pre.all():
        raise UsageError(f"pretrain_subjects {sorted(pre)} leave no subject for "
                         f"{'pre-training' if not in_pre.any() else 'fine-tuning'}")
    i_ft, i_te = split_by_time(hw, ~in_pre, finetune_fraction)
    return np.flatnonzero(in_pre), i_ft, i_te


def _split_description(hw: HarWindows, pre: set[int]) -> str:
    new = sorted(set(hw.subject[~np.isin(hw.subject, sorted(pre))].tolist()))
    return (f"pre-train subjects {_ranges(sorted(pre))}, fine-tune/test subjects "
            f"{_ranges(new)} split by time per activity")


def har_task(data_dir: str | os.PathLike | None = None, *,
             pretrain_subjects: Iterable[int] = range(1, 16),
             finetune_fraction: float = 0.5, standardize: bool = False,
             cache: bool = True, **options: Any) -> Task:
    """HAR with a new-subject gap: pre-train on ``pretrain_subjects`` (default users
    1..15); fine-tune and test on the other users, each user's windows split by time per
    activity (first ``finetune_fraction`` fine-tunes, the rest tests, the straddling
    window dropped). Features are raw: the backbone fits its input normalisation on the
    pre-training split and saves it with the model, so a deployed model takes raw features.
    ``standardize=True`` z-scores them here instead (pre-training statistics only)."""
    if options:
        raise UsageError(f"har: unknown option(s) {', '.join(sorted(options))}; this task takes "
                         f"pretrain_subjects, finetune_fraction, standardize, cache")
    pre = _subjects(pretrain_subjects, "pretrain_subjects")
    fraction = _check_fraction(finetune_fraction)
    hw = load_har_windows(data_dir, cache=cache)
    i_pre, i_ft, i_te = subject_splits(hw, pre, fraction)
    x = hw.x
    if standardize:
        mu = x[i_pre].mean(axis=0, dtype=np.float64)
        sd = x[i_pre].std(axis=0, dtype=np.float64)
        sd = np.where(sd > 1e-8, sd, 1.0)
        x = ((x - mu) / sd).astype(np.float32)
    return Task(
        name="har", labels=list(ACTIVITIES),
        x_pretrain=x[i_pre], y_pretrain=hw.activity[i_pre],
        x_finetune=x[i_ft], y_finetune=hw.activity[i_ft],
        x_test=x[i_te], y_test=hw.activity[i_te],
        defaults={"hidden": [96, 96], "epochs": 200, "batch_size": 20, "lr": 0.01,
                  "pretrain_epochs": 50},
        description=(f"UCI HAPT, 6 activities, {len(HAR_FEATURE_NAMES)} window features; "
                     + _split_description(hw, pre)),
    )


#: har-raw's 1-D CNN (``edgetune pretrain --task har-raw`` builds it): three convolutions over
#: the 2.56 s window, pooled to one value per channel. Measured (docs/cnn.md): 0.806 test
#: accuracy on new subjects after 30 pre-training epochs, 0.85 after fine-tuning.
HAR_CNN = "conv:16:5:1:same,relu,maxpool:2,conv:32:5:1:same,relu,maxpool:2,conv:32:3:1:same,relu,gap,dense:32,relu"


def har_raw_task(data_dir: str | os.PathLike | None = None, *,
                 pretrain_subjects: Iterable[int] = range(1, 16),
                 finetune_fraction: float = 0.5, cache: bool = True, **options: Any) -> Task:
    """``har`` with raw windows for a 1-D CNN: the same windows, labels and splits, each
    sample (6, 128): body acceleration x y z (g) and gyroscope x y z (rad/s) over 2.56 s
    (``RAW_CHANNELS``). Not standardised here: the backbone's per-channel input
    normalisation, fitted on the pre-training split, does that."""
    if options:
        raise UsageError(f"har-raw: unknown option(s) {', '.join(sorted(options))}; this task takes "
                         f"pretrain_subjects, finetune_fraction, cache")
    pre = _subjects(pretrain_subjects, "pretrain_subjects")
    fraction = _check_fraction(finetune_fraction)
    hw = load_har_raw_windows(data_dir, cache=cache)
    i_pre, i_ft, i_te = subject_splits(hw, pre, fraction)
    # The splits are consecutive slices of the windows reordered in place: indexing each
    # split out of hw.x would hold a second copy of all 32 MB of windows.
    order = np.concatenate([i_pre, i_ft, i_te])
    x = _gather_in_place(hw.x, order)
    a, b = len(i_pre), len(i_pre) + len(i_ft)
    return Task(
        name="har-raw", labels=list(ACTIVITIES),
        x_pretrain=x[:a], y_pretrain=hw.activity[i_pre],
        x_finetune=x[a:b], y_finetune=hw.activity[i_ft],
        x_test=x[b:], y_test=hw.activity[i_te],
        defaults={"arch": HAR_CNN, "epochs": 60, "batch_size": 20, "lr": 0.01, "pretrain_epochs": 30,
                  "pretrain_lr": 0.05},
        description=(f"UCI HAPT, 6 activities, raw windows of {len(RAW_CHANNELS)} channels x "
                     f"{WINDOW} samples (body acc xyz in g, gyro xyz in rad/s, 50 Hz); "
                     + _split_description(hw, pre)),
    )


def _gather_in_place(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``x[order]`` (distinct indices) built inside ``x`` itself: rows are moved along the
    cycles of the permutation, one row of scratch. Returns the first ``len(order)`` rows."""
    n = len(x)
    perm = np.concatenate([order, np.setdiff1d(np.arange(n), order)])  # new row i <- old perm[i]
    done = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(perm != np.arange(n)).tolist():
        if done[i]:
            continue
        held = x[i].copy()
        j = i
        while True:
            done[j] = True
            src = int(perm[j])
            if src == i:
                x[j] = held
                break
            x[j] = x[src]
            j = src
    return x[:len(order)]


def _ranges(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)
