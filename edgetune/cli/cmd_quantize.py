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
'export' read. MLPs and CNNs (convolutions, pooling, gap, flatten, residual adds: docs/int8.md).
Prints the test accuracy of the float and of the int8 model, how often their predictions
agree, and the bytes of both models' tensors (in memory, int8 requantisers included, and as
saved in model.safetensors).

--activations asymmetric quantises the activations as CMSIS-NN and TensorFlow Lite Micro
do (a zero point per layer input, TFLM's integer arithmetic); the default, symmetric, is
edgetune's own int8. What each supports: docs/int8.md.

examples:
  edgetune quantize --model runs/model --task damage1 --data-dir ../shared/data --out runs/model-int8
  edgetune quantize --model runs/cnn --task har-raw --data-dir ../shared/data --out runs/cnn-int8
  edgetune quantize --model runs/cnn --task har-raw --data-dir ../shared/data --out runs/cnn-tflm \\
      --activations asymmetric
  edgetune finetune --model runs/model-int8 --task damage1 --data-dir ../shared/data --method sparse"""
ORDER = 25


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="float model directory (from 'edgetune pretrain')")
    add_task_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="int8 model directory to write")
    p.add_argument("--percentile", type=float, default=100.0,
                   help="activation range: this percentile of |activation| on the calibration data "
                        "(50 < P <= 100; default 100, the maximum; asymmetric: the 100-P and P percentiles "
                        "of the activation)")
    p.add_argument("--activations", choices=("symmetric", "asymmetric"), default="symmetric",
                   help="int8 activations: symmetric (zero point 0, edgetune's int8; the default) or asymmetric "
                        "(a zero point per layer input, in TensorFlow Lite Micro's arithmetic)")
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
    from pathlib import Path

    import numpy as np

    from ..errors import UsageError
    from ..nn.mlp import FORMAT, WEIGHTS_NAME
    from ..safetensors import dumps
    from ..experiment import check_compatible
    from ..quant import load_any, quantize

    model = load_any(args.model)
    if model.is_int8:
        raise UsageError(f"{args.model} is already an int8 model")
    task = load_task_arg(args)
    check_compatible(model, task)
    info(args, task.summary())
    qmodel = quantize(model, task.x_pretrain, percentile=args.percentile, activations=args.activations)
    qmodel.save(args.out)
    xt = model.prepare(task.x_test, "test x")
    pred_float, pred_int8 = model.forward(xt).argmax(axis=1), qmodel.forward(xt).argmax(axis=1)
    result = {"model": args.model, "out": args.out, "task": task.name, "sizes": model.sizes,
              "layers": [s.describe() for s in model.specs],
              "calibration_samples": int(len(task.y_pretrain)), "percentile": args.percentile,
              "activations": args.activations,
              "accuracy_float": float(np.mean(pred_float == task.y_test)),
              "accuracy_int8": float(np.mean(pred_int8 == task.y_test)),
              "agreement": float(np.mean(pred_float == pred_int8)),
              "bytes_float": int(model.nbytes), "bytes_int8": int(qmodel.nbytes),
              "file_bytes_float": len(dumps(model.tensors(), {"format": FORMAT})),
              "file_bytes_int8": (Path(args.out) / WEIGHTS_NAME).stat().st_size}
    what = '-'.join(map(str, model.sizes)) if model.is_plain_mlp() else \
        f"a {model.n_layers}-layer network ({', '.join(dict.fromkeys(s.kind for s in model.specs))})"
    mode = " with asymmetric activations (TFLM)" if args.activations == "asymmetric" else ""
    print(f"int8 model of {what}{mode} saved to {args.out} (calibrated on "
          f"{result['calibration_samples']} pre-train samples of {task.name})")
    print(f"  test accuracy  float {result['accuracy_float']:.4f}, int8 {result['accuracy_int8']:.4f} "
          f"(same prediction on {result['agreement']:.1%} of the test samples)")
    print(f"  tensor bytes   float {result['bytes_float']}, int8 {result['bytes_int8']} "
          f"({result['bytes_float'] / result['bytes_int8']:.2f}x smaller); {WEIGHTS_NAME} "
          f"{result['file_bytes_float']} and {result['file_bytes_int8']} bytes")
    write_json(args.json, result)
    return 0
