"""edgetune evaluate: accuracy of a model (and optionally an adapter) on a task."""
from __future__ import annotations

import argparse

from ._common import add_output_args, add_task_args, check_outputs, load_task_arg, output_path, write_json

NAME = "evaluate"
HELP = "accuracy of a model, with or without an adapter, on every split of a task"
DESCRIPTION = """Report the accuracy of a saved model, with an adapter applied if --adapter is
given, on each split of a task (pre-train, fine-tune, test and extra test sets).

example:
  edgetune evaluate --task damage1 --data-dir ../shared/data --model runs/m --adapter runs/a"""
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_args(p)
    p.add_argument("--model", required=True, metavar="DIR", help="model directory")
    p.add_argument("--adapter", metavar="DIR", help="adapter directory saved by 'finetune --save-adapter'")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load an adapter trained on another backbone of the same shape (its digest differs)")
    p.add_argument("--onnx", metavar="FILE", type=output_path,
                   help="also write the model (with the adapter merged, or skip adapters as an added branch) as an "
                        "ONNX graph; needs the onnx extra")
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    from ..api import FineTuner
    from ..errors import BackboneMismatch
    from ..experiment import check_compatible
    from ..quant import load_any

    check_outputs(args.json, args.onnx, args=args)
    if args.onnx:
        from ..onnx import require_onnx
        require_onnx()
    model = load_any(args.model)  # a float or an int8 model
    task = load_task_arg(args)
    check_compatible(model, task)
    if args.adapter:
        try:
            tuner = FineTuner.load_adapter(model, args.adapter, strict=args.strict)
        except BackboneMismatch:
            raise BackboneMismatch(f"{args.adapter}: adapter was trained on a different backbone (same shape, other "
                                   f"weights); pass strict=False (CLI: --no-strict) to load it anyway") from None
    else:
        tuner = FineTuner(model, "lora-last")
    splits = {"pretrain": (task.x_pretrain, task.y_pretrain), "finetune": (task.x_finetune, task.y_finetune),
              "test": (task.x_test, task.y_test), **task.extra_tests}
    result = {"task": task.name, "model": args.model, "adapter": args.adapter}
    for name, (x, y) in splits.items():
        result[f"accuracy_{name}"] = tuner.score(x, y)
        print(f"{name:10s} accuracy {result[f'accuracy_{name}']:.4f}  ({len(y)} samples)")
    if args.onnx:
        from ..onnx import to_onnx
        to_onnx(tuner if args.adapter else model, args.onnx)
        result["onnx"] = args.onnx
    write_json(args.json, result)
    return 0
