"""The OS-ELM detector on microcontrollers under QEMU (a Cortex-M4, and RISC-V RV32IMAC without
and RV32IMAFC with an FPU): state size, instructions per update, and the device's
reconstruction errors against the NumPy reference.

Builds a bare-metal program from the engine's own et_oselm.c / et_kernels.c and the export's
startup code and linker script (edgetune/export/templates), for the 512-bin autoencoder with
64 hidden units and the random input weights regenerated from the seed per sample (nothing
but P, beta and scratch in RAM). The state lives in one static buffer whose size the device's
et_oselm_state_size() states; the link fails if it does not fit the board's 256 KB.
QEMU with -icount shift=0 advances its virtual clock 1 ns per instruction and the board's
SysTick counts at 25 MHz of that clock, so 1 tick = 40 instructions (the RISC-V virt board's
timer: 10 MHz, 100 instructions); QEMU does not model a core's cycle timing: on a real M4 most
of these instructions take 1 cycle, loads/stores and divides more.

    python -m benchmarks.oselm_device                          # the Cortex-M4
    python -m benchmarks.oselm_device --inputs 64 --hidden 128 # the default detector: 64 bands
    python -m benchmarks.oselm_device --targets cortex-m4,riscv32,riscv32f
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ._util import REPO, emit

N_IN, HIDDEN, SEED = 512, 64, 7
N_SAMPLES = 24          # learned one by one, test-then-train
STATE_BYTES_MAX = 160 * 1024

MAIN = r"""
#include <stdio.h>
#include <string.h>
#include "et_oselm.h"
#include "et_mcu.h"

static float state[STATE_BYTES_MAX / 4];
static float x[N_IN], y[N_IN];

static void say(const char *s) { et_mcu_write(s); }

int main(void) {
    et_oselm_config cfg = {N_IN, HIDDEN, N_IN, SEED, 0, 64, 0, 1.0f, 1.0f};
    size_t need = et_oselm_state_size(&cfg);
    char line[160];
    if (need == 0 || need > sizeof state || et_oselm_init(state, sizeof state, &cfg) != 0) {
        say("{\"error\": \"state does not fit\"}\n");
        return 1;
    }
    uint64_t t_score = 0, t_update = 0;
    say("{\"errors_1e6\": [");
    for (int r = 0; r < N_SAMPLES; r++) {
        for (int i = 0; i < N_IN; i++) x[i] = et_oselm_uniform(99u, (uint32_t)(r * N_IN + i));
        uint64_t t0 = et_mcu_ticks();
        et_oselm_predict(state, x, y);
        float e = 0.0f;
        for (int i = 0; i < N_IN; i++) e += (y[i] - x[i]) * (y[i] - x[i]);
        e /= (float)N_IN;
        uint64_t t1 = et_mcu_ticks();
        int rc = et_oselm_update(state, x, x);
        uint64_t t2 = et_mcu_ticks();
        if (r >= 4) { t_score += t1 - t0; t_update += t2 - t1; }
        snprintf(line, sizeof line, "%s%ld", r ? ", " : "", (long)(e * 1e6f + 0.5f));
        say(line);
        if (rc != 0) { say("]}\n"); return 1; }
    }
    snprintf(line, sizeof line, "], \"state_bytes\": %lu, \"static_ram\": %lu, \"stack_used\": %lu, "
             "\"ticks_per_score\": %lu, \"ticks_per_update\": %lu, \"checksum\": %lu}\n",
             (unsigned long)need, (unsigned long)et_mcu_static_ram(), (unsigned long)et_mcu_stack_used(),
             (unsigned long)(t_score / (N_SAMPLES - 4)), (unsigned long)(t_update / (N_SAMPLES - 4)),
             (unsigned long)et_oselm_checksum(state));
    say(line);
    return 0;
}
"""


def build_and_run(work: Path, target) -> dict:
    """Build the program for ``target`` (an export target of kind "mcu") and run it under QEMU."""
    core, tpl = REPO / "edgetune" / "core", REPO / "edgetune" / "export" / "templates"
    for name in ("et_oselm.c", "et_oselm.h", "et_kernels.c", "et_kernels.h", "et_core.h"):
        shutil.copy(core / name, work / name)
    shutil.copy(tpl / f"{target.startup_template}.in", work / "startup.c")
    shutil.copy(tpl / f"{target.header_template}.in", work / "et_mcu.h")
    ld = (tpl / target.linker_template).read_text()
    for k, v in {"@FLASH@": "1024K", "@RAM@": "256K", "@STACK@": "4096", "@TARGET@": target.name}.items():
        ld = ld.replace(k, v)
    (work / "link.ld").write_text(ld)
    (work / "main.c").write_text(MAIN)
    defs = [f"-DN_IN={N_IN}", f"-DHIDDEN={HIDDEN}", f"-DSEED={SEED}u", f"-DN_SAMPLES={N_SAMPLES}",
            f"-DSTATE_BYTES_MAX={STATE_BYTES_MAX}"]
    libc = (["--specs=picolibc.specs"] if target.libc == "picolibc" else ["--specs=nano.specs", "--specs=nosys.specs"])
    cmd = [target.compiler(), *target.cpu_flags.split(), "-std=c99", "-O2", "-ffp-contract=off", "-fno-wrapv",
           "-Wall", "-Wextra", "-ffunction-sections", "-fdata-sections", *defs, "-o", "oselm.elf", "startup.c",
           "main.c", "et_oselm.c", "et_kernels.c", "-T", "link.ld", "-nostartfiles", "-Wl,--gc-sections", *libc, "-lm"]
    subprocess.run(cmd, cwd=work, check=True)
    bios = ["-bios", "none"] if target.libc == "picolibc" else []
    run = subprocess.run([target.qemu, "-M", target.machine, *bios, "-nographic", "-monitor", "none", "-serial",
                          "none", "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
                          "-kernel", "oselm.elf"], cwd=work, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:
        raise SystemExit(f"the device program failed on {target.name}: {run.stdout}{run.stderr}")
    text = (run.stdout + run.stderr).strip()   # semihosting output arrives on QEMU's stderr
    return json.loads(text.splitlines()[-1])


#: Instructions per timer tick under -icount shift=0 (1 ns per instruction): SysTick at 25 MHz
#: on the mps2 boards, the CLINT timer at 10 MHz on RISC-V virt.
TICK_HZ = {"newlib": 25e6, "picolibc": 10e6}


def reference_errors() -> np.ndarray:
    from edgetune.stream.oselm import OSELM, random_uniform

    m = OSELM(N_IN, N_IN, HIDDEN, seed=SEED)
    out = []
    for r in range(N_SAMPLES):
        x = random_uniform(99, r * N_IN, N_IN).astype(np.float64)
        out.append(np.mean((m.predict(x)[0] - x) ** 2))
        m.learn_one(x, x)
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    global N_IN, HIDDEN
    import argparse

    from edgetune.export.targets import get_target

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="cortex-m4", help="microcontroller targets, comma-separated "
                                                          "(cortex-m4, cortex-m7, riscv32, riscv32f)")
    p.add_argument("--inputs", type=int, default=N_IN, help=f"autoencoder inputs (default {N_IN}: 512 bins; "
                                                                 "the default detector reads 64 bands)")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden units (default {HIDDEN})")
    args = p.parse_args(argv)
    N_IN, HIDDEN = args.inputs, args.hidden
    targets = [get_target(t.strip()) for t in args.targets.split(",") if t.strip()]
    ref = reference_errors()
    macs = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * N_IN + HIDDEN * N_IN   # + the regenerated hidden layer
    worst = 0.0
    for target in targets:
        if target.kind != "mcu":
            sys.exit(f"{target.name} is not a microcontroller target")
        missing = target.missing_tools(run=True)
        if missing:
            sys.exit(f"benchmarks.oselm_device needs {' and '.join(missing)} (see scripts/system-packages)")
        with tempfile.TemporaryDirectory() as d:
            res = build_and_run(Path(d), target)
        per_tick = 1e9 / TICK_HZ[target.libc]
        upd, score = res["ticks_per_update"] * per_tick, res["ticks_per_score"] * per_tick
        dev = np.array(res["errors_1e6"]) / 1e6
        rel = float(np.max(np.abs(dev - ref) / ref))   # the device prints errors rounded to 1e-6
        worst = max(worst, rel)
        emit(f"OS-ELM autoencoder, {N_IN} inputs, {HIDDEN} hidden units, weights regenerated from the seed, "
             f"on {target.name} (QEMU {target.machine}, -icount shift=0):")
        emit(f"- state: {res['state_bytes']:,} bytes (et_oselm_state_size on the device); static RAM of the program "
             f"{res['static_ram']:,} bytes, stack used {res['stack_used']:,} bytes")
        emit(f"- instructions per update (its hidden layer + the RLS step): {upd:,.0f}; per score (hidden layer + "
             f"output): {score:,.0f}; the update's arithmetic incl. its hidden layer: {macs:,} multiply-adds "
             f"({upd / macs:.1f} instructions each)")
        emit(f"- reconstruction errors of {N_SAMPLES} samples, test-then-train, against NumPy float64: "
             f"max relative difference {rel:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
