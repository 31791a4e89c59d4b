"""Arguments and output helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError


def _whole_number(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


positive_int = _whole_number(1)
non_negative_int = _whole_number(0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected widths >= 1, got {text!r}")
    return vals


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, metavar="TASK",
                   help="a built-in task (damage1, damage2, har) or the path of an .npz task file "
                        "with x_/y_ pretrain, finetune and test arrays")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the built-in data sets are (default: $EDGETUNE_DATA, then the user cache)")


def add_train_args(p: argparse.ArgumentParser, *, what: str = "fine-tuning") -> None:
    g = p.add_argument_group(f"{what} options (defaults come from the task where it has them)")
    g.add_argument("--epochs", type=positive_int, help="number of epochs")
    g.add_argument("--engine", choices=("auto", "c", "numpy"), default=argparse.SUPPRESS,
                   help="auto (compiled C when built, else NumPy; default), c, or numpy (the reference)")
    g.add_argument("--batch-size", type=positive_int, help="mini-batch size (paper: 20)")
    g.add_argument("--lr", type=positive_float, help="learning rate")
    g.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], help="optimizer (default sgd)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed for initialisation and shuffling (default 0)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar, print only the result")


def load_task_arg(args: argparse.Namespace):
    from ..data.task import load_task

    return load_task(args.task, args.data_dir)


def train_kwargs(args: argparse.Namespace, defaults: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Training options: command line first, then the task's defaults, then edgetune's."""
    base = {"epochs": 100, "batch_size": 20, "lr": 0.01, "optimizer": "sgd"}
    out = {}
    for key in base:
        v = getattr(args, key, None)
        if v is None:
            v = defaults.get(prefix + key, defaults.get(key, base[key]))
        out[key] = v
    out["seed"] = args.seed
    return out


def write_json(path: str | None, obj: Any) -> None:
    if not path:
        return
    from ..io_atomic import write_json_atomic

    if Path(path).is_dir():
        raise UsageError(f"--json {path}: is a directory; give a file path")
    write_json_atomic(path, obj)


def check_outputs(*files: str | None, dirs: tuple[str | None, ...] = ()) -> None:
    """Fail before any work if an output file or directory could not be written."""
    from ..io_atomic import ensure_dir, ensure_parent

    for f in files:
        if f:
            if Path(f).is_dir():
                raise UsageError(f"{f} is a directory; give a file path")
            ensure_parent(f)
    for d in dirs:
        if d:
            ensure_dir(d)


def info(args: argparse.Namespace, text: str) -> None:
    """A line of progress for people (stderr), silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], file=None) -> None:
    file = file or sys.stdout
    cells = [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)).rstrip(), file=file)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip(), file=file)


def dumps_compact(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
