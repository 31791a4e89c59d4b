"""edgetune pretrain: train a backbone on a task's pre-train split and save it."""
from __future__ import annotations

import argparse
import contextlib

from ._common import (add_force_arg, add_output_args, add_task_args, add_train_args, check_outputs, info, int_list,
                      load_task_arg, lock_outputs, write_json)

NAME = "pretrain"
HELP = "train a backbone on a task's pre-train split and save it"
DESCRIPTION = """Train a backbone (every weight trainable) on the task's pre-train split, fit the
input normalisation on that split only, and save model.safetensors + config.json.

example:
  edgetune pretrain --task damage1 --data-dir ../shared/data --out runs/damage1-model"""
ORDER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    add_force_arg(p)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--hidden", type=int_list, metavar="W1,W2,...",
                       help="an MLP of these hidden widths (task default, else 96,96)")
    shape.add_argument("--arch", metavar="SPEC",
                       help="an architecture string, e.g. 'conv:32:5:1:same,relu,maxpool:2,gap,dense:64,relu' "
                            "(docs/cnn.md), or 'cnn' for the task's convolutional preset")
    add_train_args(p, what="pre-training")
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    check_outputs(args.json, dirs=(args.out,), args=args)
    with contextlib.ExitStack() as outputs:  # a second run to the same outputs is refused now, not after training
        lock_outputs(outputs, args.out, args.json)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..experiment import pretrain_on_task

    task = load_task_arg(args)
    info(args, task.summary())
    model, rep = pretrain_on_task(task, hidden=args.hidden, arch=args.arch, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, optimizer=args.optimizer, seed=args.seed,
                                  progress=None if not args.quiet else False)
    model.save(args.out)
    rep["model"] = args.out
    shape = '-'.join(map(str, model.sizes)) if model.is_plain_mlp() else f"a {len(model.layers)}-layer network"
    print(f"pre-trained {shape} on {task.name} in {rep['pretrain_seconds']:.2f} s "
          f"({rep['pretrain_epochs']} epochs), saved to {args.out}")
    for k, v in rep.items():
        if k.startswith("accuracy_"):
            print(f"  {k[len('accuracy_'):]:10s} accuracy {v:.4f}")
    write_json(args.json, rep)
    return 0
