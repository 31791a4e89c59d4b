"""edgetune data: find, download and describe the built-in data sets."""
from __future__ import annotations

import argparse
import sys
import time

NAME = "data"
HELP = "list, fetch and describe the built-in data sets (cooling-fan, hapt)"
DESCRIPTION = """Find, download and describe the data sets of the built-in tasks.

Data sets are looked for in --data-dir if given (only there), else in $EDGETUNE_DATA, then
in the user cache ($XDG_CACHE_HOME/edgetune/data, default ~/.cache/edgetune/data). A source
checkout's scripts and tests read them from ../shared/data: pass --data-dir ../shared/data
(or set EDGETUNE_DATA) to use that copy.

  cooling-fan  fan vibration spectra (tasks damage1, damage2; damage1-1d, damage2-1d
               give each spectrum as one channel (1, 512) for a 1-D CNN)
  hapt         UCI smartphone activity signals (task har: 150 window features; har-raw:
               raw windows (6, 128) of body acceleration and gyroscope for a 1-D CNN)

examples:
  edgetune data list --data-dir ../shared/data
  edgetune data fetch cooling-fan
  edgetune data fetch hapt --data-dir ~/datasets
  edgetune data info damage1
  edgetune data info har-raw
  edgetune data info cooling-fan --json -"""
ORDER = 60


def _tasks_of(data_set: str) -> list[str]:
    from ..data.task import BUILTIN_TASKS

    return [name for name, t in BUILTIN_TASKS.items() if t.data_set == data_set]


def _shape(shape: tuple[int, ...]) -> str:
    return str(shape[0]) if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"


def _outputs(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    from ._common import add_json_arg

    add_json_arg(p, "the result")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no messages beyond the result")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="show each data set, where it was found and its size")
    ls.add_argument("--data-dir", metavar="DIR", help="look only in DIR")
    _outputs(ls)

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
    _outputs(fe, quiet=False)

    info = sub.add_parser("info", help="load a built-in task (or every task of a data set) and print its splits")
    info.add_argument("name", metavar="NAME", help="a task (damage1, damage2, damage1-1d, damage2-1d, har, har-raw) "
                                                "or a data set (cooling-fan, hapt)")
    info.add_argument("--data-dir", metavar="DIR", help="where the data sets are")
    _outputs(info)


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
    from ..data.locate import check_data_dir, search_dirs
    from ..data.task import BUILTIN_TASKS
    from ._common import check_outputs, write_json

    check_outputs(args.json)
    check_data_dir(args.data_dir)
    rows = status(args.data_dir)
    where = f" --data-dir {args.data_dir}" if args.data_dir else ""
    for row in rows:
        if row["path"] is None:
            print(f"{row['name']:<12} missing   (get it: edgetune data fetch {row['name']}{where}; "
                  f"home: {row['home']})")
        else:
            extra = f", {row['files']}" if "files" in row else ""
            print(f"{row['name']:<12} {_size(row['bytes']):>9}  {row['path']}  "
                  f"(from {row['source']}{extra})")
        tasks = _tasks_of(row["name"])
        if tasks and not args.quiet:
            print(f"{'':<12} tasks: " + ", ".join(
                f"{t} {_shape(BUILTIN_TASKS[t].input_shape)}" for t in tasks))
    if any(row["path"] is None for row in rows) and not args.quiet:
        print("looked in: " + ", ".join(f"{d} ({src})" for d, src in search_dirs(args.data_dir)), file=sys.stderr)
    write_json(args.json, {
        "data_sets": [{**{k: (str(v) if k == "path" and v is not None else v) for k, v in r.items()},
                       "tasks": {t: list(BUILTIN_TASKS[t].input_shape) for t in _tasks_of(r["name"])}}
                      for r in rows],
        "looked_in": [str(d) for d, _ in search_dirs(args.data_dir)]})
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from ..data.fetch import fetch

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    from ._common import check_outputs, write_json

    check_outputs(args.json)
    paths = fetch(args.name, args.data_dir, args.url, force=args.force,
                  progress=False if args.quiet else None, log=log)
    folder = paths[0].parent if paths else None
    print(f"{args.name}: {len(paths)} file(s) in {folder}")
    write_json(args.json, {"name": args.name, "folder": str(folder), "files": [str(p) for p in paths]})
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..data.task import BUILTIN_TASKS, load_task
    from ..errors import UsageError
    from ._common import check_outputs, write_json

    data_sets = sorted({t.data_set for t in BUILTIN_TASKS.values()})
    if args.name in data_sets:
        names = _tasks_of(args.name)
    elif args.name in BUILTIN_TASKS:
        names = [args.name]
    else:
        raise UsageError(f"unknown name '{args.name}': a task ({', '.join(BUILTIN_TASKS)}) or a data set "
                         f"({', '.join(data_sets)})")
    from ..data.locate import check_data_dir

    check_outputs(args.json)
    check_data_dir(args.data_dir)
    facts = []
    for name in names:
        t0 = time.perf_counter()
        task = load_task(name, args.data_dir)
        seconds = time.perf_counter() - t0
        data_set = BUILTIN_TASKS[name].data_set
        print(task.summary())
        if task.description and not args.quiet:
            print(task.description)
        print("defaults: " + ", ".join(f"{k}={v}" for k, v in task.defaults.items()))
        if not args.quiet:
            print(f"data set: {data_set}; loaded in {seconds:.2f} s")
        facts.append({"task": name, "data_set": data_set, "summary": task.summary(),
                      "description": task.description, "defaults": task.defaults,
                      "input_shape": list(task.input_shape),
                      "n_features": task.n_features, "n_classes": task.n_classes, "labels": list(task.labels),
                      "samples": {"pretrain": int(len(task.y_pretrain)), "finetune": int(len(task.y_finetune)),
                                  "test": int(len(task.y_test))}})
    write_json(args.json, {"tasks": facts})
    return 0
