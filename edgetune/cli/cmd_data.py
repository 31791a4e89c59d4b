"""edgetune data: find, download and describe the built-in data sets."""
from __future__ import annotations

import argparse
import sys
import time

NAME = "data"
HELP = "list, fetch and describe the built-in data sets (cooling-fan, hapt)"
DESCRIPTION = """Find, download and describe the data sets of the built-in tasks.

Data sets are looked for in --data-dir if given, else in $EDGETUNE_DATA, then in the
user cache ($XDG_CACHE_HOME/edgetune/data, default ~/.cache/edgetune/data).

  cooling-fan  fan vibration spectra (tasks damage1, damage2)
  hapt         UCI smartphone activity signals (task har)

examples:
  edgetune data list
  edgetune data fetch cooling-fan
  edgetune data fetch hapt --data-dir ~/datasets
  edgetune data info damage1"""
ORDER = 60

TASK_DATASET = {"damage1": "cooling-fan", "damage2": "cooling-fan", "har": "hapt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="show each data set, where it was found and its size")
    ls.add_argument("--data-dir", metavar="DIR", help="look only in DIR")

    fe = sub.add_parser("fetch", help="download a data set from its public home",
                        description="Download a data set, check its SHA-256 and store it in "
                                    "--data-dir, else $EDGETUNE_DATA, else the user cache.")
    fe.add_argument("name", metavar="NAME", help="cooling-fan or hapt")
    fe.add_argument("--data-dir", metavar="DIR", help="store the data set under DIR")
    fe.add_argument("--url", metavar="URL",
                    help="download from URL instead (a mirror or file://); for cooling-fan the "
                         "folder URL that the zip names are appended to")
    fe.add_argument("--force", action="store_true", help="download again even if present and verified")
    fe.add_argument("--quiet", action="store_true", help="no progress bar or messages")

    info = sub.add_parser("info", help="load a built-in task and print its splits")
    info.add_argument("name", metavar="TASK", help="damage1, damage2 or har")
    info.add_argument("--data-dir", metavar="DIR", help="where the data sets are")


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    action = getattr(args, "action", None)
    if action == "list":
        return _list(args)
    if action == "fetch":
        return _fetch(args)
    if action == "info":
        return _info(args)
    raise UsageError("choose an action: edgetune data {list,fetch,info} (see edgetune data --help)")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def _list(args: argparse.Namespace) -> int:
    from ..data.fetch import status

    for row in status(args.data_dir):
        if row["path"] is None:
            print(f"{row['name']:<12} missing   (get it: edgetune data fetch {row['name']}; "
                  f"home: {row['home']})")
        else:
            extra = f", {row['files']}" if "files" in row else ""
            print(f"{row['name']:<12} {_size(row['bytes']):>9}  {row['path']}  "
                  f"(from {row['source']}{extra})")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from ..data.fetch import fetch

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    paths = fetch(args.name, args.data_dir, args.url, force=args.force,
                  progress=False if args.quiet else None, log=log)
    folder = paths[0].parent if paths else None
    print(f"{args.name}: {len(paths)} file(s) in {folder}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..data.task import load_task
    from ..errors import UsageError

    if args.name not in TASK_DATASET:
        raise UsageError(f"unknown task '{args.name}': use one of {', '.join(TASK_DATASET)}")
    t0 = time.perf_counter()
    task = load_task(args.name, args.data_dir)
    seconds = time.perf_counter() - t0
    print(task.summary())
    if task.description:
        print(task.description)
    print("defaults: " + ", ".join(f"{k}={v}" for k, v in task.defaults.items()))
    print(f"data set: {TASK_DATASET[args.name]}; loaded in {seconds:.2f} s")
    return 0
