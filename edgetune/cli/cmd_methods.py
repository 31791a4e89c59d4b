"""edgetune methods: the fine-tuning methods, with their trainable parameters."""
from __future__ import annotations

import argparse

from ._common import add_json_arg, int_list, positive_int, print_table, write_json

NAME = "methods"
HELP = "list the fine-tuning methods and their trainable-parameter counts"
DESCRIPTION = """List every fine-tuning method with a one-line description and the number of
parameters it trains on a given architecture (default: the paper's 512-96-96-2).

example:
  edgetune methods --arch 561,96,96,6 --rank 2"""
ORDER = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=int_list, default=[512, 96, 96, 2], metavar="W0,W1,...",
                   help="layer widths: inputs, hidden..., outputs (default 512,96,96,2)")
    p.add_argument("--rank", type=positive_int, default=1, help="LoRA rank R (default 1)")
    p.add_argument("--train-last-bias", action="store_true", help="count the last layer's bias as trainable too")
    add_json_arg(p, "the list")
    p.add_argument("--quiet", action="store_true", help="print only the table")


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..methods import METHODS, count_trainable, method_class

    if len(args.arch) < 3:
        raise UsageError("--arch needs at least 3 widths (inputs, one hidden layer, outputs)")
    if min(args.arch) < 1:
        raise UsageError(f"--arch widths must be >= 1, got {args.arch}")
    # Counted from the widths: nothing is allocated, so any architecture can be asked about.
    n_params = sum(i * o + o for i, o in zip(args.arch[:-1], args.arch[1:]))
    rows = []
    for name in METHODS:
        k = count_trainable(name, args.arch, rank=args.rank, train_last_bias=args.train_last_bias)
        rows.append({"method": name, "trainable_params": k, "share": f"{100 * k / n_params:.2f}%",
                     "description": method_class(name).description})
    from .cmd_info import engine_line

    if not args.quiet:
        print(f"architecture {'-'.join(map(str, args.arch))} ({n_params} parameters), rank {args.rank}")
        print(engine_line())
    print_table(rows, [("method", "method"), ("trainable_params", "trainable"), ("share", "of model"),
                       ("description", "description")])
    write_json(args.json, {"architecture": args.arch, "rank": args.rank, "methods": rows})
    return 0
