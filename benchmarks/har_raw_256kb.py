"""Accuracy on real data under 256 KB on a Cortex-M4 (QEMU mps2-an386): har-raw's preset 1-D CNN,
pre-trained on 15 subjects and quantised to int8 (--percentile 99.9), fine-tuned on the device on
windows of the other subjects and tested on the task's test subjects (people it never saw).

    (a) sparse update, the scheme chosen by --scheme auto for the device program's 256 KB
    (b) skip2-lora with an int8 skip-cache (--int8), 256 KB (--partial-cache when the cache does not fit)
    (c) float lora-all on this machine (edgetune finetune: no memory limit), on the same samples and
        epochs, and at the task's defaults on all fine-tuning samples

Every step is an edgetune command (printed as it runs); the device runs are 'make icount' (QEMU
counting instructions: the SysTick counts at 25 MHz of a 1 GHz virtual clock, so one tick is 40
instructions) and 'make size' (RAM as linked). A microcontroller links its samples into flash
(they stand in for a sensor): N training and T test windows of 6 x 128 floats need --flash 4MB,
the emulated board's flash (RAM stays 256 KB). "all test" is the accuracy of the same
configuration trained by FineTuner (the compiled engine on this machine, the program's samples,
shuffles and seed) on every test window. Each device run's loss is compared with the host build of
the same project (the same bits: docs/export.md) and with FineTuner's (the package's engine calls
the C library's exp and log: a last-bit difference can flip an int8 rounding and grow).

    python -m benchmarks.har_raw_256kb --json /tmp/har256.json
    python -m benchmarks.har_raw_256kb --quick            # a smoke run (2 epochs, fewer samples)
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._util import REPO, emit, finish


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> str:
    emit("$ " + " ".join(shlex.quote(c) for c in cmd))
    exe = [sys.executable, "-m", "edgetune", *cmd[1:]] if cmd[0] == "edgetune" else cmd
    res = subprocess.run(exe, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return res.stdout


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _final_loss(text: str) -> float:
    """The last epoch's loss as the exact double a program printed (its "epoch N loss X bits HEX"
    lines; a microcontroller's JSON line has 10 digits)."""
    from edgetune.export.project import epoch_losses

    found = epoch_losses(text)
    if not found:
        raise SystemExit("the program printed no 'epoch ... bits' line")
    return found[-1][1]


def _ram_linked(size_text: str) -> int:
    line = [x for x in size_text.splitlines() if x.startswith("RAM ")][0]
    return int(line.split()[1])


def _replica(model_dir: Path, man: dict, data_dir: str) -> tuple[float | None, float | None]:
    """The exported configuration trained by FineTuner on this machine: (final loss, accuracy on every
    test window); None for a partial skip-cache, which this replica does not set up."""
    import edgetune as et
    from edgetune.quant import load_any
    from edgetune.quant.cache import attach_int8_cache

    tr = man["train_indices"]
    if man["cache"] and man["cache_capacity"] < len(tr):
        return None, None
    task = et.load_task("har-raw", data_dir)
    model = load_any(model_dir)  # the int8 model as written by 'edgetune quantize'
    kw = {"scheme": man["scheme"]} if man.get("scheme") else {}
    tuner = et.FineTuner(model, man["method"], epochs=man["epochs"], seed=man["seed"], batch_size=man["batch_size"],
                         lr=man["lr"], engine="c", **kw)
    if man["cache"] == "int8":
        attach_int8_cache(tuner.method, len(tr), x_calib=task.x_pretrain)
    tuner.fit(task.x_finetune[tr], task.y_finetune[tr])
    return float(tuner.history_.final_loss), float(tuner.score(task.x_test, task.y_test))


def host_build(model: str, export_args: list[str], out: Path, work: Path) -> float:
    """The same project exported for this machine (`--target host`; no RAM budget or flash, which
    only a microcontroller has), built and run: its final loss. Every target's build computes the
    same float32 operations (docs/export.md), so a device's loss should equal it bit for bit."""
    args, skip = [], 0
    for i, a in enumerate(export_args):
        if skip:
            skip -= 1
            continue
        if a in ("--target", "--budget", "--flash"):
            skip = 1
            continue
        args.append(a)
    _run(["edgetune", "export", "--model", model, *args, "--target", "host", "--out", str(out), "--force"], work)
    _run(["make", "-s", "-C", str(out)], work)
    emit(f"$ {out / 'train'}")
    res = subprocess.run([str(out / "train")], cwd=work, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {out / 'train'}\n{res.stdout}\n{res.stderr}")
    return _final_loss(res.stderr)  # a Linux program prints its epochs on stderr


def device(name: str, model: str, method: list[str], common: list[str], work: Path, data_dir: str) -> dict:
    plan_json, out = work / f"{name}-plan.json", work / name
    _run(["edgetune", "plan", "--model", model, *method, *common, "--json", str(plan_json)], work)
    plan = json.loads(plan_json.read_text())
    samples = [a for i, a in enumerate(common) if i and common[i - 1] == "--samples"]
    export_common = [("--max-samples" if a == "--samples" else a) for a in common]
    _run(["edgetune", "export", "--model", model, *method, *export_common, "--out", str(out), "--force",
          "--json", str(work / f"{name}-export.json")], work)
    man = json.loads((out / "export.json").read_text())
    _run(["make", "-s", "-C", str(out)], work)
    t0 = time.perf_counter()
    text = _run(["make", "-s", "-C", str(out), "icount"], work, timeout=900)
    res = _last_json(text)
    res["final_loss"] = _final_loss(text)  # the exact double, not the JSON line's 10 digits
    wall = time.perf_counter() - t0
    linked = _ram_linked(_run(["make", "-s", "-C", str(out), "size"], work))
    ticks_per_instr = 1e9 / res["tick_hz"]
    replica_loss, replica_acc = _replica(work / model, man, data_dir)
    chosen = ["--method", man["method"]] + (["--scheme", man["scheme"]] if man.get("scheme") else []) + \
        [a for a in method if a in ("--int8", "--partial-cache")]
    host_loss = host_build(model, chosen + export_common, work / f"{name}-host", work)
    return {"host_final_loss": host_loss, "name": name, "label": man["method"] + (f"[{man['scheme']}]" if man.get("scheme") else "")
            + (f", {man['cache']} cache {man['cache_capacity']}/{man['max_samples']}" if man["cache"] else ""),
            "backbone": man["backbone"], "planned_ram": plan["ram_bytes"], "linked_ram": linked,
            "samples": int(samples[0]) if samples else man["max_samples"], "epochs": man["epochs"],
            "batch": man["batch_size"], "acc_before": res["accuracy_before"], "acc_after": res["accuracy_after"],
            "acc_all_test": replica_acc, "replica_final_loss": replica_loss,
            "train_instructions": res["train_ticks"] * ticks_per_instr,
            "instructions_per_sample_epoch": res["train_ticks"] * ticks_per_instr / (man["epochs"] * res["samples"]),
            "qemu_seconds": wall, "final_loss": res["final_loss"], "stack_used": res["stack_used_bytes"],
            "scheme_search": plan.get("scheme_search", {}).get("search"), "name": name}


def drift(model: str, row: dict, common: list[str], work: Path, data_dir: str, epochs: list[int]) -> list[dict]:
    """The device's loss against the host build of the same project and FineTuner's after fewer
    epochs (the same scheme, samples and seed), then the full run's."""
    import edgetune as et
    from edgetune.quant import load_any

    scheme = row["scheme_search"]["scheme"]
    task = et.load_task("har-raw", data_dir)
    q = load_any(work / model)
    out = []
    base = [a for a in common]
    for ep in epochs:
        args = [("--max-samples" if a == "--samples" else a) for a in base]
        i = args.index("--epochs")
        args[i + 1] = str(ep)
        j = args.index("--test-samples")
        args[j + 1] = "20"
        d = work / f"drift-{ep}"
        _run(["edgetune", "export", "--model", model, "--method", "sparse", "--scheme", scheme, *args, "--out", str(d),
              "--force"], work)
        _run(["make", "-s", "-C", str(d)], work)
        res = {"final_loss": _final_loss(_run(["make", "-s", "-C", str(d), "run"], work))}
        man = json.loads((d / "export.json").read_text())
        tr = man["train_indices"]
        tuner = et.FineTuner(q, "sparse", scheme=scheme, epochs=ep, seed=man["seed"], batch_size=man["batch_size"],
                             lr=man["lr"], engine="c").fit(task.x_finetune[tr], task.y_finetune[tr])
        host = host_build(model, ["--method", "sparse", "--scheme", scheme, *args], work / f"drift-{ep}-host", work)
        out.append({"epochs": ep, "device": res["final_loss"], "host": float(tuner.history_.final_loss),
                    "host_build": host})
    out.append({"epochs": row["epochs"], "device": row["final_loss"], "host": row["replica_final_loss"],
                "host_build": row["host_final_loss"]})
    return out


def host_lora(model: str, task: list[str], extra: list[str], work: Path, name: str) -> dict:
    j = work / f"{name}.json"
    _run(["edgetune", "finetune", *task, "--model", model, "--method", "lora-all", *extra, "--json", str(j),
          "--quiet"], work, timeout=1800)
    return json.loads(j.read_text())


def main(argv: list[str] | None = None) -> int:
    global DATA
    p = argparse.ArgumentParser(prog="python -m benchmarks.har_raw_256kb", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=500, help="fine-tuning windows linked into the firmware")
    p.add_argument("--test-samples", type=int, default=600, help="test windows linked into the firmware")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work", help="keep the models and projects here (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="2 epochs, 120 + 100 samples")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.test_samples, args.epochs = 120, 100, 2
    DATA = args.data_dir
    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="har256-")
        work = Path(tmp.name)
    task = ["--task", "har-raw", "--data-dir", DATA]
    if not (work / "har-cnn").is_dir():
        _run(["edgetune", "pretrain", *task, "--arch", "cnn", "--out", "har-cnn", "--quiet"], work)
    if not (work / "har-cnn-int8").is_dir():
        _run(["edgetune", "quantize", "--model", "har-cnn", *task, "--out", "har-cnn-int8", "--percentile", "99.9",
              "--quiet"], work)
    def common_at(batch: int) -> list[str]:
        return ["--target", "cortex-m4", "--budget", "256KB", *task, "--samples", str(args.samples),
                "--test-samples", str(args.test_samples), "--epochs", str(args.epochs), "--batch-size", str(batch),
                "--flash", "4MB", "--quiet"]

    common = common_at(args.batch_size)
    auto = ["--method", "sparse", "--scheme", "auto"]
    rows = [device("sparse-auto", "har-cnn-int8", auto, common, work, DATA)]
    if args.batch_size != 1:  # the paper's batch: more of the network fits the same 256 KB
        rows.append(device("sparse-auto-b1", "har-cnn-int8", auto, common_at(1), work, DATA))
    skip = ["--method", "skip2-lora", "--int8"]  # --int8: the int8 skip-cache (the model is int8 already)
    try:
        rows.append(device("skip2-int8", "har-cnn-int8", skip, common, work, DATA))
    except SystemExit as e:
        if "--partial-cache" not in str(e):
            raise
        rows.append(device("skip2-int8", "har-cnn-int8", skip + ["--partial-cache"], common, work, DATA))
    drifts = drift("har-cnn-int8", rows[0], common, work, DATA, [1, 2, 5]) if not args.quick else []
    # (c) float lora-all on this machine: the program's samples (the export's seeded subset) and epochs ...
    import edgetune as et
    import numpy as np

    man = json.loads((work / "sparse-auto" / "export.json").read_text())
    t = et.load_task("har-raw", DATA)
    tr = np.asarray(man["train_indices"])
    np.savez(work / "har-raw-subset.npz", x_pretrain=t.x_pretrain, y_pretrain=t.y_pretrain,
             x_finetune=t.x_finetune[tr], y_finetune=t.y_finetune[tr], x_test=t.x_test, y_test=t.y_test)
    same = host_lora("har-cnn", ["--task", "har-raw-subset.npz"],
                     ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)], work, "lora-same")
    full = host_lora("har-cnn", task, [], work, "lora-full")
    emit("")
    emit(f"har-raw, Cortex-M4 (QEMU mps2-an386), 256 KB RAM; {args.samples} fine-tuning windows, "
         f"{args.test_samples} test windows in flash, {args.epochs} epochs, batch {args.batch_size}, lr 0.01")
    emit("")
    emit("| run | batch | RAM planned | RAM linked | acc before (device test) | acc after (device test) "
         "| acc after (all 2758 test) | training instructions | per sample-epoch | QEMU s |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        emit(f"| {r['label']} | {r['batch']} | {r['planned_ram']} | {r['linked_ram']} | {r['acc_before']:.4f} | "
             f"{r['acc_after']:.4f} | {'-' if r['acc_all_test'] is None else format(r['acc_all_test'], '.4f')} | "
             f"{r['train_instructions']:.3g} | "
             f"{r['instructions_per_sample_epoch']:.3g} | {r['qemu_seconds']:.0f} |")
    for name, r, what in (("lora-all, same samples", same, f"{args.samples} samples (the device's), {args.epochs} "
                           f"epochs, batch {args.batch_size}"),
                          ("lora-all, task defaults", full, "all fine-tuning samples, the task's defaults")):
        emit(f"| {name} (host, float, {what}) | {r['batch_size']} | - | - | {r['accuracy_before']:.4f} (all test) | - | "
             f"{r['accuracy_after']:.4f} | - | - | - |")
    emit("")
    emit("| run | device final loss | the host build of the same project | the same configuration on this "
         "machine (FineTuner) | relative difference to FineTuner |")
    emit("|---|---|---|---|---|")
    for r in rows:
        same = "the same bits" if r["host_final_loss"] == r["final_loss"] else f"{r['host_final_loss']!r}"
        if r["replica_final_loss"] is not None:
            emit(f"| {r['label']} | {r['final_loss']!r} | {same} | {r['replica_final_loss']:.7f} | "
                 f"{abs(r['final_loss'] - r['replica_final_loss']) / r['replica_final_loss']:.1e} |")
        else:
            emit(f"| {r['label']} | {r['final_loss']!r} | {same} | - | - |")
    if drifts:
        emit("")
        emit(f"The device's loss against FineTuner's, {rows[0]['label']}, batch {args.batch_size}, the same 500 samples:")
        emit("")
        emit("| epochs | device final loss | the host build of the same project | FineTuner (this machine) "
             "| relative difference to FineTuner |")
        emit("|---|---|---|---|---|")
        for d in drifts:
            same = "the same bits" if d["host_build"] == d["device"] else f"{d['host_build']!r}"
            emit(f"| {d['epochs']} | {d['device']!r} | {same} | {d['host']:.7f} | "
                 f"{abs(d['device'] - d['host']) / d['host']:.1e} |")
    finish({"drift": drifts, "device": rows, "host_same_samples": same, "host_task_defaults": full,
            "settings": vars(args)}, args.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


DATA = ""

if __name__ == "__main__":
    sys.exit(main())
