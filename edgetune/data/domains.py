"""Domain sequences: the environments a device meets one after another.

An adapter bank (``edgetune.AdapterBank``) learns one adapter per domain. Two built-in
sequences come from the real data sets:

- ``fan-rooms``: the cooling-fan spectra, classes = fan speed ``h, m, l, o`` (the
  constant-speed ``normal`` recordings, 300 spectra each). Pre-train on the 12 cm fan in
  room A (``silentA``); domains ``12cm-silentA``, ``12cm-silentB`` (room B),
  ``12cm-noisy`` (next to a ventilation fan), ``14cm-silentA`` (another fan); the
  ``8cm-silentA`` fan is kept apart as a domain never learned (``unseen``).
- ``har-subjects``: HAR window features, 6 activities. Pre-train on subjects 1..15;
  domains = subjects 16, 17, 18, 19; subject 20 is ``unseen``.

Every recording (fan) or subject-activity group (HAR) is split by time: the first half
trains, the second half tests, so neighbouring samples never sit on both sides.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError, UsageError

FAN_SPEEDS = ("h", "m", "l", "o")


@dataclass
class Domain:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass
class DomainSequence:
    """Pre-training data, the domains to learn in order, and domains kept unseen."""
    name: str
    labels: list[str]
    x_pretrain: np.ndarray
    y_pretrain: np.ndarray
    domains: list[Domain]
    unseen: list[Domain] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)
    description: str = ""

    def domain(self, name: str) -> Domain:
        for d in (*self.domains, *self.unseen):
            if d.name == name:
                return d
        known = ", ".join(d.name for d in (*self.domains, *self.unseen))
        raise UsageError(f"{self.name} has no domain {name!r}: use one of {known}")


def fan_rooms(data_dir: str | os.PathLike | None = None) -> DomainSequence:
    """The cooling-fan environments as domains (see the module docstring)."""
    from .fan import list_recordings, load_recording

    def domain(size: str, env: str) -> Domain:
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for cls, speed in enumerate(FAN_SPEEDS):
            recs = list_recordings(data_dir, size=size, speed=speed, type="normal", environment=env)
            if not recs:
                raise DataError(f"cooling-fan: recording {size}_{speed}_normal_{env}.zip is missing "
                                f"(needed by the fan-rooms domains)")
            x, _ = load_recording(recs[0].path)
            half = len(x) // 2
            parts.append((x[:half], np.full(half, cls), x[half:], np.full(len(x) - half, cls)))
        return Domain(f"{size}-{env}", *(np.concatenate([p[i] for p in parts]) for i in range(4)))

    first = domain("12cm", "silentA")
    return DomainSequence(
        name="fan-rooms", labels=list(FAN_SPEEDS), x_pretrain=first.x_train, y_pretrain=first.y_train,
        domains=[first, domain("12cm", "silentB"), domain("12cm", "noisy"), domain("14cm", "silentA")],
        unseen=[domain("8cm", "silentA")],
        defaults={"hidden": [96, 96], "pretrain_epochs": 100, "epochs": 100, "batch_size": 20, "lr": 0.01},
        description="cooling fan, classify the speed (h, m, l, o); pre-train 12 cm in room A; "
                    "domains 12 cm in rooms A, B, noisy, then the 14 cm fan; unseen: the 8 cm fan")


def har_subjects(data_dir: str | os.PathLike | None = None, *, subjects: tuple[int, ...] = (16, 17, 18, 19),
                 unseen: tuple[int, ...] = (20,)) -> DomainSequence:
    """HAR subjects as domains (see the module docstring)."""
    from .har import ACTIVITIES, load_har_windows, split_by_time

    hw = load_har_windows(data_dir)
    pre = hw.subject <= 15

    def domain(subject: int) -> Domain:
        mask = hw.subject == subject
        if not mask.any():
            raise DataError(f"hapt: no windows of subject {subject}")
        a, b = split_by_time(hw, mask, 0.5)
        return Domain(f"subject-{subject}", hw.x[a], hw.activity[a], hw.x[b], hw.activity[b])

    return DomainSequence(
        name="har-subjects", labels=list(ACTIVITIES), x_pretrain=hw.x[pre], y_pretrain=hw.activity[pre],
        domains=[domain(s) for s in subjects], unseen=[domain(s) for s in unseen],
        defaults={"hidden": [96, 96], "pretrain_epochs": 50, "epochs": 200, "batch_size": 20, "lr": 0.01},
        description=f"HAR, 6 activities; pre-train subjects 1..15; domains subjects "
                    f"{', '.join(map(str, subjects))}; unseen: {', '.join(map(str, unseen))}")


SEQUENCES = {"fan-rooms": fan_rooms, "har-subjects": har_subjects}


def load_sequence(name: str, data_dir: str | os.PathLike | None = None) -> DomainSequence:
    if name not in SEQUENCES:
        raise UsageError(f"unknown domain sequence {name!r}: use one of {', '.join(SEQUENCES)}")
    return SEQUENCES[name](data_dir)
