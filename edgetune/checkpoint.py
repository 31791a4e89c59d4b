"""Training checkpoints: a long fine-tune survives a crash or a power cut.

One safetensors file holds the trainable parameters, the optimizer state and the best
parameters so far; its metadata holds the epoch, the shuffling RNG state, the history,
and a fingerprint of the run (method, options, configuration, backbone and data). It is
rewritten atomically, so the file on disk is always a complete epoch boundary. Resuming
from it gives bit-identical results to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
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
    meta = {"format": FORMAT, "sha256": _digest(tensors), "fingerprint": json.dumps(fp, sort_keys=True), "epoch": str(epoch),
            "rng": json.dumps(rng.bit_generator.state), "history": json.dumps(history), "best": json.dumps(best)}
    save_file(tensors, path, meta)


def _digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes: detects a file edited or mixed."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, t.dtype.str, list(t.shape)]).encode())
        h.update(t.tobytes())
    return h.hexdigest()


def _differences(fp: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Each differing setting with both values, e.g. 'config.epochs 3 (checkpoint: 2)'."""
    out = []
    for k in sorted(set(fp) | set(saved)):
        a, b = fp.get(k), saved.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{j} {a.get(j)!r} (checkpoint: {b.get(j)!r})" for j in sorted(set(a) | set(b))
                    if a.get(j) != b.get(j)]
        else:
            out.append(k)
    return out


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
        diff = _differences(json.loads(json.dumps(fp, sort_keys=True)), saved_fp)
        raise UsageError(f"checkpoint {path} belongs to another run (different {', '.join(diff)}); "
                         f"delete it or choose another checkpoint path")
    if "params" not in tensors or tensors["params"].shape != (fp["trainable"],):
        raise ModelFileError(f"{path}: parameters missing or of the wrong size")
    if meta.get("sha256") != _digest(tensors):
        raise ModelFileError(f"{path}: checksum differs (the checkpoint was damaged or edited); delete it to start over")
    for name, t in tensors.items():
        if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
            raise ModelFileError(f"{path}: tensor '{name}' contains NaN or inf; delete the checkpoint to start over")
    state["params"] = tensors["params"]
    state["best_params"] = tensors.get("best_params")
    state["optimizer"] = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return state
