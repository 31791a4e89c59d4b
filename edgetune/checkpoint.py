"""Training checkpoints: a long fine-tune survives a crash or a power cut.

One safetensors file holds the trainable parameters, the optimizer state and the best
parameters so far; its metadata holds the epoch, the shuffling RNG state, the history,
and a fingerprint of the run (method, options, configuration, backbone and data). It is
rewritten atomically, so the file on disk is always a complete epoch boundary. Resuming
from it gives bit-identical results to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .cache import data_digest
from .errors import ModelFileError, UsageError
from .safetensors import load_file, save_file

FORMAT = "edgetune-checkpoint"


def fingerprint(method: Any, config: Any, x: np.ndarray, y: np.ndarray,
                x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> dict[str, Any]:
    val = data_digest(x_val, y_val) if x_val is not None and y_val is not None else None
    return {"method": method.name, "options": asdict(method.options), "config": asdict(config),
            "trainable": int(method.params.flat.size), "backbone": method.backbone.digest(),
            "data": data_digest(x, y), "validation": val}


def save(path: str | os.PathLike, *, fp: dict[str, Any], epoch: int, params: np.ndarray,
         opt_state: dict[str, np.ndarray], rng: np.random.Generator, history: list[dict[str, Any]],
         best: dict[str, Any], best_params: np.ndarray | None) -> None:
    tensors = {"params": params, **{f"optimizer.{k}": v for k, v in opt_state.items()}}
    if best_params is not None:
        tensors["best_params"] = best_params
    meta = {"format": FORMAT, "fingerprint": json.dumps(fp, sort_keys=True), "epoch": str(epoch),
            "rng": json.dumps(rng.bit_generator.state), "history": json.dumps(history), "best": json.dumps(best)}
    save_file(tensors, path, meta)


def load(path: str | os.PathLike, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state, or None if there is no checkpoint yet; refuses another run's file."""
    path = Path(path)
    if not path.exists():
        return None
    tensors, meta = load_file(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an edgetune checkpoint")
    try:
        saved_fp = json.loads(meta["fingerprint"])
        state = {"epoch": int(meta["epoch"]), "rng": json.loads(meta["rng"]),
                 "history": json.loads(meta["history"]), "best": json.loads(meta["best"])}
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: damaged checkpoint metadata ({e})") from None
    if saved_fp != json.loads(json.dumps(fp, sort_keys=True)):
        diff = sorted(k for k in set(fp) | set(saved_fp) if fp.get(k) != saved_fp.get(k))
        raise UsageError(f"checkpoint {path} belongs to another run (different {', '.join(diff)}); "
                         f"delete it or choose another checkpoint path")
    if "params" not in tensors or tensors["params"].shape != (fp["trainable"],):
        raise ModelFileError(f"{path}: parameters missing or of the wrong size")
    state["params"] = tensors["params"]
    state["best_params"] = tensors.get("best_params")
    state["optimizer"] = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return state
