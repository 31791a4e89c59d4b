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
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache import data_digest
from .errors import ModelFileError, UsageError
from .safetensors import load_file, save_file

FORMAT = "edgetune-checkpoint"
#: 2: the checksum covers the metadata too, and the history lives in an append-only journal.
FORMAT_VERSION = 2


def fingerprint(method: Any, config: Any, x: np.ndarray, y: np.ndarray,
                x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> dict[str, Any]:
    val = data_digest(x_val, y_val) if x_val is not None and y_val is not None else None
    return {"method": method.name, "options": asdict(method.options), "config": asdict(config),
            "trainable": int(method.params.flat.size), "backbone": method.backbone.digest(),
            "data": data_digest(x, y), "validation": val}


class HistoryJournal:
    """The run's per-epoch history, appended to a file beside the checkpoint
    (``.NAME.edgetune-history``, one JSON line per epoch) so that a save writes only the
    epochs since the last one: a save costs the same at epoch 10 and at epoch 10,000.

    The checkpoint records how many lines (and bytes) of the journal belong to it and a
    hash chain over those lines (d_k = SHA-256(d_(k-1) + line_k)), covered by its checksum;
    lines past them (a crash between appending and replacing the checkpoint) are ignored
    and overwritten by the next save.
    """

    GENESIS = hashlib.sha256(b"edgetune-history").hexdigest()

    def __init__(self, checkpoint: str | os.PathLike):
        checkpoint = Path(checkpoint)
        self.path = checkpoint.parent / f".{checkpoint.name}.edgetune-history"
        self.count, self.offset, self.digest = 0, 0, self.GENESIS

    def append(self, records: list[Any]) -> None:
        """Write ``records[self.count:]`` (EpochRecords or dicts) after the lines already kept."""
        new = records[self.count:]
        if not new and self.path.exists():
            return
        lines = [json.dumps(asdict(r) if is_dataclass(r) else r, sort_keys=True).encode() + b"\n" for r in new]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.lseek(fd, self.offset, os.SEEK_SET)
            data = b"".join(lines)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, self.offset + len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        for line in lines:
            self.digest = hashlib.sha256(self.digest.encode() + line).hexdigest()
        self.count += len(lines)
        self.offset += len(data)

    def meta(self) -> dict[str, str]:
        return {"history_count": str(self.count), "history_bytes": str(self.offset), "history_digest": self.digest}

    def read(self, meta: dict[str, str], where: Path) -> list[dict[str, Any]]:
        """The history a checkpoint's metadata points to; ModelFileError if the journal lacks or changed it."""
        try:
            count, size, digest = int(meta["history_count"]), int(meta["history_bytes"]), meta["history_digest"]
        except (KeyError, ValueError) as e:
            raise ModelFileError(f"{where}: damaged checkpoint metadata (history: {e})") from None
        if count < 0 or size < 0:
            raise ModelFileError(f"{where}: damaged checkpoint metadata (history of {count} epochs, {size} bytes)")
        try:
            with open(self.path, "rb") as f:
                data = f.read(size)
        except OSError as e:
            if count == 0:
                data = b""
            else:
                raise ModelFileError(f"{where}: its history file {self.path.name} cannot be read "
                                     f"({e.strerror or e}); delete the checkpoint to start over") from None
        lines = data.splitlines(keepends=True)
        if len(data) != size or len(lines) != count:
            raise ModelFileError(f"{where}: its history file {self.path.name} does not hold the {count} epochs "
                                 f"({size} bytes) the checkpoint says; delete the checkpoint to start over")
        chain = self.GENESIS
        for line in lines:
            chain = hashlib.sha256(chain.encode() + line).hexdigest()
        if chain != digest:
            raise ModelFileError(f"{where}: its history file {self.path.name} was damaged or edited (checksum "
                                 f"differs); delete the checkpoint to start over")
        try:
            history = [json.loads(line) for line in lines]
        except ValueError as e:
            raise ModelFileError(f"{where}: damaged history ({e})") from None
        self.count, self.offset, self.digest = count, size, digest
        return history


def save(path: str | os.PathLike, *, fp: dict[str, Any], epoch: int, params: np.ndarray,
         opt_state: dict[str, np.ndarray], rng: np.random.Generator, history: list[Any],
         best: dict[str, Any], best_params: np.ndarray | None, journal: HistoryJournal | None = None) -> None:
    """Save the run at the end of ``epoch``. ``history``: every epoch's record so far, of which
    only those the ``journal`` has not written yet are written (give the same journal to
    every save of a run)."""
    journal = journal if journal is not None else HistoryJournal(path)
    journal.append(history)
    tensors = {"params": params, **{f"optimizer.{k}": v for k, v in opt_state.items()}}
    if best_params is not None:
        tensors["best_params"] = best_params
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fingerprint": json.dumps(fp, sort_keys=True),
            "epoch": str(epoch), "rng": json.dumps(rng.bit_generator.state), "best": json.dumps(best),
            **journal.meta()}
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, path, meta)


def _digest(tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, and over every metadata field
    but the digest itself: detects a file edited or mixed, in its numbers or its metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, t.dtype.str, list(t.shape)]).encode())
        h.update(t.tobytes())
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _check_state(state: dict[str, Any], fp: dict[str, Any], where: Path) -> None:
    """Every field the trainer reads, by type and range (the checksum says the file is whole,
    this says it is one the trainer can continue)."""
    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{where}: damaged checkpoint metadata ({what}); delete it to start over")

    from .train import EpochRecord

    epochs = fp["config"]["epochs"]
    if not 0 <= state["epoch"] <= epochs:
        raise bad(f"epoch {state['epoch']} is outside 0..{epochs}")
    history = state["history"]
    if not isinstance(history, list) or len(history) != state["epoch"]:
        raise bad(f"a history of {len(history) if isinstance(history, list) else '?'} epochs for epoch "
                  f"{state['epoch']}")
    names = {f.name: f for f in fields(EpochRecord)}
    for i, e in enumerate(history, 1):
        if not isinstance(e, dict) or not set(e) <= set(names) or not {"epoch", "loss", "seconds"} <= set(e):
            raise bad(f"history entry {i} is not an epoch record")
        if e["epoch"] != i or not all(v is None or _is_number(v) for v in e.values()):
            raise bad(f"history entry {i} holds {json.dumps(e)[:80]}")
    best = state["best"]
    if not (isinstance(best, dict) and _is_number(best.get("loss")) and _is_int(best.get("since"))
            and best["since"] >= 0 and (best.get("epoch") is None or (_is_int(best["epoch"])
                                                                    and 1 <= best["epoch"] <= state["epoch"]))
            and isinstance(best.get("stopped_early", False), bool)):
        raise bad(f"best {json.dumps(best)[:80]}")
    rng = np.random.default_rng(0)
    try:
        rng.bit_generator.state = state["rng"]
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise bad(f"the shuffling state: {e}") from None


def load(path: str | os.PathLike, fp: dict[str, Any], journal: HistoryJournal | None = None) -> dict[str, Any] | None:
    """The saved state, or None if there is no checkpoint yet; refuses another run's file, and
    a damaged or edited one (its tensors, its metadata or its history)."""
    path = Path(path)
    if not path.exists():
        return None
    journal = journal if journal is not None else HistoryJournal(path)
    tensors, meta = load_file(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an edgetune checkpoint")
    version = meta.get("format_version")
    if version not in (None, str(FORMAT_VERSION)):
        raise ModelFileError(f"{path}: checkpoint format version {version!r}, this edgetune reads "
                             f"{FORMAT_VERSION}; delete it to start over")
    # format 1 (no version) covered only the tensors by its checksum
    if meta.get("sha256") != _digest(tensors, meta if version is not None else None):
        raise ModelFileError(f"{path}: checksum differs (the checkpoint was damaged or edited); delete it to start over")
    try:
        saved_fp = json.loads(meta["fingerprint"])
        state = {"epoch": int(meta["epoch"]), "rng": json.loads(meta["rng"]), "best": json.loads(meta["best"])}
        state["history"] = json.loads(meta["history"]) if version is None else journal.read(meta, path)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: damaged checkpoint metadata ({e})") from None
    if not isinstance(saved_fp, dict):
        raise ModelFileError(f"{path}: damaged checkpoint metadata (the run's fingerprint is not an object)")
    if saved_fp != json.loads(json.dumps(fp, sort_keys=True)):
        diff = _differences(json.loads(json.dumps(fp, sort_keys=True)), saved_fp)
        raise UsageError(f"checkpoint {path} belongs to another run (different {', '.join(diff)}); "
                         f"delete it or choose another checkpoint path")
    if "params" not in tensors or tensors["params"].shape != (fp["trainable"],):
        raise ModelFileError(f"{path}: parameters missing or of the wrong size")
    for name, t in tensors.items():
        if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
            raise ModelFileError(f"{path}: tensor '{name}' contains NaN or inf; delete the checkpoint to start over")
    _check_state(state, fp, path)
    state["params"] = tensors["params"]
    state["best_params"] = tensors.get("best_params")
    state["optimizer"] = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return state
