"""edgetune predict: classify raw inputs with a model (and optionally an adapter)."""
from __future__ import annotations

import argparse
import sys

from ._common import add_output_args, check_outputs, write_json

NAME = "predict"
HELP = "classify raw inputs (.npy, .npz with x, or .csv) with a model, with or without an adapter"
DESCRIPTION = """Predict the class of every row of raw inputs: the same features the model was
trained on, before normalisation (the model applies its own). Inputs: a .npy array
(samples, features), an .npz file with an array 'x', or a CSV file of feature columns (a
header row is skipped). Prints one line per sample (index, class, probability), or writes
them with --out as CSV (index, label, one probability column per class).

examples:
  edgetune predict --model runs/model --adapter runs/adapter --input new.csv
  edgetune predict --model runs/model --input x.npy --out predictions.csv --quiet"""
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (float or int8)")
    p.add_argument("--adapter", metavar="DIR", help="adapter directory saved by 'finetune --save-adapter'")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load an adapter trained on another backbone of the same shape (its digest differs)")
    p.add_argument("--input", required=True, metavar="FILE", help="raw inputs: .npy, .npz (array x) or .csv")
    p.add_argument("--out", metavar="CSV", help="write the predictions as CSV (index, label, probabilities)")
    add_output_args(p)


def read_inputs(path: str):
    """Rows of raw features from a .npy, .npz (array 'x') or .csv file."""
    import zipfile
    from pathlib import Path

    import numpy as np

    from ..data.csv_task import read_features
    from ..errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--input {path}: no such file")
    if p.suffix.lower() == ".csv":
        return read_features(p)
    try:
        if zipfile.is_zipfile(p):
            from ..data.task import _check_npz_headers

            _check_npz_headers(p)
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise DataError(f"{path}: an .npz input needs an array named 'x' (has {', '.join(z.files)})")
                x = z["x"]
        else:
            x = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a .npy, .npz or .csv file ({e})") from None
    return x


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..api import FineTuner
    from ..data.task import validate_xy
    from ..errors import DataError
    from ..io_atomic import write_bytes_atomic
    from ..quant import load_any

    check_outputs(args.json, args.out, args=args)
    model = load_any(args.model)
    x = read_inputs(args.input)
    if x.ndim != 2:
        raise DataError(f"{args.input}: inputs must be 2-D (samples, features), got shape {x.shape}")
    if x.shape[1] != model.sizes[0]:
        raise DataError(f"{args.input}: {x.shape[1]} features per row, but the model takes {model.sizes[0]}")
    x, _ = validate_xy(x, np.zeros(len(x), np.int64), what=args.input)
    tuner = (FineTuner.load_adapter(model, args.adapter, strict=args.strict) if args.adapter
             else FineTuner(model, "skip-lora" if model.is_int8 else "lora-last"))  # a fresh adapter: the model as is
    proba = tuner.predict_proba(x)
    pred = proba.argmax(axis=1)
    names = [str(lb) for lb in model.labels] if model.labels else [str(k) for k in range(model.sizes[-1])]
    if args.out:
        lines = ["index,label," + ",".join(f"p_{n}" for n in names)]
        lines += [f"{i},{names[k]}," + ",".join(f"{v:.6g}" for v in row) for i, (k, row) in enumerate(zip(pred, proba))]
        write_bytes_atomic(args.out, ("\n".join(lines) + "\n").encode())
    if not args.quiet and not args.out:
        for i, k in enumerate(pred):
            print(f"{i}\t{names[k]}\t{proba[i, k]:.4f}")
    counts = np.bincount(pred, minlength=len(names))
    print("predicted: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)) +
          (f" ({len(pred)} samples; written to {args.out})" if args.out else f" ({len(pred)} samples)"),
          file=sys.stdout)
    write_json(args.json, {"model": args.model, "adapter": args.adapter, "input": args.input, "labels": names,
                           "predictions": [names[k] for k in pred], "classes": pred.tolist(),
                           "probabilities": proba.tolist()})
    return 0
