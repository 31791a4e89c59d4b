"""The fleet server's checkpoint (``--state-dir``/server): read and checked in one place, by the
command before any process starts and by the ServerApp when it resumes.

``server.json`` holds the run's identity and the results so far (one entry per finished round);
``global.npz`` the global adapter after the last of them. Both are written atomically after
every round.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError


def load_server_state(state: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(saved server.json, global adapter tensors), or None when ``state`` holds no rounds to
    resume (no checkpoint, or a finished run); ModelFileError naming what is damaged."""
    path = Path(state) / "server.json"
    if not path.is_file():
        return None

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: {what}; the fleet's checkpoint is damaged: delete {Path(state)} to "
                              f"start the run over")

    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"not readable JSON ({e})") from None
    if not isinstance(saved, dict):
        raise bad("not a JSON object")
    if saved.get("finished"):
        return None
    results = saved.get("results")
    if not isinstance(saved.get("identity"), dict) or not isinstance(results, dict):
        raise bad("'identity' and 'results' must be objects")
    rounds = results.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) and isinstance(r.get("round"), int)
                                               and not isinstance(r.get("round"), bool) for r in rounds):
        raise bad("'results.rounds' must be a list of rounds, each with a whole 'round' number")
    numbers = [r["round"] for r in rounds]
    if numbers != list(range(1, len(numbers) + 1)):
        raise bad(f"the rounds are numbered {numbers[:8]}, not 1, 2, 3, ...")
    if not rounds:
        return None
    npz = Path(state) / "global.npz"
    try:
        with np.load(npz, allow_pickle=False) as z:
            current = {k: np.array(z[k]) for k in z.files}
    except FileNotFoundError:
        raise bad(f"{npz.name}, the global adapter after round {numbers[-1]}, is missing") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise bad(f"{npz.name} cannot be read ({e})") from None
    for k, v in current.items():
        if v.dtype.kind != "f" or not np.all(np.isfinite(v)):
            raise bad(f"{npz.name}: tensor '{k}' is not finite floating point")
    return saved, current
