"""The OS-ELM detector on a Cortex-M4 under QEMU: state size, instructions per update, and
the device's reconstruction errors against the NumPy reference.

Builds a bare-metal program from the engine's own et_oselm.c / et_kernels.c and the export's
startup code and linker script (edgetune/export/templates), for the 512-bin autoencoder with
64 hidden units and the random input weights regenerated from the seed per sample (nothing
but P, beta and scratch in RAM). The state lives in one static buffer whose size the device's
et_oselm_state_size() states; the link fails if it does not fit the board's 256 KB.
QEMU with -icount shift=0 advances its virtual clock 1 ns per instruction and the board's
SysTick counts at 25 MHz of that clock, so 1 tick = 40 instructions (QEMU does not model a Cortex-M4's cycle timing: on a
real M4 most of these instructions take 1 cycle, loads/stores and divides more).

    python -m benchmarks.oselm_device            # needs gcc-arm-none-eabi, qemu-system-arm
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


def build_and_run(work: Path) -> dict:
    core, tpl = REPO / "edgetune" / "core", REPO / "edgetune" / "export" / "templates"
    for name in ("et_oselm.c", "et_oselm.h", "et_kernels.c", "et_kernels.h", "et_core.h"):
        shutil.copy(core / name, work / name)
    shutil.copy(tpl / "mcu_startup.c.in", work / "startup.c")
    shutil.copy(tpl / "et_mcu.h.in", work / "et_mcu.h")
    ld = (tpl / "mcu.ld").read_text()
    for k, v in {"@FLASH@": "1024K", "@RAM@": "256K", "@STACK@": "4096", "@TARGET@": "cortex-m4"}.items():
        ld = ld.replace(k, v)
    (work / "link.ld").write_text(ld)
    (work / "main.c").write_text(MAIN)
    cpu = "-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16".split()
    defs = [f"-DN_IN={N_IN}", f"-DHIDDEN={HIDDEN}", f"-DSEED={SEED}u", f"-DN_SAMPLES={N_SAMPLES}",
            f"-DSTATE_BYTES_MAX={STATE_BYTES_MAX}"]
    cmd = ["arm-none-eabi-gcc", *cpu, "-std=c99", "-O2", "-ffp-contract=fast", "-fno-wrapv", "-Wall", "-Wextra",
           *defs, "-o", "oselm.elf", "startup.c", "main.c", "et_oselm.c", "et_kernels.c", "-T", "link.ld",
           "-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-lm"]
    subprocess.run(cmd, cwd=work, check=True)
    run = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
                          "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
                          "-kernel", "oselm.elf"], cwd=work, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"the device program failed: {run.stdout}{run.stderr}")
    text = (run.stdout + run.stderr).strip()   # semihosting output arrives on QEMU's stderr
    return json.loads(text.splitlines()[-1])


def reference_errors() -> np.ndarray:
    from edgetune.stream.oselm import OSELM, random_uniform

    m = OSELM(N_IN, N_IN, HIDDEN, seed=SEED)
    out = []
    for r in range(N_SAMPLES):
        x = random_uniform(99, r * N_IN, N_IN).astype(np.float64)
        out.append(np.mean((m.predict(x)[0] - x) ** 2))
        m.learn_one(x, x)
    return np.array(out)


def main() -> int:
    for tool in ("arm-none-eabi-gcc", "qemu-system-arm"):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks.oselm_device needs {tool} (see scripts/system-packages)")
    with tempfile.TemporaryDirectory() as d:
        res = build_and_run(Path(d))
    per_tick = 1e9 / 25e6                       # instructions per SysTick tick under -icount shift=0
    upd, score = res["ticks_per_update"] * per_tick, res["ticks_per_score"] * per_tick
    dev = np.array(res["errors_1e6"]) / 1e6
    ref = reference_errors()
    rel = float(np.max(np.abs(dev - ref) / ref))   # the device prints errors rounded to 1e-6
    macs = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * N_IN + HIDDEN * N_IN   # + the regenerated hidden layer
    emit(f"OS-ELM autoencoder, {N_IN} inputs, {HIDDEN} hidden units, weights regenerated from the seed, "
         f"on a Cortex-M4 (QEMU mps2-an386, -icount shift=0):")
    emit(f"- state: {res['state_bytes']:,} bytes (et_oselm_state_size on the device); static RAM of the program "
         f"{res['static_ram']:,} bytes, stack used {res['stack_used']:,} bytes")
    emit(f"- instructions per update (its hidden layer + the RLS step): {upd:,.0f}; per score (hidden layer + "
         f"output): {score:,.0f}; the update's arithmetic incl. its hidden layer: {macs:,} multiply-adds "
         f"({upd / macs:.1f} instructions each)")
    emit(f"- reconstruction errors of {N_SAMPLES} samples, test-then-train, against NumPy float64: "
         f"max relative difference {rel:.2e}")
    return 0 if rel < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
