"""Fine-tuned CNNs exported to ONNX, run by ONNX Runtime beside edgetune on the real test sets.

For every task (the 1-D CNN presets): pre-train the task's convolutional backbone, fine-tune
it with ``lora-all`` (exported merged) and ``skip2-lora`` (exported with its skip adapters as
an added branch), write ``to_onnx`` and run the graph in ONNX Runtime on the task's test set.
Reported side by side: test accuracy from edgetune and from ONNX Runtime, the largest logit
difference, the share of equal predictions, and the time to score the whole test set
(edgetune's ``decision_function`` on its NumPy engine vs an ONNX Runtime session, one
thread each, median of 5).

    python -m benchmarks.onnx_cnn                 # damage1-1d, har-raw; the tasks' default epochs (long)
    python -m benchmarks.onnx_cnn --quick         # 5 pre-training and 5 fine-tuning epochs (a smoke run)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._util import REPO, emit, finish, time_call

TASKS = ("damage1-1d", "har-raw")
#: The backbone of each task: the fan spectra's preset; for HAR a MobileNet-style 1-D CNN
#: (depthwise residual block, ReLU6, global pooling), the layer kinds the preset lacks.
ARCH = {"damage1-1d": "cnn", "har-raw": "conv:16:5:1:same,relu6,maxpool:2,res(dwconv:3:1:1,relu6,conv:16:1),"
                                        "conv:32:5:2:2,relu,gap,dense:32,relu"}
METHODS = ("lora-all", "skip2-lora")


def run_task(name: str, data_dir: str, quick: bool, log) -> list[dict]:
    import onnxruntime as ort

    import edgetune as et
    from edgetune.experiment import backbone_accuracy, pretrain_on_task
    from edgetune.onnx import to_onnx

    task = et.load_task(name, data_dir)
    d = task.defaults
    pre_epochs = 5 if quick else d.get("pretrain_epochs", d["epochs"])
    epochs = 5 if quick else d["epochs"]
    t0 = time.perf_counter()
    model, _ = pretrain_on_task(task, arch=ARCH.get(name, "cnn"), epochs=pre_epochs, seed=0)
    before = backbone_accuracy(model, task.x_test, task.y_test)
    log(f"{name}: pre-trained {[s.kind for s in model.specs]} in {time.perf_counter() - t0:.1f} s")
    x = np.ascontiguousarray(task.x_test, dtype=np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            extra = {"train_last_bias": True} if method == "skip2-lora" else {}
            tuner = et.FineTuner(model, method, epochs=epochs, batch_size=d["batch_size"], lr=d["lr"], seed=0,
                                 **extra).fit(task.x_finetune, task.y_finetune)
            path = to_onnx(tuner, Path(tmp) / f"{method}.onnx")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x}
            mine = tuner.decision_function(x)
            theirs = sess.run(None, feed)[0]
            t_mine = time_call(lambda: tuner.decision_function(x))
            t_ort = time_call(lambda: sess.run(None, feed))
            rows.append({"task": name, "method": method, "pretrain_epochs": pre_epochs, "epochs": epochs,
                         "test_samples": int(len(x)), "accuracy_before": before,
                         "accuracy_edgetune": float(np.mean(mine.argmax(1) == task.y_test)),
                         "accuracy_onnxruntime": float(np.mean(theirs.argmax(1) == task.y_test)),
                         "max_abs_logit_diff": float(np.max(np.abs(mine - theirs))),
                         "same_prediction": float(np.mean(mine.argmax(1) == theirs.argmax(1))),
                         "onnx_nodes": sorted({n for n in _ops(path)}),
                         "seconds_edgetune": t_mine, "seconds_onnxruntime": t_ort})
            log(f"{name} {method}: {rows[-1]['accuracy_edgetune']:.4f} / {rows[-1]['accuracy_onnxruntime']:.4f}")
    return rows


def _ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_cnn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 pre-training and 5 fine-tuning epochs")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default {','.join(TASKS)})")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="where the data sets are")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    from edgetune.threads import set_blas_threads

    set_blas_threads(1)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    rows = [r for t in args.tasks.split(",") for r in run_task(t, args.data_dir, args.quick, log)]

    cmd = "python -m benchmarks.onnx_cnn" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    emit("### Fine-tuned CNNs in ONNX Runtime vs edgetune (test set, seed 0)\n")
    emit(f"`{cmd}`\n")
    emit("| task | method | epochs (pre/ft) | accuracy before | accuracy: edgetune | accuracy: ONNX Runtime | "
         "max abs logit diff | same prediction | score test set: edgetune (ms) | ONNX Runtime (ms) | "
         "edgetune / ONNX Runtime time |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        emit(f"| {r['task']} ({r['test_samples']}) | {r['method']} | {r['pretrain_epochs']}/{r['epochs']} | "
             f"{r['accuracy_before']:.4f} | {r['accuracy_edgetune']:.4f} | {r['accuracy_onnxruntime']:.4f} | "
             f"{r['max_abs_logit_diff']:.2e} | {r['same_prediction']:.4f} | {r['seconds_edgetune'] * 1e3:.1f} | "
             f"{r['seconds_onnxruntime'] * 1e3:.1f} | {r['seconds_edgetune'] / r['seconds_onnxruntime']:.2f}x |")
    emit("")
    finish(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
