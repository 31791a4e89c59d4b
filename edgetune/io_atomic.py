"""Model files: atomic writes (temporary file beside the target, fsync, rename) and the
validated read of a model or adapter directory's JSON config.

A crash at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from .errors import ModelFileError, OutputError


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file, then atomically move it to ``path``."""
    path = Path(path)
    ensure_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    fsync_dir(path.parent)
    return path


def ensure_parent(path: str | os.PathLike) -> Path:
    """Create ``path``'s parent folders, or raise OutputError saying why that is impossible.

    Call it before long work too, so that a bad output path fails at once, not after it.
    """
    path = Path(path)
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` (and its parents), or raise OutputError saying why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is a file, not a directory")
    ensure_parent(path / "x")
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    return write_bytes_atomic(path, (text + "\n").encode())


def _json_default(o: Any) -> Any:
    # NumPy scalars and arrays appear in results; JSON wants plain Python values.
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort where the OS does not allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_config(directory: Path, config_name: str, weights_name: str, kind: str
                     ) -> tuple[dict[str, Any], Path, Path]:
    """Check that a model/adapter directory holds both its files and parse its JSON config.

    Returns (config, config path, weights path); raises ModelFileError naming the problem.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / config_name, directory / weights_name
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelFileError(f"{directory} is not {kind}: {p.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{cfg_path}: not a JSON object")
    if not isinstance(cfg.get("format_version", 0), int):
        raise ModelFileError(f"{cfg_path}: format_version must be a whole number")
    return cfg, cfg_path, w_path
