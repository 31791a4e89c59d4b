"""edgetune bank: one adapter per domain on one frozen backbone, routed automatically."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from ._common import add_json_arg, check_outputs, info, non_negative_int, positive_float, positive_int, print_table, write_json

NAME = "bank"
HELP = "a bank of per-domain adapters: learn, list, route, evaluate, export"
DESCRIPTION = """An adapter bank keeps one small adapter per domain (a room, a fan, a person) on one
frozen backbone. Learning a domain never changes the others; a detector on the frozen
features routes each sample to the adapter of the domain it looks like, and says how unlike
every known domain it is (novelty). Data come from an .npz file (arrays x and y; route needs
only x) or from a built-in domain sequence (fan-rooms, har-subjects). See docs/bank.md.

examples:
  edgetune bank learn --model runs/fan-model --bank runs/bank --sequence fan-rooms \\
      --domain 12cm-noisy --data-dir ../shared/data
  edgetune bank learn --model runs/m --bank runs/bank --domain kitchen --data kitchen.npz
  edgetune bank list --model runs/m --bank runs/bank
  edgetune bank route --model runs/m --bank runs/bank --data x.npz --window 10 --json -
  edgetune bank route --model runs/m --bank runs/bank --data x.npz --save-counts
  edgetune bank evaluate --model runs/m --bank runs/bank --sequence fan-rooms --data-dir ../shared/data
  edgetune bank export --model runs/m --bank runs/bank --target host --out runs/bank-c \\
      --sequence fan-rooms --data-dir ../shared/data --run"""
ORDER = 45


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the backbone's model directory")
    p.add_argument("--bank", required=True, metavar="DIR", help="the bank directory")
    add_json_arg(p)
    p.add_argument("--quiet", action="store_true", help="print only the result")


def _data_args(p: argparse.ArgumentParser, *, need_domain: bool = False) -> None:
    g = p.add_argument_group("data (an .npz file, or a built-in domain sequence)")
    g.add_argument("--data", metavar="FILE.npz", help="arrays x (samples, features) and y (integer labels)")
    g.add_argument("--sequence", choices=["fan-rooms", "har-subjects"],
                   help="a built-in domain sequence (see docs/bank.md)")
    g.add_argument("--domain", metavar="NAME", required=need_domain,
                   help="the domain's name" + (" (with --sequence: also which domain's data)" if need_domain else
                                               " (with --sequence: which domain's data; default every domain)"))
    g.add_argument("--data-dir", metavar="DIR", help="where the built-in data sets are")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    le = sub.add_parser("learn", help="learn a new domain's adapter (creates the bank if needed)",
                        description="Train an adapter for a new domain and add it to the bank (the other "
                                    "adapters are not touched). With --sequence, the domain's training half.")
    _common(le)
    _data_args(le, need_domain=True)
    g = le.add_argument_group("a new bank's options (fixed when the bank is created)")
    g.add_argument("--method", default="skip2-lora", choices=["skip2-lora", "skip-lora", "lora-all", "lora-last"],
                   help="adapter method (default skip2-lora)")
    g.add_argument("--rank", type=positive_int, default=1, help="LoRA rank (default 1)")
    g.add_argument("--epochs", type=positive_int, default=100, help="epochs per domain (default 100)")
    g.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default 0.01)")
    g.add_argument("--batch-size", type=positive_int, default=20, help="mini-batch size (default 20)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed (default 0)")
    g.add_argument("--detector", default="mahalanobis",
                   choices=["mahalanobis", "diag", "centroid", "relative", "energy"],
                   help="domain detector (default mahalanobis)")
    g.add_argument("--features", default="hidden", choices=["hidden", "last", "input", "taps"],
                   help="frozen features the detector reads (default hidden)")
    g.add_argument("--window", type=positive_int, default=1,
                   help="default routing window in samples (default 1: each sample alone)")

    ls = sub.add_parser("list", help="the domains of a bank: samples, times routed, bytes, thresholds")
    _common(ls)

    ro = sub.add_parser("route", help="route samples to domains and flag novel ones",
                        description="Print how many samples go to each domain and how many look novel "
                                    "(unlike every known domain); --json has every sample's domain and novelty.")
    _common(ro)
    _data_args(ro)
    ro.add_argument("--window", type=positive_int, help="route over this many recent samples (default: the bank's)")
    ro.add_argument("--split", choices=["train", "test"], default="test", help="with --sequence: which half")
    ro.add_argument("--save-counts", action="store_true",
                    help="add the samples routed to each domain to the bank's usage counts and save the bank "
                         "(atomically); the 'drop' budget strategy removes the least used domain. Without it "
                         "the bank is only read")

    ex = sub.add_parser("export", help="write a C project that routes samples and applies the adapters on a device",
                        description="Write DIR: a C project holding the backbone, every domain's skip adapter and "
                                    "the detector's statistics, with the compiled engine's own C sources. For each "
                                    "sample it computes the frozen features, routes the sample to a domain, applies "
                                    "that domain's adapter and prints the domain, the novelty flag and the "
                                    "prediction. Targets as 'edgetune export' (host, aarch64-linux, cortex-m4, "
                                    "cortex-m7, riscv32, riscv32f); the samples (--data or --sequence) go into "
                                    "samples.bin (Linux) or the firmware (microcontrollers). With --run it builds "
                                    "and runs the program here and checks every sample against the bank in Python. "
                                    "Every bank method, float32 backbones (MLP or convolutional), the distance "
                                    "detectors (not energy). See docs/bank.md.")
    _common(ex)
    _data_args(ex)
    ex.add_argument("--split", choices=["train", "test"], default="test", help="with --sequence: which half")
    ex.add_argument("--target", required=True, help="host, aarch64-linux, cortex-m4, cortex-m7, riscv32, riscv32f")
    ex.add_argument("--out", required=True, metavar="DIR", help="the project directory to write")
    ex.add_argument("--max-samples", type=positive_int, metavar="N",
                    help="at most N samples of each data source, evenly spaced (a microcontroller's flash)")
    ex.add_argument("--window", type=positive_int, help="the program's routing window (default: the bank's)")
    ex.add_argument("--force", action="store_true", help="replace DIR if it exists")
    ex.add_argument("--run", action="store_true",
                    help="build and run the program here, and check it against the bank (exit 1 if they differ)")
    ex.add_argument("--no-toolchain-check", dest="toolchain_check", action="store_false",
                    help="write the project even if the target's compiler is not installed here")

    ev = sub.add_parser("evaluate", help="accuracy with routing, with the domain told, and routing accuracy",
                        description="With --data: accuracy routed (and with --domain, told that domain). "
                                    "With --sequence: for every domain of the sequence the bank knows, on its "
                                    "test half: routed and told accuracy, routing accuracy; and for domains "
                                    "the bank does not know, how many samples are flagged novel.")
    _common(ev)
    _data_args(ev)
    ev.add_argument("--window", type=positive_int, help="route over this many recent samples (default: the bank's)")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action is None:
        raise UsageError("choose an action: edgetune bank {learn,list,route,evaluate,export} (see edgetune bank --help)")
    return {"learn": _learn, "list": _list, "route": _route, "evaluate": _evaluate, "export": _export}[action](args)


# ------------------------------------------------------------------------ shared by the actions

def _check_outputs(args: argparse.Namespace) -> None:
    """--json must not land on an input: the model, the bank (or a file in it), the data file."""
    import os

    check_outputs(args.json, args=args)
    if args.json in (None, "-"):
        return
    out = os.path.realpath(args.json)
    for what in (args.bank, getattr(args, "data", None)):
        if what and (out == os.path.realpath(what) or out.startswith(os.path.realpath(what) + os.sep)):
            raise UsageError(f"--json {args.json} would write over an input ({what}); give another path")


def _backbone(args: argparse.Namespace):
    from ..nn.mlp import Backbone

    return Backbone.load(args.model)


def _load_bank(args: argparse.Namespace, backbone):
    from ..bank import BANK_FILE, AdapterBank
    from ..errors import ModelFileError

    if not (Path(args.bank) / BANK_FILE).is_file():
        raise ModelFileError(f"{args.bank}: no adapter bank here ({BANK_FILE} is missing); "
                             f"create one with 'edgetune bank learn'")
    return AdapterBank.load(args.bank, backbone)


def _npz(path: str, need_y: bool) -> tuple[np.ndarray, np.ndarray | None]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if "x" not in arrays:
        raise DataError(f"{path}: needs an array 'x' (samples, features); it has {sorted(arrays) or 'none'}")
    if need_y and "y" not in arrays:
        raise DataError(f"{path}: needs an array 'y' (integer labels) beside 'x'")
    return arrays["x"], arrays.get("y")


def _sources(args: argparse.Namespace, *, split: str, need_y: bool, every_domain: bool
             ) -> list[tuple[str | None, np.ndarray, np.ndarray | None]]:
    """(domain name or None, x, y) sets from --data or --sequence."""
    if (args.data is None) == (args.sequence is None):
        raise UsageError("give --data FILE.npz or --sequence NAME (one of them)")
    if args.data is not None:
        x, y = _npz(args.data, need_y)
        return [(args.domain, x, y)]
    from ..data.domains import load_sequence

    seq = load_sequence(args.sequence, args.data_dir)
    doms = [seq.domain(args.domain)] if args.domain else ([*seq.domains, *seq.unseen] if every_domain else None)
    if doms is None:
        raise UsageError("--sequence needs --domain NAME here")
    return [(d.name, getattr(d, f"x_{split}"), getattr(d, f"y_{split}")) for d in doms]


# ------------------------------------------------------------------------ actions

def _learn(args: argparse.Namespace) -> int:
    from ..bank import BANK_FILE, AdapterBank

    _check_outputs(args)
    backbone = _backbone(args)
    exists = (Path(args.bank) / BANK_FILE).is_file()
    if not exists and Path(args.bank).exists() and any(Path(args.bank).iterdir()):
        raise UsageError(f"{args.bank} exists and is not an adapter bank; give a new or empty directory")
    [(domain, x, y)] = _sources(args, split="train", need_y=True, every_domain=False)
    if exists:
        bank = AdapterBank.load(args.bank, backbone)
        info(args, f"bank {args.bank}: {len(bank.domains)} domains ({', '.join(bank.domains)}); "
                   f"its own method and options apply")
    else:
        bank = AdapterBank(backbone, args.method, detector=args.detector, features=args.features,
                           window=args.window, rank=args.rank, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed)
    info(args, f"learning domain {domain!r} on {len(x)} samples with {bank.method}")
    bank.learn(domain, x, y)
    bank.save(args.bank)
    row = next(r for r in bank.summary() if r["domain"] == domain)
    result = {"bank": args.bank, "domain": domain, "samples": row["samples"], "bytes": row["bytes"],
              "domains": bank.domains, **bank.domains_[domain].learned}
    print(f"learned {domain}: {row['samples']} samples, {row['bytes']} bytes on a device; "
          f"the bank holds {len(bank.domains)} domains")
    write_json(args.json, result)
    return 0


def _list(args: argparse.Namespace) -> int:
    _check_outputs(args)
    bank = _load_bank(args, _backbone(args))
    rows = bank.summary()
    nb = bank.nbytes()
    print_table([{**r, "threshold": f"{r['threshold']:.4g}"} for r in rows],
                [("domain", "domain"), ("kind", "kind"), ("samples", "samples"), ("routed", "routed"),
                 ("bytes", "bytes"), ("threshold", "novelty threshold")])
    print(f"method {bank.method}, detector {bank.detector} on {bank.features} features ({bank.n_features}), "
          f"window {bank.window}; shared detector bytes {nb['shared']}, total {nb['total']}")
    write_json(args.json, {"bank": args.bank, "method": bank.method, "detector": bank.detector,
                           "features": bank.features, "window": bank.window, "domains": rows, "bytes": nb})
    return 0


def _route(args: argparse.Namespace) -> int:
    _check_outputs(args)
    bank = _load_bank(args, _backbone(args))
    [(_, x, _)] = _sources(args, split=args.split, need_y=False, every_domain=False)
    routed = bank.route(x, window=args.window)
    novelty = bank.novelty(x)
    novel = bank.is_novel(x)
    counts = {n: int(np.sum(routed == n)) for n in bank.domains}
    for n, c in counts.items():
        print(f"{n:24s} {c:6d} samples")
    print(f"{'novel':24s} {int(novel.sum()):6d} samples (beyond the routed domain's threshold)")
    if args.save_counts:
        bank.save(args.bank)
        info(args, f"usage counts saved in {args.bank}")
    write_json(args.json, {"counts": counts, "novel": int(novel.sum()), "domains": routed.tolist(),
                           "novelty": novelty.tolist(), "is_novel": novel.tolist(),
                           "used": {n: e.used for n, e in bank.domains_.items()}, "saved": bool(args.save_counts)})
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _check_outputs(args)
    bank = _load_bank(args, _backbone(args))
    rows: list[dict[str, Any]] = []
    for domain, x, y in _sources(args, split="test", need_y=True, every_domain=True):
        row: dict[str, Any] = {"domain": domain or "-", "samples": len(x)}
        known = domain in bank.domains
        row["accuracy_routed"] = bank.score(x, y, window=args.window)
        if known:
            row["accuracy_told"] = bank.score(x, y, domain=domain)
            row["routing_accuracy"] = float(np.mean(bank.route(x, window=args.window) == domain))
        row["flagged_novel"] = float(np.mean(bank.is_novel(x)))
        row["known"] = known
        rows.append(row)
    show = [{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print_table(show, [("domain", "domain"), ("known", "in bank"), ("samples", "samples"),
                       ("accuracy_routed", "acc. routed"), ("accuracy_told", "acc. told"),
                       ("routing_accuracy", "routing acc."), ("flagged_novel", "flagged novel")])
    write_json(args.json, {"bank": args.bank, "window": args.window or bank.window, "domains": rows})
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..export.bank import BankExportOptions, check_bank_export, export_bank, make_size, run_bank_export
    from ..export.targets import get_target

    _check_outputs(args)
    target = get_target(args.target)
    bank = _load_bank(args, _backbone(args))
    parts, truth = [], []
    for domain, x, _ in _sources(args, split=args.split, need_y=False, every_domain=True):
        x = np.asarray(x)
        if args.max_samples and len(x) > args.max_samples:
            x = x[np.unique(np.round(np.linspace(0, len(x) - 1, args.max_samples)).astype(int))]
        parts.append(x)
        truth += [domain] * len(x)
    x = np.concatenate(parts)
    inputs = {"--model": args.model, "--bank": args.bank, "--data": args.data, "--data-dir": args.data_dir}
    manifest = export_bank(bank, BankExportOptions(target=target.name, out=args.out, window=args.window,
                                                   force=args.force, toolchain_check=args.toolchain_check),
                           x, inputs)
    b = manifest["bytes"]
    print(f"wrote {args.out}: {len(bank.domains)} domains, {len(x)} samples, {target.name}; data bytes: backbone "
          f"{b['backbone']}, detector shared {b['detector_shared']}, per domain "
          + ", ".join(f"{n} {v['total']}" for n, v in b["per_domain"].items()))
    result: dict[str, Any] = {"out": args.out, **manifest}
    if args.run:
        info(args, f"building and running {args.out} ...")
        report = check_bank_export(bank, x, run_bank_export(args.out), target=target.name)
        known = np.array([t in bank.domains for t in truth])
        if known.any():
            routed = np.array(bank.domains, dtype=object)[[r for r in report.pop("routed_index")]]
            true = np.array(truth, dtype=object)[known]
            report["routing_accuracy"] = float(np.mean(routed[known] == true))
            python = np.array(bank.domains, dtype=object)[bank.copy().route_index(x, window=report["window"])]
            report["routing_accuracy_python"] = float(np.mean(python[known] == true))
        else:
            report.pop("routed_index")
        if target.kind == "mcu":
            report["make_size"] = make_size(args.out)
        n = report["samples"]
        print(f"the program on {target.name}: routed domain equal for {report['routing_equal']}/{n} samples "
              f"({report['routing_ties']} ties), prediction {report['prediction_equal']}/{n}, novelty flag "
              f"{report['novelty_flag_equal']}/{n} ({report['novelty_flag_ties']} ties), "
              f"largest logit difference {report['max_logit_difference']:.3g} ({report['max_logit_difference_scaled']:.3g} "
              f"of the largest logit; tolerance {report['tolerance']:g})"
              + (f"; routing accuracy {report['routing_accuracy']:.4f} (in Python "
                 f"{report['routing_accuracy_python']:.4f})" if "routing_accuracy" in report else "")
              + (f"; make size: flash {report['make_size'].get('flash')} bytes, RAM {report['make_size'].get('ram')}"
                 if "make_size" in report else ""))
        result["check"] = report
        write_json(args.json, result)
        if not report["ok"]:
            print("the exported program disagrees with the bank in Python", file=sys.stderr)
            return 1
        return 0
    write_json(args.json, result)
    return 0
