"""edgetune quantize: make an int8 model from a float one, calibrated on a task's data."""
from __future__ import annotations

import argparse

from ..io_atomic import target_lock
from ._common import add_force_arg, add_output_args, add_task_args, check_outputs, info, load_task_arg, write_json

NAME = "quantize"
HELP = "make an int8 model (per-channel post-training quantisation) from a float model"
DESCRIPTION = """Quantise a float model to int8 (per-channel weights, per-tensor activation
scales calibrated on the task's pre-train split: the device never needs its fine-tuning data
for this) and save it as an int8 model directory that 'finetune', 'evaluate', 'plan' and
'export' read. Prints the test accuracy of the float and of the int8 model.

examples:
  edgetune quantize --model runs/model --task damage1 --data-dir ../shared/data --out runs/model-int8
  edgetune finetune --model runs/model-int8 --task damage1 --data-dir ../shared/data --method sparse"""
ORDER = 25


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="float model directory (from 'edgetune pretrain')")
    add_task_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="int8 model directory to write")
    p.add_argument("--percentile", type=float, default=100.0,
                   help="activation range: this percentile of |activation| on the calibration data "
                        "(50 < P <= 100; default 100, the maximum)")
    add_force_arg(p)
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    if not 50.0 < args.percentile <= 100.0:
        raise UsageError(f"--percentile must be in (50, 100], got {args.percentile}")
    check_outputs(args.json, dirs=(args.out,), args=args)
    with target_lock(args.out):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..experiment import backbone_accuracy, check_compatible
    from ..quant import load_any, quantize

    model = load_any(args.model)
    if model.is_int8:
        raise UsageError(f"{args.model} is already an int8 model")
    task = load_task_arg(args)
    check_compatible(model, task)
    info(args, task.summary())
    qmodel = quantize(model, task.x_pretrain, percentile=args.percentile)
    qmodel.save(args.out)
    result = {"model": args.model, "out": args.out, "task": task.name, "sizes": model.sizes,
              "calibration_samples": int(len(task.y_pretrain)), "percentile": args.percentile,
              "accuracy_float": backbone_accuracy(model, task.x_test, task.y_test),
              "accuracy_int8": backbone_accuracy(qmodel, task.x_test, task.y_test)}
    print(f"int8 model of {'-'.join(map(str, model.sizes))} saved to {args.out} (calibrated on "
          f"{result['calibration_samples']} pre-train samples of {task.name})")
    print(f"  test accuracy  float {result['accuracy_float']:.4f}, int8 {result['accuracy_int8']:.4f}")
    write_json(args.json, result)
    return 0
