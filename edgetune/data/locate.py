"""Where the data sets live on this machine.

Search order for a data directory:

1. an explicit ``data_dir`` argument (the CLI's ``--data-dir``): only that folder is used;
2. otherwise the folder named by the environment variable ``EDGETUNE_DATA``, then
3. the user cache folder ``$XDG_CACHE_HOME/edgetune/data`` (``~/.cache/edgetune/data``),
   which ``edgetune data fetch NAME`` fills.

Layout inside a data directory::

    cooling-fan/*.zip            one zip per recording, as published
    hapt/HAPT-RawData.zip        the HAPT raw signals (``RawData/`` inside the zip), or
    hapt/RawData/                the same files unzipped

A data directory may also be the data set folder itself (``.../cooling-fan`` holding the
zips, or a folder holding ``HAPT-RawData.zip`` or ``RawData/``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

ENV_DATA = "EDGETUNE_DATA"
DATASET_NAMES = ("cooling-fan", "hapt")
HAPT_ZIP = "HAPT-RawData.zip"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/edgetune`` or ``~/.cache/edgetune``: downloads and parsed caches."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".cache"
    return root / "edgetune"


def default_data_dir() -> Path:
    """The user cache data folder, where ``edgetune data fetch`` stores data sets."""
    return cache_root() / "data"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """The data directories to look in, in order, each with where it came from."""
    if data_dir is not None and str(data_dir) != "":
        return [(Path(data_dir).expanduser(), "--data-dir")]
    dirs: list[tuple[Path, str]] = []
    env = os.environ.get(ENV_DATA, "").strip()
    if env:
        dirs.append((Path(env).expanduser(), f"${ENV_DATA}"))
    dirs.append((default_data_dir(), "user cache"))
    return dirs


@dataclass(frozen=True)
class Found:
    """A located data set: ``path`` is the folder of zips (cooling-fan), or the
    ``HAPT-RawData.zip`` file or ``RawData`` folder (hapt)."""
    name: str
    path: Path
    source: str


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        from ..errors import UsageError
        raise UsageError(f"unknown data set '{name}': use one of {', '.join(DATASET_NAMES)}")


def _candidates(name: str, root: Path) -> list[Path]:
    """Paths under one data directory that may hold the data set ``name``."""
    if name == "cooling-fan":
        return [root / "cooling-fan", root]
    return [root / "hapt" / HAPT_ZIP, root / "hapt" / "RawData", root / HAPT_ZIP, root / "RawData"]


def _holds(name: str, path: Path) -> bool:
    if name == "cooling-fan":
        return path.is_dir() and any(p.suffix == ".zip" and "cm_" in p.name for p in path.iterdir())
    if path.suffix == ".zip":
        return path.is_file()
    return (path / "labels.txt").is_file()


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Found:
    """Locate data set ``name`` (``cooling-fan`` or ``hapt``) or raise a DataError that
    lists every place looked and how to get the data."""
    _check_name(name)
    looked: list[str] = []
    for root, source in search_dirs(data_dir):
        for cand in _candidates(name, root):
            try:
                if _holds(name, cand):
                    return Found(name, cand, source)
            except OSError:
                pass
        looked.append(f"  {root} ({source})")
    if data_dir is not None and str(data_dir) != "":
        raise DataError(
            f"data set '{name}' not found in {data_dir} (--data-dir). Get it there with "
            f"'edgetune data fetch {name} --data-dir {data_dir}', or give the folder that holds it.")
    raise DataError(
        f"data set '{name}' not found. Looked in:\n" + "\n".join(looked) +
        f"\nGet it with 'edgetune data fetch {name}' (downloads into {fetch_dir()}), "
        f"or point to a folder holding it with --data-dir DIR or ${ENV_DATA}.")


def fetch_dir() -> Path:
    """Where ``edgetune data fetch`` without --data-dir stores: ``$EDGETUNE_DATA``, else the user cache."""
    env = os.environ.get(ENV_DATA, "").strip()
    return Path(env).expanduser() if env else default_data_dir()


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """Refuse a --data-dir that is not a folder (a typo must not read as 'data set missing')."""
    if data_dir is None or str(data_dir) == "":
        return
    p = Path(data_dir).expanduser()
    if not p.exists():
        raise DataError(f"--data-dir {data_dir}: no such folder")
    if not p.is_dir():
        raise DataError(f"--data-dir {data_dir}: not a folder")


def dataset_size(found: Found) -> int:
    """Bytes on disk used by a located data set."""
    p = found.path
    if p.is_file():
        return p.stat().st_size
    if found.name == "cooling-fan":
        return sum(f.stat().st_size for f in p.glob("*.zip"))
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
