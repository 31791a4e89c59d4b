"""edgetune detect: anomaly detectors learned from normal data only, and streams."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Iterator

from ._common import (add_force_arg, add_json_arg, check_outputs, info, non_negative_int, positive_float,
                      positive_int, write_json)

NAME = "detect"
HELP = "anomaly detection learned from normal data only: fit, score, adapt to a new room, stream"
DESCRIPTION = """Learn what normal looks like from normal data alone, flag what is not, and keep
learning on a stream (OS-ELM autoencoder; see docs/anomaly.md).

A task is a built-in name (fan-damage1-noisy, fan-2500rpm-silentA, fan-damage1-move, ...;
'edgetune detect tasks' lists them) or an .npz file with x_train (normal only), x_test,
y_test (1 = anomaly) and optional x_adapt (normal data of a new environment).

examples:
  edgetune detect fit    --task fan-damage1-move --data-dir ../shared/data --out runs/det
  edgetune detect score  --model runs/det --task fan-damage1-move --data-dir ../shared/data --json -
  edgetune detect adapt  --model runs/det --task fan-damage1-move --data-dir ../shared/data --out runs/det2
  edgetune detect stream --model runs/det2 --input samples.csv      # or - for stdin, or a FIFO"""
ORDER = 35


def _outputs(p: argparse.ArgumentParser) -> None:
    add_json_arg(p)
    p.add_argument("--quiet", action="store_true", help="no messages on stderr, only the result")


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, metavar="TASK",
                   help="a built-in anomaly task (see 'edgetune detect tasks') or an .npz task file")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the built-in data sets are (default: $EDGETUNE_DATA, then the user cache)")


AUTO_BANDS = 64


def _bands(value: str, kind: str, n_features: int) -> int | None:
    """--bands: a whole number, none, or auto (64 bands of an oselm's input wider than 64)."""
    from ..errors import UsageError

    if value == "none":
        return None
    if value == "auto":
        return AUTO_BANDS if kind == "oselm" and n_features > AUTO_BANDS else None
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"--bands must be a whole number, auto or none, got {value!r}") from None
    if not 1 <= n <= n_features:
        raise UsageError(f"--bands must be in 1..{n_features} (the task's features), got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..stream.detector import KINDS, RELEARN, THRESHOLDS, TRANSFORMS

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    fit = sub.add_parser("fit", help="learn a detector from a task's normal training data",
                         description="Learn a detector from the task's x_train (normal samples only) "
                                     "and set its threshold from them.")
    _task_args(fit)
    fit.add_argument("--out", required=True, metavar="DIR", help="detector directory to write")
    fit.add_argument("--detector", choices=KINDS, default="oselm",
                     help="oselm: OS-ELM autoencoder over the input (default); backbone: the same over "
                          "a frozen model's hidden features (needs --backbone)")
    fit.add_argument("--backbone", metavar="DIR", help="model directory whose hidden features --detector backbone reads")
    fit.add_argument("--transform", choices=TRANSFORMS, default="log",
                     help="log: learn log(x + 0.001) of non-negative amplitude spectra (default, "
                          "measured best on the fan data); none: the raw input")
    fit.add_argument("--bands", default="auto", metavar="N|auto|none",
                     help="average the inputs over N bands of adjacent features before the transform "
                          "(auto, the default: 64 bands for --detector oselm on inputs wider than 64 "
                          "features, else none; docs/anomaly.md)")
    fit.add_argument("--hidden", type=positive_int, default=128, help="hidden units of the OS-ELM (default 128)")
    fit.add_argument("--forgetting", type=positive_float, default=1.0,
                     help="RLS forgetting factor in (0, 1] (default 1: never forget)")
    fit.add_argument("--threshold", choices=THRESHOLDS, default="quantile",
                     help="how the threshold is set from normal data (default quantile)")
    fit.add_argument("--fpr", type=positive_float, default=0.05,
                     help="false-positive rate the threshold aims at on normal data (default 0.05)")
    fit.add_argument("--relearn", choices=RELEARN, default="confirm",
                     help="on a change of environment in a stream: confirm (report it; re-learn with "
                          "'detect adapt'; default) or auto (learn the next samples as a new environment)")
    fit.add_argument("--relearn-samples", type=positive_int, default=100,
                     help="samples learned as a new environment after a change with --relearn auto (default 100)")
    fit.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random hidden layer (default 0)")
    add_force_arg(fit)
    _outputs(fit)

    sc = sub.add_parser("score", help="AUC, pAUC and the alarm rates of a detector on a task's test data",
                        description="Score the task's x_test: ROC AUC, partial AUC at FPR 0.1 (McClish, as "
                                    "scikit-learn's max_fpr), and TPR / FPR at the detector's threshold.")
    sc.add_argument("--model", required=True, metavar="DIR", help="detector directory")
    _task_args(sc)
    _outputs(sc)

    ad = sub.add_parser("adapt", help="learn a task's x_adapt (normal data of a new environment) beside the old one",
                        description="Add a new environment learned from the task's x_adapt, keeping the "
                                    "old ones, and write the result to --out.")
    ad.add_argument("--model", required=True, metavar="DIR", help="detector directory")
    _task_args(ad)
    ad.add_argument("--out", required=True, metavar="DIR", help="detector directory to write")
    add_force_arg(ad)
    _outputs(ad)

    st = sub.add_parser("stream", help="score and learn samples one by one (CSV or JSON lines), one JSON line each",
                        description="Read samples from a file, a FIFO or stdin, one per line: comma- or space-"
                                    "separated numbers, or JSON ([...] or {\"x\": [...]}). Write one JSON line "
                                    "per sample to stdout: score (higher is more normal; -1 is the threshold), "
                                    "alarm, drift (a sustained change of the scores), learned. A normal sample "
                                    "is learned; an alarm never is.")
    st.add_argument("--model", required=True, metavar="DIR", help="detector directory")
    st.add_argument("--input", default="-", metavar="PATH", help="file or FIFO to read (default - : stdin)")
    st.add_argument("--relearn", choices=RELEARN, help="override the detector's policy on a change of environment")
    st.add_argument("--no-learn", dest="learn", action="store_false", help="only score, learn nothing")
    st.add_argument("--out", metavar="DIR", help="write the detector as learned at the end of the stream")
    st.add_argument("--engine", choices=("auto", "c", "numpy"), default="auto",
                    help="auto (default): the lines read together are learned in the compiled loop when it "
                         "is built (float32, scores within 1e-4 of numpy's); c: require it; numpy: learn_one "
                         "on each line in float64")
    add_force_arg(st)
    _outputs(st)

    ex = sub.add_parser("export", help="a C project that streams samples through the detector on a device",
                        description="Write a C project (the engine's OS-ELM sources, the detector's state as a "
                                    "checksummed blob, an example program streaming the task's test samples "
                                    "test-then-train, and a Makefile) for a target: host, aarch64-linux, "
                                    "cortex-m4, cortex-m7, riscv32, riscv32f ('make run'; microcontrollers "
                                    "under QEMU).")
    ex.add_argument("--model", required=True, metavar="DIR", help="detector directory")
    from ..export.detector import TARGETS
    ex.add_argument("--target", required=True, choices=TARGETS, help="where the program runs")
    _task_args(ex)
    ex.add_argument("--samples", type=positive_int, default=100, help="test samples embedded (default 100)")
    ex.add_argument("--budget", metavar="SIZE",
                    help="RAM the detector may use, e.g. 200KB (default: a microcontroller's RAM); refused "
                         "before anything is written if the plan exceeds it")
    ex.add_argument("--environment", type=int, default=-1,
                    help="which learned environment to export (default -1: the last, the current room)")
    ex.add_argument("--out", required=True, metavar="DIR", help="project directory to write")
    add_force_arg(ex)
    _outputs(ex)

    pl = sub.add_parser("plan", help="the RAM a detector needs on each device target, before exporting it",
                        description="The RAM the exported detector needs on a target, from the compiled engine's "
                                    "own state size: the learned state (P, beta, scratch; the random input "
                                    "weights too on Linux targets, regenerated from the seed on "
                                    "microcontrollers), one standardised input, and on a microcontroller the "
                                    "stack and statics the export reserves. Without --target, every target. "
                                    "With --budget, exit 1 if the plan exceeds it (on every target asked).")
    pl.add_argument("--model", required=True, metavar="DIR", help="detector directory")
    pl.add_argument("--target", choices=TARGETS, help="one target (default: every target)")
    pl.add_argument("--budget", metavar="SIZE", help="RAM the detector may use, e.g. 200KB")
    pl.add_argument("--environment", type=int, default=-1,
                    help="which learned environment (default -1: the last, the current room)")
    _outputs(pl)

    ts = sub.add_parser("tasks", help="list the built-in anomaly tasks")
    _outputs(ts)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    action = getattr(args, "action", None)
    if action is None:
        raise UsageError("choose an action: fit, score, adapt, stream, plan, export or tasks (see 'edgetune detect "
                         "--help')")
    return {"fit": _fit, "score": _score, "adapt": _adapt, "stream": _stream, "tasks": _tasks,
            "plan": _plan, "export": _export}[action](args)


def _plan(args: argparse.Namespace) -> int:
    from ..errors import BudgetError, UsageError
    from ..export.detector import TARGETS, plan_detector
    from ..export.targets import get_target
    from ..stream import AnomalyDetector
    from ..units import parse_bytes
    from ._common import print_table

    check_outputs(args.json, args=args)
    budget = parse_bytes(args.budget, "--budget") if args.budget is not None else None
    det = AnomalyDetector.load(args.model)
    n_env = len(det.environments_)
    if not -n_env <= args.environment < n_env:
        raise UsageError(f"--environment {args.environment}: the detector has {n_env} environment"
                         f"{'s' if n_env != 1 else ''} (0..{n_env - 1}, or -1 for the last)")
    if det.kind != "oselm":
        raise UsageError("only kind='oselm' detectors run on a device (the backbone kind needs the backbone there)")
    rows = []
    for name in ([args.target] if args.target else TARGETS):
        t = get_target(name)
        p = plan_detector(det, name, args.environment)
        limit = budget if budget is not None else (t.ram_bytes if t.kind == "mcu" else None)
        rows.append({"target": name, "state_bytes": p["state_bytes"], "ram_bytes": p["ram_bytes"],
                     "limit_bytes": limit, "fits": limit is None or p["ram_bytes"] <= limit,
                     "weights": "kept in the state" if t.kind != "mcu" else "regenerated from the seed"})
    print_table([{**r, "state_bytes": f"{r['state_bytes']:,}", "ram_bytes": f"{r['ram_bytes']:,}",
                  "limit_bytes": "-" if r["limit_bytes"] is None else f"{r['limit_bytes']:,}",
                  "fits": "yes" if r["fits"] else "NO"} for r in rows],
                [("target", "target"), ("state_bytes", "state bytes"), ("ram_bytes", "RAM bytes"),
                 ("limit_bytes", "budget / board RAM"), ("fits", "fits"), ("weights", "random weights")])
    write_json(args.json, {"model": str(args.model), "n_features": det.n_features_in_, "n_hidden": det.n_hidden,
                           "budget": budget, "targets": rows})
    over = [r for r in rows if not r["fits"]]
    if over and budget is not None:
        raise BudgetError(f"the detector needs more than --budget {budget:,} bytes on "
                          f"{', '.join(r['target'] + ' (' + format(r['ram_bytes'], ',') + ')' for r in over)}: "
                          f"use fewer hidden units (detect fit --hidden N)")
    return 0



def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..export.detector import export_detector
    from ..stream import AnomalyDetector

    check_outputs(args.json, args=args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} is not empty; pass --force to write the project into it")
    det = AnomalyDetector.load(args.model)
    task = _load_task(args)
    from ..units import parse_bytes
    budget = parse_bytes(args.budget, "--budget") if args.budget is not None else None
    manifest = export_detector(det, args.target, out, task.x_test[:args.samples], args.environment, budget)
    write_json(args.json, manifest)
    info(args, f"detect export: {args.target} project in {out} (RAM {manifest['planned_ram_bytes']:,} bytes planned, "
               f"state {manifest['state_bytes']:,} bytes, "
               f"{manifest['samples']} samples); run it with 'make -C {out} run'")
    return 0


def _check_out_dir(args: argparse.Namespace, out: str | None) -> None:
    """Like check_outputs' model check, for detector directories: overwrite only with --force."""
    from pathlib import Path

    from ..errors import UsageError
    from ..stream.detector import CONFIG_NAME, WEIGHTS_NAME
    if out and not args.force and any((Path(out) / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME)):
        raise UsageError(f"{out} already holds a detector; pass --force to overwrite it")


def _load_task(args: argparse.Namespace):
    from ..data.anomaly import load_anomaly_task
    return load_anomaly_task(args.task, args.data_dir)


def _tasks(args: argparse.Namespace) -> int:
    from ..data.anomaly import builtin_names
    names = builtin_names()
    if args.json:
        write_json(args.json, {"tasks": names})
    if args.json != "-":
        print("\n".join(names))
    return 0


def _fit(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..stream import AnomalyDetector

    check_outputs(args.json, dirs=(args.out,), args=args)
    _check_out_dir(args, args.out)
    backbone = None
    if args.detector == "backbone":
        if not args.backbone:
            raise UsageError("--detector backbone needs --backbone DIR (a model directory)")
        from ..nn.mlp import Backbone
        backbone = Backbone.load(args.backbone)
    elif args.backbone:
        raise UsageError("--backbone is only used with --detector backbone")
    if not 0 < args.fpr < 0.5:
        raise UsageError(f"--fpr must be in (0, 0.5), got {args.fpr}")
    if not 0 < args.forgetting <= 1:
        raise UsageError(f"--forgetting must be in (0, 1], got {args.forgetting}")
    task = _load_task(args)
    info(args, f"detect fit: {task.summary()}")
    bands = _bands(args.bands, args.detector, task.n_features)
    det = AnomalyDetector(args.detector, transform=args.transform, bands=bands, n_hidden=args.hidden, seed=args.seed,
                          forgetting=args.forgetting, threshold=args.threshold, fpr=args.fpr, backbone=backbone,
                          relearn=args.relearn, relearn_samples=args.relearn_samples)
    t0 = time.perf_counter()
    det.fit(task.x_train)
    seconds = time.perf_counter() - t0
    det.save(args.out)
    out = {"task": task.name, "detector": args.detector, "bands": bands, "train_samples": len(task.x_train),
           "threshold": det.environments_[0].threshold, "threshold_method": args.threshold, "fpr_target": args.fpr,
           "fit_seconds": seconds, "out": args.out}
    write_json(args.json, out)
    info(args, f"detect fit: {len(task.x_train)} normal samples in {seconds:.2f} s, threshold "
               f"{out['threshold']:.4g} ({args.threshold}, FPR {args.fpr}); saved {args.out}")
    return 0


def evaluate(det: Any, x: Any, y: Any) -> dict[str, float]:
    """AUC, pAUC at FPR 0.1, and TPR / FPR at the detector's own threshold."""
    from ..stream.metrics import pauc, rates_at, roc_auc

    s = -det.score_samples(x)
    tpr, fpr = rates_at(y, det.predict(x) == -1)
    return {"auc": roc_auc(y, s), "pauc": pauc(y, s, 0.1), "tpr": tpr, "fpr": fpr,
            "n_normal": int((y == 0).sum()), "n_anomalous": int((y == 1).sum())}


def _score(args: argparse.Namespace) -> int:
    from ..stream import AnomalyDetector

    check_outputs(args.json, args=args)
    det = AnomalyDetector.load(args.model)
    task = _load_task(args)
    res: dict[str, Any] = {"task": task.name, **evaluate(det, task.x_test, task.y_test),
                           "threshold": [e.threshold for e in det.environments_],
                           "score_threshold": det.offset_, "environments": len(det.environments_)}
    for k, (x, y) in task.extra_tests.items():
        res[k] = evaluate(det, x, y)
    write_json(args.json, res)
    if args.json != "-":
        print(f"{task.name}: AUC {res['auc']:.3f}  pAUC(0.1) {res['pauc']:.3f}  at the threshold: "
              f"TPR {res['tpr']:.3f} FPR {res['fpr']:.3f}  ({res['environments']} environment(s))")
        for k in task.extra_tests:
            r = res[k]
            print(f"  {k}: AUC {r['auc']:.3f}  pAUC(0.1) {r['pauc']:.3f}  TPR {r['tpr']:.3f} FPR {r['fpr']:.3f}")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..stream import AnomalyDetector

    check_outputs(args.json, dirs=(args.out,), args=args)
    _check_out_dir(args, args.out)
    det = AnomalyDetector.load(args.model)
    task = _load_task(args)
    if task.x_adapt is None:
        raise DataError(f"{task.name} has no x_adapt (normal data of a new environment) to learn")
    t0 = time.perf_counter()
    det.adapt(task.x_adapt)
    seconds = time.perf_counter() - t0
    det.save(args.out)
    out = {"task": task.name, "adapt_samples": len(task.x_adapt), "environments": len(det.environments_),
           "threshold": det.environments_[-1].threshold, "adapt_seconds": seconds, "out": args.out}
    write_json(args.json, out)
    info(args, f"detect adapt: learned {len(task.x_adapt)} normal samples of a new environment in {seconds:.2f} s "
               f"({len(det.environments_)} environments); saved {args.out}")
    return 0


def _parse_line(line: str, width: int) -> list[float]:
    text = line.strip()
    if text[:1] in "[{":
        v = json.loads(text)
        if isinstance(v, dict):
            if "x" not in v:
                raise ValueError('a JSON object needs the key "x"')
            v = v["x"]
        if not isinstance(v, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
            raise ValueError("expected a list of numbers")
        values = [float(a) for a in v]
    else:
        values = [float(a) for a in text.replace(",", " ").split()]  # float() reads nan and inf
    if len(values) != width:
        raise ValueError(f"expected {width} values, got {len(values)}")
    return values


def _read_chunks(src: Any) -> Iterator[list[str]]:
    """The complete lines that have arrived, a list per read: on a file up to 1 MB at a time,
    on a pipe, a FIFO or a terminal whatever is there (os.read returns as soon as some bytes
    are, so every line is answered before the next is awaited). Newlines as in text mode
    (\\n, \\r\\n or \\r); bytes that are not UTF-8 are replaced (the line then fails to parse)."""
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):   # a stream without a descriptor: a line at a time
        for line in src:
            yield [line]
        return
    buf = b""
    while True:
        data = os.read(fd, READ_BYTES)
        if not data:
            break
        buf += data
        end = len(buf) - 1 if buf.endswith(b"\r") else len(buf)   # a \r\n may straddle two reads
        cut = max(buf.rfind(b"\n", 0, end), buf.rfind(b"\r", 0, end))
        if cut < 0:
            continue
        done, buf = buf[:cut + 1], buf[cut + 1:]
        yield _split_lines(done)
    if buf:
        yield _split_lines(buf)


def _split_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


READ_BYTES = 1 << 20


def _parse_chunk(lines: list[str], width: int) -> list[Any]:
    """Each non-blank line's values (a float64 row) or its error message, None for a blank
    line. Lines of plain numbers are parsed together by NumPy when all of them are
    well-formed; otherwise (or for JSON) each line is parsed alone by _parse_line."""
    import numpy as np

    rows = [ln for ln in lines if ln.strip()]
    if rows and not any(ln.lstrip()[:1] in "[{" for ln in rows):
        x = None
        # comma-separated first (no copy of the lines), then any mix of commas and blanks
        for delimiter in ([","] if "," in rows[0] else []) + [None]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    x = np.loadtxt(rows if delimiter else [ln.replace(",", " ") for ln in rows], dtype=np.float64,
                                   delimiter=delimiter, comments=None, ndmin=2)
                break
            except (ValueError, UserWarning):
                x = None
        if x is not None and x.shape == (len(rows), width):
            it = iter(x)
            return [next(it) if ln.strip() else None for ln in lines]
    out: list[Any] = []
    for ln in lines:
        if not ln.strip():
            out.append(None)
            continue
        try:
            out.append(np.array(_parse_line(ln, width)))
        except (ValueError, json.JSONDecodeError) as e:
            out.append(str(e))
    return out


def _score_rows(det: Any, x: Any) -> list[dict[str, Any]]:
    """--no-learn: the rows of one read scored together (score_samples, float64; the same
    values as one row at a time), a row with NaN or inf refused in place; nothing learned."""
    import numpy as np

    finite = np.isfinite(x).all(axis=1)
    scores = np.full(len(x), np.nan)
    if finite.any():
        scores[finite] = det.score_samples(x[finite])
    return [{"score": float(s), "alarm": bool(s < det.offset_), "drift": False, "learned": False} if ok else
            {"score": None, "alarm": None, "drift": False, "learned": False, "refused": True}
            for ok, s in zip(finite, scores)]


def _stream(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import DataError, UsageError
    from ..stream import AnomalyDetector

    if args.json == "-":
        raise UsageError("--json -: stdout carries the per-sample lines; give a file for the summary")
    check_outputs(args.json, dirs=(args.out,) if args.out else (), args=args)
    _check_out_dir(args, args.out)
    det = AnomalyDetector.load(args.model)
    if args.relearn:
        det.relearn = args.relearn
    if args.engine == "c" and args.learn:
        try:
            det._native_stream(required=True)
        except ImportError as e:
            raise UsageError(f"--engine c: {e}") from None
    width = det.n_features_in_
    try:
        src = sys.stdin if args.input == "-" else open(args.input, "rb")
    except OSError as e:
        raise DataError(f"cannot read {args.input}: {e.strerror or e}") from None
    n = alarms = drifts = learned = refused = bad = 0
    lineno = 0
    t0 = time.perf_counter()
    try:
        for lines in _read_chunks(src):
            parsed = _parse_chunk(lines, width)
            good = [v for v in parsed if v is not None and not isinstance(v, str)]
            if not good:
                results: list[dict[str, Any]] = []
            elif args.learn:
                results = det.learn_rows(np.stack(good), engine=args.engine)
            else:
                results = _score_rows(det, np.stack(good))
            it = iter(results)
            text = []
            for v in parsed:
                lineno += 1
                if v is None:
                    continue
                if isinstance(v, str):
                    bad += 1
                    out: dict[str, Any] = {"line": lineno, "error": v}
                else:
                    n += 1
                    out = {"line": lineno, **next(it)}
                    alarms += bool(out.get("alarm"))
                    drifts += bool(out.get("drift"))
                    learned += bool(out.get("learned"))
                    refused += bool(out.get("refused"))
                text.append(json.dumps(out, allow_nan=False) + "\n")
            sys.stdout.write("".join(text))
            sys.stdout.flush()
    finally:
        if src is not sys.stdin:
            src.close()
    seconds = time.perf_counter() - t0
    if args.out:
        det.save(args.out)
    summary = {"samples": n, "alarms": alarms, "drifts": drifts, "learned": learned, "refused": refused,
               "bad_lines": bad, "environments": len(det.environments_), "seconds": seconds,
               "samples_per_second": n / seconds if seconds > 0 else math.inf}
    write_json(args.json, summary)
    info(args, f"detect stream: {n} samples, {alarms} alarms, {drifts} changes of environment, {learned} learned, "
               f"{refused} refused, {bad} unreadable lines" + (f"; saved {args.out}" if args.out else ""))
    if bad:
        print(f"edgetune detect: error: {bad} line(s) could not be read (see their 'error' lines)", file=sys.stderr)
        return 1
    return 0
