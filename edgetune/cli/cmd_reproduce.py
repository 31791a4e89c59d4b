"""edgetune reproduce: the paper's evaluation, every method on every task."""
from __future__ import annotations

import argparse
import sys

from ._common import add_json_arg, positive_int

NAME = "reproduce"
HELP = "run every method on every paper task and write the paper-style tables"
DESCRIPTION = """Pre-train one backbone per task, fine-tune it with every method and seed (each
method in its own process, so peak memory is its own), and write into --out:
  results.json   per task and method: the finetune keys, mean and std over seeds, peak_rss_mb
  results.md     accuracy, time (forward/backward/update), trainable parameters, and the time
                 reduction of skip2-lora against lora-all
  curves_*.png   test accuracy after every epoch (with the 'plot' extra)
Epochs default to the paper's (damage1 100, damage2 60, har 200), batch 20, SGD lr 0.01.

examples:
  edgetune reproduce --out runs/paper --data-dir ../shared/data
  edgetune reproduce --out runs/smoke --tasks damage1 --methods lora-all,skip2-lora --quick"""
ORDER = 50


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tasks", default="damage1,damage2,har", help="comma-separated tasks (default all three)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default the paper's seven; see 'edgetune methods')")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per method (default 3)")
    p.add_argument("--quick", action="store_true", help="a tenth of the epochs (smoke test, CI)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-epoch test accuracy (faster)")
    p.add_argument("--data-dir", metavar="DIR", help="where the data sets are")
    p.add_argument("--quiet", action="store_true", help="print only the final tables")
    add_json_arg(p, "results.json's content")


def run(args: argparse.Namespace) -> int:
    from ..reproduce import PAPER_METHODS, reproduce

    from ._common import check_outputs, write_json

    check_outputs(args.json, dirs=(args.out,), replaced=False)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(PAPER_METHODS)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res = reproduce(args.out, tasks=tasks, methods=methods, seeds=args.seeds, quick=args.quick,
                    data_dir=args.data_dir, curves=not args.no_curves, log=log)
    print((__import__("pathlib").Path(args.out) / "results.md").read_text())
    if not args.quiet:
        print(f"wrote {args.out}/results.json, results.md" + ("".join(f", {p}" for p in res.get("plots", []))),
              file=sys.stderr)
    write_json(args.json, res)
    return 0
