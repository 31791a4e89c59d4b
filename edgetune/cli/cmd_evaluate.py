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
        # a fresh adapter leaves the model unchanged (an int8 model has no float weights for lora)
        tuner = FineTuner(model, "skip-lora" if model.is_int8 else "lora-last")
    splits = {"pretrain": (task.x_pretrain, task.y_pretrain), "finetune": (task.x_finetune, task.y_finetune),
              "test": (task.x_test, task.y_test), **task.extra_tests}
    labels = [str(lb) for lb in task.labels] or [str(k) for k in range(task.n_classes)]
    result = {"task": task.name, "model": args.model, "adapter": args.adapter, "labels": labels}
    for name, (x, y) in splits.items():
        result[f"accuracy_{name}"] = tuner.score(x, y)
        print(f"{name:10s} accuracy {result[f'accuracy_{name}']:.4f}  ({len(y)} samples)")
    for name, (x, y) in splits.items():
        result[f"classes_{name}"] = class_report(y, tuner.predict(x), task.n_classes)
    _print_classes(result["classes_test"], labels)
    if args.onnx:
        from ..onnx import to_onnx
        to_onnx(tuner if args.adapter else model, args.onnx)
        result["onnx"] = args.onnx
    write_json(args.json, result)
    return 0


def class_report(y_true, y_pred, n_classes: int) -> dict:
    """Confusion matrix (rows: true class, columns: predicted) and per-class precision, recall, F1
    (0.0 where a class is never predicted or never present, as scikit-learn's zero_division=0)."""
    import numpy as np

    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    predicted, present = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(tp, present, out=np.zeros(n_classes), where=present > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes),
                   where=(precision + recall) > 0)
    return {"confusion": cm.tolist(), "precision": precision.tolist(), "recall": recall.tolist(),
            "f1": f1.tolist(), "support": present.tolist(), "macro_f1": float(f1.mean())}


def _print_classes(rep: dict, labels: list[str]) -> None:
    width = max(len(str(lb)) for lb in labels)
    print(f"test split per class ({'macro F1 %.4f' % rep['macro_f1']}):")
    print(f"  {'class':{width}s}  precision  recall  f1      support  predicted as: " + " ".join(map(str, labels)))
    for k, lb in enumerate(labels):
        print(f"  {str(lb):{width}s}  {rep['precision'][k]:.4f}     {rep['recall'][k]:.4f}  {rep['f1'][k]:.4f}  "
              f"{rep['support'][k]:7d}  " + " ".join(str(v) for v in rep['confusion'][k]))
