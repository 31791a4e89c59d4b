"""Anomaly-detection tasks: learn from normal data only, test on normal and anomalous data.

A task is a built-in name or an ``.npz`` file with ``x_train`` (normal samples only),
``x_test``, ``y_test`` (1 = anomaly, 0 = normal), optional ``x_adapt`` (normal samples of a
new environment) and extra test sets ``x_eval_NAME`` / ``y_eval_NAME``.

Built-in tasks on the cooling-fan data set, 12 cm fan (the data set README's tasks):
- ``fan-<S>rpm-<ENV>`` for S in 2500, 2000, 1500, 0 and ENV in silentA, silentB, noisy:
  normal is the constant-speed recording at S rpm; train on its first 200 spectra, test on
  its last 100 (normal) and the last 100 of each other speed (anomalies). The README tests
  on the ``hmlo`` recordings, whose spectra carry no per-sample speed label, so the
  constant-speed recordings of the other speeds stand in for them.
- ``fan-damage1-<ENV>``, ``fan-damage2-<ENV>``: train on ``hmlo_normal_<ENV>_1``; test on
  ``hmlo_normal_<ENV>_2`` (normal) and ``hmlo_damageN_<ENV>_2`` (anomalies).
- ``fan-<T>-move`` for every T above: the detector is moved from the quiet rooms to the
  noisy one. Train on silentA + silentB, ``x_adapt`` = the noisy room's normal training
  part, test in the noisy room; ``extra_tests["silent"]`` is the quiet rooms' test set (is
  the old room remembered after re-learning?).
Splits are whole recording parts or time ranges, never random samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, UsageError

ENVIRONMENTS = ("silentA", "silentB", "noisy")
RPM_SPEEDS = {"2500rpm": "h", "2000rpm": "m", "1500rpm": "l", "0rpm": "o"}
DAMAGES = ("damage1", "damage2")
FAN_TASKS = tuple(RPM_SPEEDS) + DAMAGES
N_TRAIN, N_TEST = 200, 100


@dataclass
class AnomalyTask:
    name: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_adapt: np.ndarray | None = None
    extra_tests: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        self.x_train = _check_x(self.x_train, f"{self.name}: x_train")
        width = self.x_train.shape[1]
        self.x_test, self.y_test = _check_xy(self.x_test, self.y_test, f"{self.name}: test", width)
        if self.x_adapt is not None:
            self.x_adapt = _check_x(self.x_adapt, f"{self.name}: x_adapt", width)
        for k, (x, y) in list(self.extra_tests.items()):
            self.extra_tests[k] = _check_xy(x, y, f"{self.name}: eval '{k}'", width)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def summary(self) -> str:
        n_anom = int(self.y_test.sum())
        parts = [f"train {len(self.x_train)} normal", f"test {len(self.y_test) - n_anom} normal + {n_anom} anomalous"]
        if self.x_adapt is not None:
            parts.append(f"adapt {len(self.x_adapt)} normal")
        parts += [f"{k} {len(y)}" for k, (_, y) in self.extra_tests.items()]
        return f"{self.name}: {self.n_features} features; " + ", ".join(parts)

    def save_npz(self, path: str | os.PathLike) -> Path:
        from ..io_atomic import write_atomic
        arrays = {"x_train": self.x_train, "x_test": self.x_test, "y_test": self.y_test}
        if self.x_adapt is not None:
            arrays["x_adapt"] = self.x_adapt
        for k, (x, y) in self.extra_tests.items():
            arrays[f"x_eval_{k}"], arrays[f"y_eval_{k}"] = x, y
        return write_atomic(path, lambda f: np.savez(f, **arrays))


def _check_x(x: Any, what: str, width: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{what} must be a non-empty 2-D array (samples, features), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{what} must be real numbers, got dtype {x.dtype}")
    if width is not None and x.shape[1] != width:
        raise DataError(f"{what} has {x.shape[1]} features but x_train has {width}")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{what} contains NaN or inf (first at sample {bad[0]}, feature {bad[1]})")
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _check_xy(x: Any, y: Any, what: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    x = _check_x(x, f"{what} x", width)
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise DataError(f"{what}: y must be a 1-D array of {x.shape[0]} labels, got shape {y.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise DataError(f"{what}: y must hold 0 (normal) or 1 (anomaly)")
    return x, y.astype(np.int64)


# ---------------------------------------------------------------- built-in tasks

def builtin_names() -> list[str]:
    names = [f"fan-{t}-{env}" for t in FAN_TASKS for env in ENVIRONMENTS]
    return names + [f"fan-{t}-move" for t in FAN_TASKS]


def _rpm_split(spec: str, envs: Sequence[str], data_dir: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_train normal, x_test, y_test) of an rpm task over the given environments."""
    from .fan import list_recordings, load_recording

    speed = RPM_SPEEDS[spec]
    train, xs, ys = [], [], []
    for env in envs:
        for s in "hmlo":
            recs = list_recordings(data_dir, size="12cm", speed=s, type="normal", environment=env, part="")
            if len(recs) != 1:
                raise DataError(f"cooling-fan: recording 12cm_{s}_normal_{env}.zip is missing")
            x, _ = load_recording(recs[0].path)
            if len(x) < N_TRAIN + N_TEST:
                raise DataError(f"cooling-fan: {recs[0].name} has {len(x)} spectra, expected >= {N_TRAIN + N_TEST}")
            if s == speed:
                train.append(x[:N_TRAIN])
            xs.append(x[-N_TEST:])
            ys.append(np.full(N_TEST, int(s != speed)))
    return np.concatenate(train), np.concatenate(xs), np.concatenate(ys)


def _damage_split(damage: str, envs: Sequence[str], data_dir: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .fan import list_recordings, load_recording

    def rec(typ: str, env: str, part: str) -> np.ndarray:
        found = list_recordings(data_dir, size="12cm", speed="hmlo", type=typ, environment=env, part=part)
        if len(found) != 1:
            raise DataError(f"cooling-fan: recording 12cm_hmlo_{typ}_{env}_{part}.zip is missing")
        return load_recording(found[0].path)[0]

    train = np.concatenate([rec("normal", e, "1") for e in envs])
    normal = [rec("normal", e, "2") for e in envs]
    anom = [rec(damage, e, "2") for e in envs]
    x = np.concatenate(normal + anom)
    y = np.concatenate([np.zeros(sum(map(len, normal)), np.int64), np.ones(sum(map(len, anom)), np.int64)])
    return train, x, y


def _split(task: str, envs: Sequence[str], data_dir: Any):
    return _rpm_split(task, envs, data_dir) if task in RPM_SPEEDS else _damage_split(task, envs, data_dir)


def fan_anomaly_task(name: str, data_dir: str | os.PathLike | None = None) -> AnomalyTask:
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "fan" or parts[1] not in FAN_TASKS or parts[2] not in ENVIRONMENTS + ("move",):
        raise UsageError(f"unknown anomaly task {name!r}: use fan-<T>-<ENV> with T in {', '.join(FAN_TASKS)} "
                         f"and ENV in {', '.join(ENVIRONMENTS)} or move, or an .npz task file")
    _, task, env = parts
    what = (f"speeds other than {task}" if task in RPM_SPEEDS else f"a {task} fan")
    if env != "move":
        x_tr, x_te, y_te = _split(task, (env,), data_dir)
        return AnomalyTask(name, x_tr, x_te, y_te,
                           description=f"12 cm fan, {env}: learn normal only, detect {what}")
    silent = ("silentA", "silentB")
    x_tr, x_si, y_si = _split(task, silent, data_dir)
    x_ad, x_te, y_te = _split(task, ("noisy",), data_dir)
    return AnomalyTask(name, x_tr, x_te, y_te, x_adapt=x_ad, extra_tests={"silent": (x_si, y_si)},
                       description=(f"12 cm fan moved from silentA+silentB to noisy: learn the quiet rooms' "
                                    f"normal data, adapt on the noisy room's, detect {what} in the noisy room "
                                    f"('silent': the quiet rooms' test set)"))


def load_npz_anomaly_task(path: str | os.PathLike) -> AnomalyTask:
    from .task import read_npz_arrays

    path = Path(path)
    arrays = read_npz_arrays(path)
    missing = [k for k in ("x_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)} (an anomaly task file needs x_train "
                        f"(normal only), x_test and y_test, 1 = anomaly)")
    extra = {}
    for k in arrays:
        if k.startswith("x_eval_"):
            n = k[len("x_eval_"):]
            if f"y_eval_{n}" not in arrays:
                raise DataError(f"{path}: {k} has no matching y_eval_{n}")
            extra[n] = (arrays[k], arrays[f"y_eval_{n}"])
    return AnomalyTask(path.stem, arrays["x_train"], arrays["x_test"], arrays["y_test"],
                       x_adapt=arrays.get("x_adapt"), extra_tests=extra)


def load_anomaly_task(spec: str, data_dir: str | os.PathLike | None = None) -> AnomalyTask:
    """A built-in anomaly task by name (see the module text), or an ``.npz`` file by path."""
    if spec.startswith("fan-") and not spec.endswith(".npz"):
        return fan_anomaly_task(spec, data_dir)
    if spec.endswith(".npz") or os.path.sep in spec or Path(spec).is_file():
        return load_npz_anomaly_task(spec)
    raise UsageError(f"unknown anomaly task {spec!r}: use a built-in task (fan-damage1-noisy, fan-2500rpm-silentA, "
                     f"fan-damage1-move, ...; 'edgetune detect tasks' lists them) or an .npz task file")
