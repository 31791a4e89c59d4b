"""Does every build of an exported project compute the same bits, and what does that cost?

The same project (samples, shuffles, seed) is exported for the host and the emulated targets
and built three ways:

    new     as exported: -ffp-contract=off and the engine's own exp/log/log1p/tanh
    fma     the same sources with -ffp-contract=fast (the compiler may fuse a * b + c)
    libm    et_kernels.c/.h of REV (default 166d5cb: the C library's expf/logf/log1pf/tanhf),
            the rest of the engine as exported, -ffp-contract=off
    before  the same with -ffp-contract=fast: the flags and functions of REV

Agreement: each program prints every epoch's loss with its 64 bits; the table gives the first
epoch whose loss differs from the host build's (of the same variant) and the final losses'
relative difference. Cost: the host program's seconds per epoch (median of 3, the variants
interleaved), its instructions for the whole program (valgrind's callgrind, when installed) and
the Cortex-M4's instructions for the training (QEMU -icount shift=0, SysTick at 25 MHz: 40
instructions per tick).

    python -m benchmarks.device_agreement --data-dir ../shared/data [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from edgetune.cli import main as cli

from ._util import REPO, emit, finish

ARCH = "conv:8:9:4:4,relu,maxpool:2,conv:16:5:2:2,relu,maxpool:2,flatten,dense:32,relu"
TARGETS = ("host", "cortex-m4", "cortex-m7", "aarch64-linux", "riscv32f", "riscv32")
#: (name, model, export options, targets): the int8 CNN with the sparse update (int8 roundings of
#: trained weights every step: where a difference grows) on every target, and a float CNN with
#: lora-all (products dominate) on the host and the M4 for the cost
PROJECTS = (("int8 CNN, sparse, 60 samples, 30 epochs", "int8", ["--method", "sparse", "--epochs", "30",
                                                                  "--max-samples", "60"], TARGETS),
            ("float CNN, lora-all, 120 samples, 10 epochs, batch 4", "float",
             ["--method", "lora-all", "--epochs", "10", "--max-samples", "120", "--batch-size", "4"],
             ("host", "cortex-m4")))


def sh(args: list[str], timeout: float = 900) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def losses(text: str) -> list[float]:
    from edgetune.export.project import epoch_losses

    return [loss for _, loss in epoch_losses(text)]


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def variant_dir(base: Path, variant: str, rev: str) -> Path | None:
    """A copy of an exported project built as `variant`; None if REV's sources cannot be read."""
    out = base.parent / f"{base.name}-{variant}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    if variant in ("libm", "before"):
        for name in ("et_kernels.c", "et_kernels.h"):
            res = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:edgetune/core/{name}"], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                return None
            (out / name).write_text(res.stdout)
    return out


def flags(variant: str) -> list[str]:
    return ["EXTRA_CFLAGS=-ffp-contract=fast"] if variant in ("fma", "before") else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_agreement", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--rev", default="166d5cb", help="the revision whose et_kernels.c/.h and flags are 'before'")
    p.add_argument("--repeats", type=int, default=3, help="host runs per variant (timing)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    emulator = {"cortex-m4": "qemu-system-arm", "cortex-m7": "qemu-system-arm", "aarch64-linux": "qemu-aarch64",
                "riscv32f": "qemu-system-riscv32", "riscv32": "qemu-system-riscv32"}
    targets = [t for t in TARGETS if t == "host" or shutil.which(emulator[t])]
    variants = ("new", "fma", "libm", "before")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="agree-") as tmp:
        work = Path(tmp)
        task = ["--task", "damage1-1d", "--data-dir", args.data_dir, "--quiet"]
        assert cli(["pretrain", *task, "--arch", ARCH, "--epochs", "5", "--out", str(work / "float")]) == 0
        assert cli(["quantize", "--model", str(work / "float"), *task, "--out", str(work / "int8")]) == 0
        for title, model, options, wanted in PROJECTS:
            curves: dict[tuple[str, str], list[float]] = {}
            cost: dict[tuple[str, str], float] = {}
            for target in [t for t in targets if t in wanted]:
                base = work / f"{model}-{target}"
                assert cli(["export", "--model", str(work / model), "--target", target, "--out", str(base),
                            *task, "--test-samples", "10", "--flash", "4MB", *options]) == 0
                for variant in variants:
                    d = variant_dir(base, variant, args.rev)
                    if d is None:
                        continue
                    sh(["make", "-s", "-C", str(d), *flags(variant)])
                    goal = "icount" if target == "cortex-m4" else "run"
                    text = sh(["make", "-s", "-C", str(d), *flags(variant), goal])
                    curves[target, variant] = losses(text)
                    if target == "cortex-m4":
                        cost[target, variant] = last_json(text)["train_ticks"] * 40.0
            # the host's seconds per epoch, the variants interleaved
            times: dict[str, list[float]] = {v: [] for v in variants if ("host", v) in curves}
            for _ in range(args.repeats):
                for v in times:
                    res = last_json(sh([str(work / f"{model}-host-{v}" / "train"), "--quiet"]))
                    times[v].append(res["train_seconds"] / res["epochs"])
            for v, ts in times.items():
                cost["host", v] = statistics.median(ts)
                if shutil.which("valgrind"):  # instructions: free of the timing noise of a shared machine
                    text = sh(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                               str(work / f"{model}-host-{v}" / "train"), "--quiet"])
                    cost["host-ir", v] = float(re.search(r"Collected : (\d+)", text).group(1))
            emit("")
            emit(f"{title} (damage1-1d preset CNN; the loss after every epoch against the host build's):")
            emit("")
            emit("| target | variant | epochs | first epoch that differs from the host's | final loss | relative |")
            emit("|---|---|---|---|---|---|")
            for (target, variant), c in curves.items():
                ref = curves.get(("host", variant), [])
                first = next((i + 1 for i, (a, b) in enumerate(zip(c, ref)) if a != b), None)
                rel = (c[-1] - ref[-1]) / ref[-1] if c and ref else float("nan")
                emit(f"| {target} | {variant} | {len(c)} | {first if first else 'none (bit-identical)'} | "
                     f"{c[-1]:.10f} | {rel:+.1e} |")
                results.append({"project": title, "target": target, "variant": variant, "losses": c,
                                "first_difference": first, "cost": cost.get((target, variant))})
            emit("")
            emit("| cost | " + " | ".join(variants) + " | new / fma | new / before |")
            emit("|---|" + "---|" * (len(variants) + 2))
            for target, unit, fmt in (("host", "s per epoch (median)", ".4g"),
                                      ("host-ir", "instructions, whole program (callgrind)", ".4g"),
                                      ("cortex-m4", "M4 instructions, training", ".4g")):
                row = {v: cost.get((target, v)) for v in variants}
                if row["new"] is None:
                    continue
                ratio = [f"{row['new'] / row[v]:.3f}" if row.get(v) else "-" for v in ("fma", "before")]
                emit(f"| {target}: {unit} | " + " | ".join(format(row[v], fmt) if row[v] else "-" for v in variants)
                     + f" | {ratio[0]} | {ratio[1]} |")
    finish({"results": results, "settings": vars(args)}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
