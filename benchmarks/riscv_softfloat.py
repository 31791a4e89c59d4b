"""What a missing FPU costs: instructions per skip2-lora epoch on RISC-V without an FPU
(riscv32, RV32IMAC: float math in libgcc's soft-float routines), with one (riscv32f,
RV32IMAFC) and on a Cortex-M4F, from the same export (damage1, 120 fine-tune and 200 test
samples, batch 20, 1 MB RAM budget, 2 MB flash; float32 and int8 backbones).

Every program runs under QEMU with -icount shift=0 (one instruction per emulated
nanosecond): the M4's SysTick (25 MHz) counts 40 instructions per tick, the RISC-V machine
timer (10 MHz) 100. These are instructions, not cycles: a real part's cycles per
instruction (and flash wait states) are not modelled, so the ratio between two builds on
the same core is what this measures.

    python -m benchmarks.riscv_softfloat --data-dir ../shared/data [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import edgetune as et
from edgetune.cli import main as cli

TRAIN, TEST, EPOCHS = 120, 200, 4
TARGETS = {"cortex-m4": (40, "arm-none-eabi-size"), "riscv32": (100, "riscv64-unknown-elf-size"),
           "riscv32f": (100, "riscv64-unknown-elf-size")}


def sh(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=900).stdout


def run(model: Path, out: Path, target: str, data_dir: str, int8: bool) -> dict:
    code = cli(["export", "--model", str(model), "--method", "skip2-lora", "--target", target, "--out", str(out),
                "--task", "damage1", "--data-dir", data_dir, "--max-samples", str(TRAIN), "--test-samples", str(TEST),
                "--epochs", str(EPOCHS), "--budget", "1MB", "--flash", "2MB", "--quiet", "--force",
                *(["--int8"] if int8 else [])])
    if code:
        raise RuntimeError(f"export failed: {target}")
    sh(["make", "-s", "--no-print-directory", "-C", str(out)])
    res = json.loads([ln for ln in sh(["make", "-s", "--no-print-directory", "-C", str(out), "icount"]).splitlines()
                      if ln.startswith("{")][-1])
    per_tick, size_tool = TARGETS[target]
    text = sh([size_tool, "-A", "-d", str(out / "train.elf")])
    s = {p[0]: int(p[1]) for p in (ln.split() for ln in text.splitlines()) if len(p) >= 2 and p[1].isdigit()}
    return {"target": target, "backbone": "int8" if int8 else "float32",
            "first_epoch": res["first_epoch_ticks"] * per_tick, "later_epoch": res["later_epoch_ticks"] * per_tick,
            "text_bytes": s.get(".text", 0), "final_loss": res["final_loss"], "accuracy_after": res["accuracy_after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--json", help="also write the rows as JSON")
    args = ap.parse_args()
    t0 = time.perf_counter()
    task = et.load_task("damage1", args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, _ = et.pretrain(task.x_pretrain, task.y_pretrain, hidden=[96, 96], labels=task.labels, epochs=100)
        model.save(work / "model")
        for int8 in (False, True):
            for target in TARGETS:
                rows.append(run(work / "model", work / f"{target}-{int8}", target, args.data_dir, int8))
    tools = {t: sh([c, "--version"]).splitlines()[0] for t, c in (("gcc-riscv", "riscv64-unknown-elf-gcc"),
                                                                   ("gcc-arm", "arm-none-eabi-gcc"),
                                                                   ("qemu", "qemu-system-riscv32"))}
    print(f"skip2-lora on damage1 512-96-96-2, {TRAIN} samples cached, batch 20; instructions under QEMU -icount")
    print(f"{'backbone':8s} {'target':10s} {'first epoch':>12s} {'later epoch':>12s} {'later vs M4':>11s} "
          f"{'.text':>9s} {'final loss':>11s} {'acc':>6s}")
    for r in rows:
        m4 = next(x for x in rows if x["target"] == "cortex-m4" and x["backbone"] == r["backbone"])
        r["later_vs_cortex_m4"] = r["later_epoch"] / m4["later_epoch"]
        print(f"{r['backbone']:8s} {r['target']:10s} {r['first_epoch'] / 1e6:10.2f} M {r['later_epoch'] / 1e6:10.2f} M "
              f"{r['later_vs_cortex_m4']:10.2f}x {r['text_bytes']:9d} {r['final_loss']:11.6f} {r['accuracy_after']:6.3f}")
    print(f"{time.perf_counter() - t0:.0f} s; {platform.machine()}, " + "; ".join(tools.values()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tools": tools}, indent=2) + "\n")


if __name__ == "__main__":
    main()
