"""Figures of docs/export.md: flash, RAM and instructions per epoch of exported projects, and
what fits a microcontroller's RAM at 64 KB / 256 KB / 1 MB with its accuracy on damage1
(flash set to 2 MB where the float backbone and the linked-in samples need it).

Everything is built and run here: host (instructions counted by valgrind's callgrind),
cortex-m4 and cortex-m7 under qemu-system-arm with -icount shift=0 (one instruction per
emulated nanosecond; SysTick at 25 MHz gives 40 instructions per tick).

    python -m benchmarks.export_figures --data-dir ../shared/data [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgetune as et
from edgetune.cli import main as cli

TRAIN, TEST = 120, 200
INSTR_PER_TICK = 40  # qemu -icount shift=0: 1 ns per instruction; mps2 SysTick at 25 MHz


def sh(args, **kw) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=900, **kw).stdout


def export(model: Path, out: Path, target: str, method: str, epochs: int, *extra: str) -> dict:
    code = cli(["export", "--model", str(model), "--method", method, "--target", target, "--out", str(out),
                "--task", "damage1", "--data-dir", ARGS.data_dir, "--max-samples", str(TRAIN), "--test-samples",
                str(TEST), "--epochs", str(epochs), "--quiet", "--force", *extra])
    if code:
        raise RuntimeError(f"export failed: {target} {method} {extra}")
    return json.loads((out / "export.json").read_text())


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def sizes(elf: Path, tool: str) -> dict[str, int]:
    out = sh([tool, "-A", "-d", str(elf)])
    s = {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines()) if len(p) >= 2 and p[1].isdigit()}
    flash = sum(v for k, v in s.items() if k in (".text", ".rodata", ".ARM.exidx", ".data", ".eh_frame"))
    ram = s.get(".data", 0) + s.get(".bss", 0) + s.get(".stack", 0)
    return {"flash": flash, "ram": ram}


def host_instructions(out: Path) -> dict[str, float]:
    """Instructions in et_device_train_epoch for 1 and for 4 epochs: the first epoch and a later one."""
    counts = []
    for epochs in (1, 4):
        with tempfile.TemporaryDirectory() as tmp:
            sh(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg", "--toggle-collect=et_device_train_epoch",
                str(out / "train"), "--epochs", str(epochs), "--quiet"])
            text = Path(tmp, "cg").read_text()
            counts.append(int(re.search(r"^summary:\s+(\d+)", text, re.M).group(1)))
    return {"first_epoch": counts[0], "later_epoch": (counts[1] - counts[0]) / 3}


def mcu_run(out: Path) -> dict:
    sh(["make", "-s", "--no-print-directory", "-C", str(out)])
    res = last_json(sh(["make", "-s", "--no-print-directory", "-C", str(out), "icount"]))
    res["first_epoch_instructions"] = res["first_epoch_ticks"] * INSTR_PER_TICK
    res["later_epoch_instructions"] = res["later_epoch_ticks"] * INSTR_PER_TICK
    res.update(sizes(out / "train.elf", "arm-none-eabi-size"))
    return res


def per_target(model: Path, work: Path) -> list[dict]:
    rows = []
    configs = [("host", "skip2-lora", ()), ("host", "lora-all", ()),
               ("cortex-m4", "skip2-lora", ("--budget", "1MB", "--flash", "2MB")),
               ("cortex-m4", "lora-all", ("--budget", "1MB", "--flash", "2MB")),
               ("cortex-m4", "skip2-lora", ("--int8", "--budget", "256KB", "--partial-cache")),
               ("cortex-m7", "skip2-lora", ("--budget", "1MB")), ("cortex-m7", "lora-all", ("--budget", "1MB")),
               ("cortex-m7", "skip2-lora", ("--int8", "--budget", "256KB", "--partial-cache"))]
    for target, method, extra in configs:
        out = work / f"{target}-{method}-{len(rows)}"
        man = export(model, out, target, method, 5, *extra)
        row = {"target": target, "method": method, "backbone": man["backbone"], "cache": man["cache"],
               "cache_capacity": man["cache_capacity"], "plan_ram": man["memory"]["total"]}
        if target == "host":
            sh(["make", "-s", "--no-print-directory", "-C", str(out)])
            res = last_json(sh([str(out / "train"), "--quiet"]))
            row.update(sizes(out / "train", "size"))
            if shutil.which("valgrind"):
                ins = host_instructions(out)
                row["first_epoch_instructions"], row["later_epoch_instructions"] = ins["first_epoch"], ins["later_epoch"]
        else:
            res = mcu_run(out)
            row.update({k: res[k] for k in ("flash", "ram", "first_epoch_instructions", "later_epoch_instructions",
                                            "stack_used_bytes")})
        row.update({"accuracy_after": res["accuracy_after"], "final_loss": res["final_loss"]})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def per_budget(model: Path, work: Path, epochs: int) -> list[dict]:
    """On the Cortex-M4: per budget, the first of these that fits (largest batch first), run."""
    rows = []
    candidates = [("skip2-lora", ("--int8",)), ("skip2-lora", ()), ("lora-all", ())]
    for budget in ("64KB", "256KB", "1MB"):
        for method, extra in candidates:
            for batch in (20, 8, 4, 1):
                out = work / f"b{budget}-{method}-{'int8' if extra else 'f32'}-{batch}"
                code = cli(["export", "--model", str(model), "--method", method, "--target", "cortex-m4", "--out",
                            str(out), "--task", "damage1", "--data-dir", ARGS.data_dir, "--max-samples", str(TRAIN),
                            "--test-samples", str(TEST), "--epochs", str(epochs), "--budget", budget,
                            "--batch-size", str(batch), "--flash", "2MB", "--quiet", "--force", *extra,
                            *(("--partial-cache",) if method == "skip2-lora" else ())])
                if code == 0:
                    break
            if code != 0:
                rows.append({"budget": budget, "method": method, "backbone": "int8" if extra else "float32",
                             "fits": False})
                continue
            man = json.loads((out / "export.json").read_text())
            res = mcu_run(out)
            rows.append({"budget": budget, "method": method, "backbone": man["backbone"], "fits": True,
                         "batch": batch, "cache": man["cache"], "cache_capacity": man["cache_capacity"],
                         "plan_ram": man["memory"]["total"], "ram": res["ram"], "flash": res["flash"],
                         "accuracy_before": res["accuracy_before"], "accuracy_after": res["accuracy_after"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the budget table's runs")
    p.add_argument("--json", help="also write the results here")
    ARGS = p.parse_args()
    t0 = time.time()
    task = et.load_task("damage1", ARGS.data_dir)
    with tempfile.TemporaryDirectory(prefix="edgetune-export-figures-") as tmp:
        work = Path(tmp)
        model, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=[96, 96], labels=task.labels, epochs=100)
        model_dir = model.save(work / "model")
        targets = per_target(model_dir, work)
        budgets = per_budget(model_dir, work, ARGS.epochs)
    print("| target | method | backbone, cache | flash | RAM (plan) | instructions, first epoch | later epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in targets:
        cache = f"{r['backbone']}, {r['cache']} cache {r['cache_capacity']}/{TRAIN}" if r["cache"] else r["backbone"]
        ins = (f"{r['first_epoch_instructions'] / 1e6:.1f} M | {r['later_epoch_instructions'] / 1e6:.2f} M"
               if "later_epoch_instructions" in r else "n/a | n/a")
        print(f"| {r['target']} | {r['method']} | {cache} | {r['flash'] / 1024:.1f} KB | {r['ram'] / 1024:.1f} KB "
              f"({r['plan_ram'] / 1024:.1f} KB) | {ins} |")
    print()
    print(f"| RAM budget | method | backbone | fits | batch | skip-cache rows | RAM linked (plan) | test accuracy "
          f"({ARGS.epochs} epochs) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in budgets:
        if not r["fits"]:
            print(f"| {r['budget']} | {r['method']} | {r['backbone']} | no | | | | |")
            continue
        cache = f"{r['cache']} {r['cache_capacity']}/{TRAIN}" if r["cache"] else "-"
        print(f"| {r['budget']} | {r['method']} | {r['backbone']} | yes | {r['batch']} | {cache} | "
              f"{r['ram'] / 1024:.1f} KB ({r['plan_ram'] / 1024:.1f} KB) | {r['accuracy_before']:.3f} -> "
              f"{r['accuracy_after']:.3f} |")
    print(f"\n{TRAIN} fine-tune and {TEST} test samples of damage1 (seeded subsets), {time.time() - t0:.0f} s")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps({"targets": targets, "budgets": budgets}, indent=2) + "\n")


if __name__ == "__main__":
    main()
