"""edgetune export: a self-contained C project that fine-tunes on a board or a microcontroller."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError

from ._common import (add_output_args, check_outputs, info, lock_outputs, non_negative_int, positive_float,
                      positive_int, write_json)

NAME = "export"
HELP = "write a C project that fine-tunes the model on a device (Linux board or microcontroller)"
DESCRIPTION = """Write DIR: a complete C project that fine-tunes MODEL with METHOD on the device. It
holds the compiled engine's C sources (the same files this package runs), the backbone as
const arrays (flash on a microcontroller), one static arena sized by edgetune's memory
model (no malloc), a device API (add a sample, train, predict, adapter as bytes), a
Makefile and an example program.

Targets: host and aarch64-linux (a Raspberry Pi Zero 2 W class board): 'make -C DIR' builds
DIR/train, which trains on DIR/samples.bin (with --task) and prints one JSON line;
cortex-m4 and cortex-m7: 'make -C DIR' builds DIR/train.elf with arm-none-eabi-gcc and
newlib, 'make -C DIR run' runs it under QEMU (mps2-an386 / mps2-an500), 'make -C DIR size'
prints flash and RAM; riscv32 (RV32IMAC, no FPU, like an ESP32-C3) and riscv32f (RV32IMAFC):
the same with riscv64-unknown-elf-gcc and picolibc, run under qemu-system-riscv32 (virt).

With the same model, method, seed, epochs, batch size and learning rate, the exported
program reaches the loss 'edgetune finetune' reaches: it starts from the same adapter and
uses the same per-epoch shuffles (written into the samples). MODEL may be an MLP or a CNN
(every layer kind, float32 or int8). --method sparse takes --scheme S, or --scheme auto: the
scheme chosen for the RAM limit by a contribution analysis on --task (docs/budgets.md).

The same targets take an anomaly detector ('edgetune detect export') and a bank of
per-domain adapters with its routing ('edgetune bank export').

examples:
  edgetune export --model model/ --method skip2-lora --target host --task damage1 --data-dir ../shared/data --out dev/
  edgetune export --model model/ --method skip2-lora --target cortex-m4 --int8 --budget 256KB --partial-cache \\
      --task damage1 --max-samples 120 --test-samples 100 --epochs 20 --out m4/
  edgetune export --model cnn-int8/ --method sparse --scheme auto --target cortex-m4 --budget 256KB \
      --task har-raw --data-dir ../shared/data --max-samples 400 --epochs 5 --out m4-sparse/"""
ORDER = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export import TARGETS

    p.add_argument("--model", required=True, metavar="DIR", help="pre-trained model directory (float or int8)")
    p.add_argument("--method", default="skip2-lora", help="fine-tuning method (default skip2-lora)")
    p.add_argument("--target", required=True, metavar="TARGET", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="the project directory to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--adapter", metavar="DIR", help="start from this trained adapter instead of a fresh one")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="accept an --adapter trained on another backbone of the same shape")
    p.add_argument("--task", metavar="TASK",
                   help="write this task's fine-tune and test samples into the project (for verification and demos)")
    p.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are")
    g = p.add_argument_group("training (defaults come from the task where it has them)")
    g.add_argument("--epochs", type=positive_int, help="epochs the example program trains")
    g.add_argument("--batch-size", type=positive_int, help="mini-batch size")
    g.add_argument("--lr", type=positive_float, help="learning rate")
    g.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], help="optimizer (default sgd)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="adapter initialisation and shuffles (default 0)")
    g.add_argument("--rank", type=positive_int, default=1, help="LoRA rank R (default 1)")
    g.add_argument("--scheme", metavar="SCHEME|auto",
                   help="sparse: the update scheme, e.g. b2,w-1:1/2 (default b2,w-1; see docs/budgets.md); auto: "
                        "chosen for the RAM limit (--budget, else the part's RAM) by a contribution analysis on "
                        "--task, every scheme planned as this device program")
    g = p.add_argument_group("memory")
    g.add_argument("--int8", action="store_true",
                   help="int8 frozen backbone (a float model is quantised, calibrated on --task's pre-training "
                        "split) and an int8 skip-cache")
    g.add_argument("--budget", metavar="BYTES",
                   help="RAM budget, e.g. 256KB: refuse, before writing anything, what does not fit "
                        "(microcontrollers: default the part's RAM)")
    g.add_argument("--partial-cache", action="store_true",
                   help="skip2-lora: when the budget cannot hold every sample's cache row, cache what fits and "
                        "recompute the rest")
    g.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="samples the device keeps and trains on (the skip-cache's capacity); with --task, a seeded "
                        "subset of N fine-tune samples is written (default: all of them)")
    g.add_argument("--test-samples", type=positive_int, metavar="N",
                   help="with --task: a seeded subset of N test samples (default: all)")
    g.add_argument("--flash", metavar="BYTES", help="microcontrollers: the part's flash (default: the target's)")
    g = p.add_argument_group("choosing a sparse scheme on the task (--method sparse --scheme auto)")
    from ._scheme_auto import add_auto_args

    add_auto_args(g)
    p.add_argument("--no-toolchain-check", dest="toolchain_check", action="store_false",
                   help="write the project even if the target's compiler is not installed here")
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    import contextlib

    from ..export import ExportOptions, check_out, plan_export
    from ..units import parse_bytes

    if args.budget is not None:  # refused here so the message names the option
        parse_bytes(args.budget, "--budget")
    if args.flash is not None:
        parse_bytes(args.flash, "--flash")
    opts = ExportOptions(model=args.model, method=args.method, target=args.target, out=args.out,
                         adapter=args.adapter, task=args.task, data_dir=args.data_dir, epochs=args.epochs,
                         seed=args.seed, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         rank=args.rank, int8=args.int8, budget=args.budget, partial_cache=args.partial_cache,
                         max_samples=args.max_samples, test_samples=args.test_samples, flash=args.flash,
                         force=args.force, toolchain_check=args.toolchain_check, strict=args.strict,
                         scheme=args.scheme, auto_epochs=args.auto_epochs, auto_layers=args.auto_layers,
                         auto_ratios=args.auto_ratios, auto_val_split=args.auto_val_split)
    # every output checked, and locked, before anything is written
    out = check_out(opts)
    if args.json not in (None, "-"):
        check_outputs(args.json, args=args)
        json_real = os.path.realpath(args.json)
        if json_real == str(out) or json_real.startswith(str(out) + os.sep):
            raise UsageError(f"--json {args.json} lies inside --out {args.out}, which the export replaces; "
                             f"write it elsewhere")
    if args.scheme is not None and args.scheme.strip().lower() == "auto":
        info(args, "--scheme auto: short fine-tunes on the task measure each part of a sparse scheme")
    plan = plan_export(opts)  # refuses what cannot be done before a lock file is made
    with contextlib.ExitStack() as outputs:
        lock_outputs(outputs, str(out), args.json)
        return _export(args, opts, plan)


def _export(args: argparse.Namespace, opts, plan) -> int:
    from ..export import export_project
    from ..units import format_bytes

    res = export_project(opts, plan)
    m = res.manifest
    mem = m["memory"]
    dense = all(text.startswith("dense") for text in m["layers"])
    net = ('-'.join(map(str, m['sizes'])) if dense else
           f"a {len(m['layers'])}-layer network on {'x'.join(map(str, m['input_shape']))} inputs")
    method = f"{m['method']}[{m['scheme']}]" if m.get("scheme") else m["method"]
    print(f"wrote {res.out}: {method} on {net} ({m['backbone']}) for {m['target']}", file=sys.stdout)
    search = m.get("scheme_search")
    if search:
        print(f"  scheme auto: sparse[{m['scheme']}], predicted validation accuracy "
              f"{search['predicted_val_accuracy']:.4f} ({search['contributions']['runs']} short fine-tunes on the "
              f"program's samples)", file=sys.stdout)
    cache = f", skip-cache {m['cache']} {m['cache_capacity']} of {m['max_samples']} rows" if m["cache"] else ""
    print(f"  RAM {format_bytes(mem['total'])} (arena {format_bytes(mem['arena'])}){cache}; "
          f"weights {format_bytes(mem['flash_weights'])} as const data", file=sys.stdout)
    info(args, f"build with: make -C {res.out}" + ("   run with: make -C " + str(res.out) + " run"
                                                   if m["task"] else ""))
    write_json(args.json, m)
    return 0
