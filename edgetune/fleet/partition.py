"""Which samples each device of a fleet holds (NumPy only, no Flower).

A fleet is a task's fine-tune split spread over K devices, each with its own local test
set taken from the task's test split the same way. Partitions:

- ``iid``: samples dealt at random (seeded), any task;
- ``by-subject`` (``har``): one device per person never seen in pre-training, holding that
  person's fine-tune windows and testing on that person's later windows;
- ``by-room`` (``damage1``/``damage2``): the fine-tune data all come from the noisy room,
  recorded as one ``hmlo`` recording per class whose fan speed steps h -> m -> l -> o. A
  device is a stretch of time of each recording (device i holds the i-th of K equal
  stretches of the normal and of the damaged fan's fine-tune recording, and tests on the
  i-th stretch of the held-out recordings), so devices differ in fan speed, as fans in one
  room do.

The global test set is always the task's whole test split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..data.task import Task, load_task
from ..errors import DataError, UsageError

PARTITIONS = ("iid", "by-subject", "by-room")


@dataclass
class DeviceData:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass
class Fleet:
    task: Task
    partition: str
    devices: list[DeviceData] = field(default_factory=list)

    def describe(self) -> str:
        sizes = ", ".join(f"{d.name} {len(d.y_train)}/{len(d.y_test)}" for d in self.devices)
        return f"{self.task.name}, {self.partition}, {len(self.devices)} devices (train/test): {sizes}"


def parse_partition_arg(text: str) -> tuple[int, int]:
    """``I/K`` (device I of K, 0-based) -> (I, K)."""
    try:
        i, k = (int(t) for t in text.split("/"))
    except ValueError:
        raise UsageError(f"--partition must be I/K, e.g. 0/4 (device 0 of 4), got {text!r}") from None
    if k < 1 or not 0 <= i < k:
        raise UsageError(f"--partition {text}: need 0 <= I < K")
    return i, k


def _groups_iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(g) for g in np.array_split(rng.permutation(n), k)]


def _har_groups(task: Task, data_dir: str | os.PathLike | None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The new subjects and the subject of every fine-tune and test window of ``task``."""
    from ..data.har import load_har_windows, split_by_time

    hw = load_har_windows(data_dir)
    in_pre = np.isin(hw.subject, list(range(1, 16)))
    i_ft, i_te = split_by_time(hw, ~in_pre, 0.5)
    if not (np.array_equal(hw.x[i_ft], task.x_finetune) and np.array_equal(hw.x[i_te], task.x_test)):
        raise DataError("har: cannot match the task's windows to their subjects (was the task built "
                        "with non-default options?)")
    return sorted(set(hw.subject[i_ft].tolist())), hw.subject[i_ft], hw.subject[i_te]


def _fan_blocks(task: Task, data_dir: str | os.PathLike | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per fine-tune and test sample, which of ``k`` time stretches of its recording it is in."""
    from ..data.fan import list_recordings, load_recording

    recs = {(r.type, r.part): r for r in list_recordings(data_dir, size="12cm", speed="hmlo",
                                                          environment="noisy")}
    out = []
    for part, y in (("1", task.y_finetune), ("2", task.y_test)):
        blocks = []
        for typ in task.labels:
            rec = recs.get((typ, part))
            if rec is None:
                raise DataError(f"cooling-fan: recording 12cm_hmlo_{typ}_noisy_{part} is missing")
            n = len(load_recording(rec.path)[0])
            blocks.append(np.minimum(np.arange(n) * k // n, k - 1))
        b = np.concatenate(blocks)
        if len(b) != len(y):
            raise DataError(f"{task.name}: cannot match the task's samples to their recordings")
        out.append(b)
    return out[0], out[1]


def make_fleet(task_name: str, data_dir: str | os.PathLike | None, partition: str, n_devices: int, *,
               seed: int = 0, task: Task | None = None) -> Fleet:
    """Split ``task_name``'s fine-tune and test data over ``n_devices`` devices."""
    if partition not in PARTITIONS:
        raise UsageError(f"unknown partition '{partition}': use one of {', '.join(PARTITIONS)}")
    if n_devices < 1:
        raise UsageError(f"the number of devices must be >= 1, got {n_devices}")
    task = task if task is not None else load_task(task_name, data_dir)
    fleet = Fleet(task, partition)
    if partition == "iid":
        rng = np.random.default_rng(seed)
        tr = _groups_iid(len(task.y_finetune), n_devices, rng)
        te = _groups_iid(len(task.y_test), n_devices, rng)
        names = [f"device{i}" for i in range(n_devices)]
    elif partition == "by-subject":
        if task.name != "har":
            raise UsageError(f"--partition by-subject needs the har task (one device per person), not {task.name}")
        subjects, s_tr, s_te = _har_groups(task, data_dir)
        if n_devices > len(subjects):
            raise UsageError(f"har has {len(subjects)} subjects outside pre-training; asked for {n_devices} devices")
        chosen = subjects[:n_devices]
        tr = [np.flatnonzero(s_tr == s) for s in chosen]
        te = [np.flatnonzero(s_te == s) for s in chosen]
        names = [f"subject{s}" for s in chosen]
    else:
        if task.name not in ("damage1", "damage2"):
            raise UsageError(f"--partition by-room needs a cooling-fan task (damage1, damage2), not {task.name}")
        b_tr, b_te = _fan_blocks(task, data_dir, n_devices)
        tr = [np.flatnonzero(b_tr == i) for i in range(n_devices)]
        te = [np.flatnonzero(b_te == i) for i in range(n_devices)]
        names = [f"noisy-stretch{i}" for i in range(n_devices)]
    for name, a, b in zip(names, tr, te):
        if len(a) == 0 or len(b) == 0:
            raise UsageError(f"device {name} would hold no {'training' if len(a) == 0 else 'test'} "
                             f"samples; use fewer devices")
        fleet.devices.append(DeviceData(name, task.x_finetune[a], task.y_finetune[a], task.x_test[b], task.y_test[b]))
    return fleet
