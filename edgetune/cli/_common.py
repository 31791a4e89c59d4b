"""Arguments and output helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import OutputError, UsageError


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


#: Options that take a byte size. A value may start with a minus sign ("-5KB"), which
#: argparse would take for an option: ``main`` joins such a pair into "--budget=-5KB" so
#: that the command refuses it with ``units.parse_bytes``'s message.
SIZE_OPTIONS = ("--budget", "--cache-budget", "--flash")


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


def output_path(text: str) -> str:
    """An output path argument: not empty ('-' means stdout where the option allows it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a file path (or - for stdout)")
    return text


def add_json_arg(p: argparse.ArgumentParser, what: str = "the results") -> None:
    p.add_argument("--json", metavar="PATH", type=output_path,
                   help=f"also write {what} as JSON to PATH (- for stdout)")


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite an existing model or adapter directory")


def add_output_args(p: argparse.ArgumentParser) -> None:
    add_json_arg(p)
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
    """Write ``obj`` as JSON to ``path``: '-' is stdout; devices, FIFOs and /dev, /proc paths are
    written through (never replaced); a symlink's target is replaced atomically, like a file."""
    if path is None:
        return
    from ..io_atomic import json_text, write_bytes_atomic

    if not path.strip():
        raise UsageError("--json: empty path; give a file path (or - for stdout)")
    text = json_text(obj)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--json {path}: is a directory; give a file path")
    try:
        st = os.stat(p)
    except OSError:
        st = None
    if (st is not None and not stat.S_ISREG(st.st_mode)) or str(p.absolute()).startswith(("/dev/", "/proc/")):
        try:
            with open(p, "w") as f:
                f.write(text)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        return
    write_bytes_atomic(Path(os.path.realpath(p)) if p.is_symlink() else p, text.encode())


def input_paths(args: argparse.Namespace) -> dict[str, str]:
    """The files and directories a command reads, by option (outputs must not replace them).
    A checkpoint is read (to resume) as well as written, so it counts as an input of the
    command's other outputs."""
    out = {}
    task = getattr(args, "task", None)
    if task and Path(task).exists():
        out["--task"] = task
    for name in ("model", "adapter", "onnx_file", "checkpoint"):
        v = getattr(args, name, None)
        if v:
            out[f"--{name.replace('_', '-')}"] = v
    return out


def _refuse_broken_link(path: str, *, dangling_ok: bool) -> None:
    """A symbolic link that loops can never be written; one that dangles cannot hold a directory
    (a file output is written where it points). Said before any work, with the link's target."""
    import errno

    if not os.path.islink(path):
        return
    try:
        os.stat(path)
        return
    except OSError as e:
        looping = e.errno == errno.ELOOP
    if looping or not dangling_ok:
        raise UsageError(f"{path} is a symbolic link to {os.readlink(path)}, which points nowhere "
                         f"({'a loop' if looping else 'dangling'}); remove the link or choose another path")


def check_outputs(*files: str | None, dirs: tuple[str | None, ...] = (),
                  args: argparse.Namespace | None = None, replaced: bool = True, own: str | None = None) -> None:
    """Fail before any work if an output could not be written, would equal, contain or lie
    inside an input (resolved through symlinks; --force does not change that), or would
    overwrite an existing model directory without --force. ``dirs`` are model or adapter
    directories, ``replaced`` whole by a save (so they may not hold the current directory).
    ``own``: the option of an output that is also an input (--checkpoint), not checked
    against itself."""
    from ..io_atomic import check_not_input, check_writable, is_model_dir

    inputs = input_paths(args) if args is not None else {}
    inputs.pop(own, None)
    for f in files:
        if f is None or f == "-":
            continue
        if not f.strip():
            raise UsageError("empty output path; give a file path")
        check_not_input(f, inputs, option="output")
        _refuse_broken_link(f, dangling_ok=True)
        if Path(f).is_dir():
            raise UsageError(f"{f} is a directory; give a file path")
        check_writable(f)
    for d in dirs:
        if d:
            check_not_input(d, inputs, option="output", replaced=replaced)
            _refuse_broken_link(d, dangling_ok=False)
            if is_model_dir(d) and not getattr(args, "force", False):
                raise UsageError(f"{d} already holds a model; pass --force to overwrite it")
            check_writable(d, directory=True)


def lock_outputs(stack: Any, *paths: str | None) -> None:
    """Take the lock of every output path (None and '-' skipped) on ``stack`` (an ExitStack),
    before any work: a second command writing the same output then stops at once, before it
    has written anything, instead of after it has overwritten some of the first one's files.
    A symlinked file is locked under the path it is written to (its target)."""
    from ..io_atomic import target_lock

    for p in paths:
        if p is None or p == "-":
            continue
        where = os.path.realpath(p) if Path(p).is_symlink() and not Path(p).is_dir() else p
        stack.enter_context(target_lock(where))


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
