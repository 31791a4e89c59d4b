"""An adapter bank as a C project: the frozen backbone, every domain's adapter and the
domain detector, routed and applied per sample in C (docs/bank.md).

The program computes each sample's skip-cache row with the compiled engine's own forward
pass (``et_skip_rows``), scores the domains with the detector's statistics, applies the
routed domain's adapter (``et_skip_apply``) and prints the routed domain, the novelty flag
and the logits per sample. ``check_bank_export`` runs it and compares every sample with
``AdapterBank.route``, ``is_novel`` and ``decision_function``.

    from edgetune.export.bank import BankExportOptions, export_bank, run_bank_export, check_bank_export
    manifest = export_bank(bank, BankExportOptions(target="host", out="dev-bank"), x)
    report = check_bank_export(bank, x, run_bank_export("dev-bank"))
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BudgetError, EdgetuneError, UsageError
from ..units import format_bytes, format_exact
from .project import TEMPLATES, _c_array, _c_double, _c_struct, _template
from .targets import Target, get_target

SAMPLES_MAGIC = b"ETBANK01"
#: The longest routing window the exported program keeps (its scores ring buffer).
MAX_WINDOW = 256
#: Code of the program besides the data (the engine and the routing; measured about 20 KB).
CODE_ESTIMATE = 48 * 1024
#: Logits agree within this between the program and AdapterBank.decision_function.
TOLERANCE = {"host": 1e-5}
OTHER_TOLERANCE = 1e-4


class BankExportError(EdgetuneError):
    """The exported program failed, or disagrees with the bank in Python."""


@dataclass
class BankExportOptions:
    target: str
    out: str
    window: int | None = None       # the program's default routing window (None: the bank's)
    force: bool = False
    toolchain_check: bool = True


# ----------------------------------------------------------------------------- what is exported
def check_exportable(bank: Any) -> None:
    """Refuse, with the reason, a bank the exported program does not run."""
    if bank.detector == "energy":
        raise UsageError("edgetune bank export writes the distance detectors (mahalanobis, diag, centroid, "
                         "relative); this bank routes by energy")
    if bank.backbone.is_int8:
        raise UsageError("edgetune bank export writes float32 backbones; this bank's backbone is int8")
    if not bank.domains_:
        raise UsageError("the bank has no domain: nothing to export")


def _upper_factor(precision: np.ndarray) -> np.ndarray:
    """U with U^T U = precision (the transposed Cholesky factor), upper triangular."""
    try:
        return np.linalg.cholesky(precision).T
    except np.linalg.LinAlgError:
        raise UsageError("the detector's precision matrix is not positive definite; it cannot be exported") from None


def _packed(u: np.ndarray) -> np.ndarray:
    """An upper-triangular matrix packed by rows (row i: columns i..n-1)."""
    return np.concatenate([u[i, i:] for i in range(u.shape[0])])


def detector_tables(bank: Any) -> dict[str, Any]:
    """The detector as the device stores it: the linear routing map the bank itself uses
    (``AdapterBank._linear``: w_m = P mu_m, c_m), and for novelty a factor U of the metric
    (U^T U = P) with v_m = U mu_m, the thresholds, and the feature columns of a row."""
    w, c, owner = bank._linear()
    means, _, _ = bank._component_table()
    width = sum(bank.backbone.tap_widths) + bank.backbone.sizes[-1]
    cols = bank._features(np.arange(width, dtype=np.float64)[None, :])[0].astype(np.int64)
    if cols.size == 0 or not np.array_equal(cols, np.arange(cols[0], cols[0] + cols.size)):
        raise UsageError("the bank's detector features are not one run of columns of the skip-cache row")
    metric = bank._metric()
    if metric is None:
        kind, factor, v = 0, np.zeros(1), means
    elif metric.ndim == 1:
        s = np.sqrt(metric)
        kind, factor, v = 1, s, means * s
    else:
        u = _upper_factor(metric)
        kind, factor, v = 2, _packed(u), means @ u.T
    out = {"comp_w": w, "comp_c": c, "comp_owner": owner.astype(np.int32), "metric": kind,
           "factor": np.asarray(factor, np.float32), "comp_v": np.asarray(v, np.float32),
           "thresholds": np.array([e.threshold for e in bank.domains_.values()], np.float64),
           "feat_start": int(cols[0]), "n_features": int(cols.size), "relative": int(bank.detector == "relative"),
           "gfactor": np.zeros(1, np.float32), "gv": np.zeros(1, np.float32)}
    if bank.detector == "relative":
        _, _, gmean = bank._covariance()
        g = _upper_factor(bank._global_precision())
        out["gfactor"] = _packed(g).astype(np.float32)
        out["gv"] = (g @ gmean).astype(np.float32)
    return out


def _adapters(bank: Any) -> tuple[list[str], Any, np.ndarray, np.ndarray, np.ndarray]:
    """(adapter domains, the CoreModel of the first, params (A, n_params), adapter_of (K), mix (K, A))."""
    from ..api import FineTuner
    from ..bank import SKIP_METHODS
    from ..core.engine import CoreModel

    names = bank._adapter_names()
    if not names:
        raise UsageError("the bank has no learned adapter (only mixes): nothing to export")
    cores = [CoreModel(bank.domains_[n].tuner.method, 1) for n in names]
    first = bytes(cores[0].m)
    for n, core in zip(names, cores):
        if bytes(core.m) != first:
            raise UsageError(f"domain {n!r}'s adapter has another shape than {names[0]!r}'s (rank or bias); the "
                             f"exported program runs one adapter layout")
    for n in names:
        if bank.domains_[n].tuner.method_name != bank.method:
            raise UsageError(f"domain {n!r} holds a {bank.domains_[n].tuner.method_name} adapter in a {bank.method} "
                             f"bank; the exported program runs one method")
    params = np.stack([np.asarray(bank.domains_[n].tuner.method.params.flat, np.float32) for n in names])
    # the frozen forward pass with the skip taps: the adapters' own method, or a skip method beside them
    rows_core = cores[0] if bank.method in SKIP_METHODS else CoreModel(FineTuner(bank.backbone, "skip2-lora").method, 1)
    adapter_of = np.array([names.index(n) if e.tuner is not None else -1 for n, e in bank.domains_.items()],
                          np.int32)
    mix = np.zeros((len(bank.domains_), len(names)), np.float32)
    for k, e in enumerate(bank.domains_.values()):
        if e.mix is not None:
            for n, wgt in e.mix.items():
                mix[k, names.index(n)] = wgt
    return names, (cores[0], rows_core), params, adapter_of, mix


def bank_flash(bank: Any) -> dict[str, Any]:
    """Bytes the exported bank's data take (float32), shared and per domain, as et_bank_data.c
    holds them: the backbone's weights, each adapter's parameter vector, each domain's components
    (routing row w_m, offset c_m, novelty row v_m, owner) and threshold, the shared metric factor."""
    names, (core, _), params, _, _ = _adapters(bank)
    t = detector_tables(bank)
    f = t["n_features"]
    backbone = sum(a.nbytes for a in core._keep)
    per = {}
    for k, (n, e) in enumerate(bank.domains_.items()):
        comps = len(e.counts)
        per[n] = {"adapter": 4 * params.shape[1] if e.tuner is not None else 4 * len(names),
                  "statistics": comps * (8 * f + 8) + 8}
        per[n]["total"] = per[n]["adapter"] + per[n]["statistics"]
    shared = t["factor"].nbytes + t["gfactor"].nbytes + t["gv"].nbytes
    return {"backbone": backbone, "detector_shared": shared, "per_domain": per,
            "total": backbone + shared + sum(v["total"] for v in per.values())}


# ----------------------------------------------------------------------------- C text
def _data_c(bank: Any, target: Target, window: int) -> tuple[str, str, int]:
    """et_bank_data.h and et_bank_data.c, and the workspace bytes on the target."""
    from ..bank import SKIP_METHODS

    names, (core, rows_core), params, adapter_of, mix = _adapters(bank)
    t = detector_tables(bank)
    sizes = bank.backbone.sizes
    workspace = max(core.workspace_bytes(pointer_bytes=target.pointer_bytes),
                    rows_core.workspace_bytes(pointer_bytes=target.pointer_bytes))
    row_width = rows_core.d_in + sizes[-1]
    skip = bank.method in SKIP_METHODS
    arrays, addr = [], {}
    for a in core._keep:
        if a.ctypes.data in addr or a.size == 0:
            continue
        name = f"et_bank_weights_{len(addr)}"
        addr[a.ctypes.data] = name
        arrays.append(_c_array(name, a))
    for name, a in (("et_bank_params", params), ("et_bank_adapter_of", adapter_of), ("et_bank_mix", mix),
                    ("et_bank_comp_w", t["comp_w"]), ("et_bank_comp_c", t["comp_c"]),
                    ("et_bank_comp_owner", t["comp_owner"]), ("et_bank_factor", t["factor"]),
                    ("et_bank_comp_v", t["comp_v"]), ("et_bank_gfactor", t["gfactor"]), ("et_bank_gv", t["gv"])):
        arrays.append(_c_array(name, np.ascontiguousarray(a)))
    thresholds = ", ".join(_c_double(v) for v in t["thresholds"])
    domains = list(bank.domains_)
    h = f"""/* Generated by edgetune bank export: the bank's sizes (see et_bank.h and README.md). */
#ifndef ET_BANK_DATA_H
#define ET_BANK_DATA_H

#include "et_bank.h"

#define ET_BANK_INPUTS {sizes[0]}
#define ET_BANK_CLASSES {sizes[-1]}
#define ET_BANK_DOMAINS {len(domains)}
#define ET_BANK_FEATURES {t["n_features"]}
#define ET_BANK_ROW_WIDTH {row_width}
/* the scores ring buffer: a microcontroller keeps only its window, a Linux program any up to {MAX_WINDOW} */
#define ET_BANK_MAX_WINDOW {window if target.kind == "mcu" else MAX_WINDOW}
/* et_workspace_size at batch 1 (the larger of the two methods') on {target.name} ({target.pointer_bytes}-byte pointers), as the engine computed it */
#define ET_BANK_WORKSPACE_BYTES {workspace}

extern const et_bank_desc et_bank;

#endif
"""
    c = f"""/* Generated by edgetune bank export: the bank as C data. Do not edit; export again instead.
 * method {bank.method}, backbone {'-'.join(map(str, sizes))} (float32), detector {bank.detector} on
 * {bank.features} features, target {target.name}. Domains, in order: {', '.join(domains)}.
 * The structs are the ones edgetune's Python binding hands to the same engine. */
#include "et_bank_data.h"

{''.join(arrays)}
static const et_backbone et_bank_backbone = {_c_struct(core.bb, addr)};

static const et_method et_bank_method = {_c_struct(core.m, addr)};
{"" if skip else chr(10) + "static const et_method et_bank_rows_method = " + _c_struct(rows_core.m, addr) + ";" + chr(10)}
static const double et_bank_thresholds[{len(domains)}] = {{{thresholds}}};

const et_bank_desc et_bank = {{
    .backbone = &et_bank_backbone,
    .method = &et_bank_method,
    .skip = {int(skip)},
    .rows_method = &{"et_bank_method" if skip else "et_bank_rows_method"},
    .n_domains = {len(domains)},
    .n_adapters = {len(names)},
    .n_params = {params.shape[1]},
    .params = et_bank_params,
    .adapter_of = et_bank_adapter_of,
    .mix = et_bank_mix,
    .row_width = {row_width},
    .n_classes = {sizes[-1]},
    .feat_start = {t["feat_start"]},
    .n_features = {t["n_features"]},
    .n_components = {len(t["comp_c"])},
    .comp_w = et_bank_comp_w,
    .comp_c = et_bank_comp_c,
    .comp_owner = et_bank_comp_owner,
    .metric = {t["metric"]},
    .factor = et_bank_factor,
    .comp_v = et_bank_comp_v,
    .relative = {t["relative"]},
    .gfactor = et_bank_gfactor,
    .gv = et_bank_gv,
    .thresholds = et_bank_thresholds,
    .window = {window},
}};
"""
    return h, c, workspace


def _samples_c(xp: np.ndarray) -> tuple[str, str]:
    h = (f"/* Generated by edgetune bank export: the samples linked into the firmware (normalised). */\n"
         f"#ifndef ET_BANK_SAMPLES_H\n#define ET_BANK_SAMPLES_H\n#define ET_BANK_SAMPLES {len(xp)}\n"
         f"extern const float et_bank_x[];\n#endif\n")
    c = '#include "et_bank_samples.h"\n\n' + _c_array("et_bank_x", xp, static=False)
    return h, c


def _makefile(target: Target) -> str:
    from .. import core as core_pkg

    sources = [f for f in core_pkg.SOURCES if not (target.kind == "mcu" and f == "et_clock.c")]
    common = {"TARGET": target.name, "CC": target.compiler(), "CC_PACKAGE": target.cc_package,
              "QEMU_PACKAGE": target.qemu_package or "", "ENGINE_SOURCES": " ".join(sources),
              "ENGINE_HEADERS": " ".join(core_pkg.HEADERS)}
    if target.kind != "mcu":
        run = "" if target.name == "host" or target.compiler() == "cc" else f"{target.qemu} -L /usr/aarch64-linux-gnu "
        return _template("Makefile.bank.linux", RUN=run, STATIC="-static" if target.name != "host" else "", **common)
    riscv = target.libc == "picolibc"
    return _template("Makefile.bank.mcu", MACHINE=target.machine, CPU_FLAGS=target.cpu_flags,
                     SIZE="riscv64-unknown-elf-size" if riscv else "arm-none-eabi-size", QEMU=target.qemu,
                     LIBC_FLAGS="--specs=picolibc.specs" if riscv else "--specs=nano.specs --specs=nosys.specs",
                     QEMU_EXTRA="-bios none" if riscv else "", **common)


# ----------------------------------------------------------------------------- the project
def check_bank_out(out: str | os.PathLike, inputs: dict[str, Any], force: bool) -> Path:
    """The project directory, checked before any work: not an input, not a file, new unless ``force``."""
    from ..io_atomic import check_not_input, check_writable, recover_dir

    text = str(out)
    if not text.strip():
        raise UsageError("--out: empty path; give the project directory to write")
    path = Path(os.path.abspath(os.path.realpath(text)))
    if path == Path(path.anchor):
        raise UsageError(f"--out {text}: the file system's root cannot be a project directory")
    recover_dir(path)
    check_not_input(path, inputs, option="--out", replaced=True)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {text} exists and is not a directory")
    if path.exists() and not force:
        raise UsageError(f"{text} exists; choose another --out or pass --force to replace it")
    check_writable(path, directory=True)
    return path


def export_bank(bank: Any, opts: BankExportOptions, x: Any, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the project for ``bank`` and the raw samples ``x`` into ``opts.out`` (atomically,
    as ``edgetune export`` does); return its manifest (also written as ``export.json``)."""
    from .. import core as core_pkg
    from ..io_atomic import replace_dir_atomic

    target = get_target(opts.target)
    check_exportable(bank)
    window = bank.window if opts.window is None else opts.window
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or not 1 <= window <= MAX_WINDOW:
        raise UsageError(f"window must be a whole number from 1 to {MAX_WINDOW}, got {window!r}")
    out = check_bank_out(opts.out, inputs or {}, opts.force)
    if opts.toolchain_check:
        target.check_tools()
    xp = np.ascontiguousarray(bank.backbone.prepare(x, "samples"), np.float32)
    h, c, workspace = _data_c(bank, target, int(window))
    sizes = bank_flash(bank)
    mcu = target.kind == "mcu"
    flash = sizes["total"] + CODE_ESTIMATE + (xp.nbytes if mcu else 0)
    if mcu and flash > target.flash_bytes:
        per = xp.nbytes // max(len(xp), 1)
        room = (target.flash_bytes - sizes["total"] - CODE_ESTIMATE) // max(per, 1)
        raise BudgetError(f"the project does not fit {target.name}'s flash: the bank {format_bytes(sizes['total'])}, "
                          f"{len(xp)} linked-in samples {format_bytes(xp.nbytes)}, code about "
                          f"{format_bytes(CODE_ESTIMATE)}: {format_exact(flash)} of {format_exact(target.flash_bytes)}"
                          + (f"; link at most {room} samples (--max-samples)" if room > 0 else ""))
    manifest = {"format": "edgetune-bank-export", "format_version": 1, "target": target.name,
                "method": bank.method, "detector": bank.detector, "features": bank.features,
                "sizes": bank.backbone.sizes, "model_digest": bank.backbone.digest(), "domains": bank.domains,
                "window": int(window), "samples": len(xp), "workspace_bytes": workspace, "bytes": sizes,
                "flash_estimate": flash if mcu else None}

    def fill(tmp: Path) -> None:
        for f in (*core_pkg.SOURCES, *core_pkg.HEADERS):
            if not (mcu and f == "et_clock.c"):
                shutil.copyfile(core_pkg.SOURCE_DIR / f, tmp / f)
        shutil.copyfile(TEMPLATES / "et_bank.h.in", tmp / "et_bank.h")
        shutil.copyfile(TEMPLATES / "et_bank.c.in", tmp / "et_bank.c")
        shutil.copyfile(TEMPLATES / "main_bank.c.in", tmp / "main.c")
        (tmp / "et_bank_data.h").write_text(h)
        (tmp / "et_bank_data.c").write_text(c)
        (tmp / "Makefile").write_text(_makefile(target))
        if mcu:
            sh, sc = _samples_c(xp)
            (tmp / "et_bank_samples.h").write_text(sh)
            (tmp / "et_bank_samples.c").write_text(sc)
            shutil.copyfile(TEMPLATES / f"{target.startup_template}.in", tmp / "startup.c")
            shutil.copyfile(TEMPLATES / f"{target.header_template}.in", tmp / "et_mcu.h")
            (tmp / "link.ld").write_text(_template(target.linker_template, FLASH=target.flash_bytes,
                                                   RAM=target.ram_bytes, STACK=target.stack, TARGET=target.name))
        else:
            with open(tmp / "samples.bin", "wb") as fh:
                fh.write(SAMPLES_MAGIC + struct.pack("<2i", len(xp), xp.shape[1]))
                fh.write(xp.astype("<f4").tobytes())
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(bank, target, manifest))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    def still_free(path: Path) -> None:
        if path.exists() and not opts.force:
            raise UsageError(f"{opts.out} exists (written by another process meanwhile); choose another --out "
                             f"or pass --force to replace it")

    replace_dir_atomic(out, fill, check=still_free)
    return manifest


def _readme(bank: Any, target: Target, m: dict[str, Any]) -> str:
    if target.kind == "mcu":
        run = f"""    make            # builds bank.elf with {target.cc} and {target.libc}
    make run        # runs it under QEMU ({target.machine}), output by semihosting
    make size       # flash and RAM as the linker placed them

The {m['samples']} samples are linked into the firmware (et_bank_samples.c, normalised): they
stand in for a sensor."""
    else:
        run = f"""    make            # builds ./bank with {target.compiler()}
    make run        # routes the {m['samples']} samples of samples.bin (ARGS="--window W" to change the window)
    ./bank [SAMPLES] [--window W]"""
    per = "\n".join(f"| {n} | {v['adapter']} | {v['statistics']} |" for n, v in m["bytes"]["per_domain"].items())
    return f"""# edgetune adapter bank: {bank.method} on {'-'.join(map(str, m['sizes']))}, {len(m['domains'])} domains, {target.name}

Written by `edgetune bank export`. The C engine (`et_core.h`, `et_kernels.c`, `et_layers.c`,
`et_conv.c`, `et_train.c`, ...) is a copy of the files inside the edgetune Python package
that wrote this project; `et_bank_data.c` holds the backbone, every domain's adapter and the
{m['detector']} detector's statistics as `const` arrays; `et_bank.c` routes (see `et_bank.h`).

{run}

Each sample prints one JSON line (routed domain, novelty flag, prediction, logits and novelty
as IEEE bits), then one line of totals. Routing window {m['window']} (1: each sample alone).

## Bytes of data (float32)

Backbone {m['bytes']['backbone']}, detector's shared factor {m['bytes']['detector_shared']}.

| domain | adapter | statistics |
|---|---|---|
{per}
"""


# ----------------------------------------------------------------------------- run and check
def run_bank_export(out: str | os.PathLike, *, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Build the exported project and run it (``make run``); its per-sample records, then the totals."""
    out = Path(out)
    manifest = json.loads((out / "export.json").read_text())
    target = get_target(manifest["target"])
    target.check_tools(run=True)
    build = subprocess.run(["make", "-s", "-C", str(out)], capture_output=True, text=True, timeout=timeout)
    if build.returncode != 0:
        raise BankExportError(f"building {out} failed:\n{build.stderr[-2000:]}")
    run = subprocess.run(["make", "-s", "-C", str(out), "run"], capture_output=True, text=True, timeout=timeout)
    records = []
    for line in run.stdout.splitlines():
        line = line.strip()
        if not line or (target.kind == "mcu" and not line.startswith("{")):
            continue  # an emulator's own messages
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise BankExportError(f"the program printed a line that is not JSON: {line[:200]!r}") from None
    if run.returncode != 0 or not records or "error" in records[-1] or "samples" not in records[-1]:
        raise BankExportError(f"running {out} failed (exit {run.returncode}): {run.stdout[-1000:]}{run.stderr[-1000:]}")
    return records


def _f32(h: str) -> float:
    return struct.unpack("<f", int(h, 16).to_bytes(4, "little"))[0]


def _f64(h: str) -> float:
    return struct.unpack("<d", int(h, 16).to_bytes(8, "little"))[0]


#: Two domains whose scores differ by less than this (relative to the sample's largest score)
#: are a tie: float32 sums in another order (even NumPy's own, on another batch) may pick either.
TIE = 1e-5


def check_bank_export(bank: Any, x: Any, records: list[dict[str, Any]], *, target: str = "host",
                      window: int | None = None) -> dict[str, Any]:
    """Compare the program's output with the bank in Python on the same samples: routed
    domains (``route``), predictions (``predict``), novelty flags (``is_novel``) identical,
    logits within 1e-5 on the host (1e-4 elsewhere) times the sample's largest logit (at least 1). A sample whose two best domain scores (or
    whose novelty and threshold) agree within ``TIE`` may go either way in float32 and is
    counted apart, its logits compared with the domain the program chose. Counts nothing as
    routed (it works on a copy of the bank)."""
    from ..bank import _windowed

    per, totals = records[:-1], records[-1]
    ref = bank.copy()
    w = totals.get("window", window)
    rows = ref.taps(x)
    if len(per) != len(rows):
        raise BankExportError(f"the program printed {len(per)} samples, the bank routed {len(rows)}")
    scores1 = ref._scores(rows)
    scores = _windowed(scores1, w)
    routed, alone = scores.argmax(axis=1), scores1.argmax(axis=1)
    novelty = ref._novelty_rows(rows)
    thresholds = np.array([e.threshold for e in ref.domains_.values()])
    routed_c = np.array([r["domain"] for r in per], np.int64)
    alone_c = np.array([r["domain1"] for r in per], np.int64)
    novel_c = np.array([bool(r["novel"]) for r in per])
    pred_c = np.array([r["pred"] for r in per])
    logits_c = np.array([[_f32(v) for v in r["logits"]] for r in per], np.float64)
    novelty_c = np.array([_f64(r["novelty"]) for r in per])

    def tie(s: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        i = np.arange(len(s))
        return np.abs(s[i, a] - s[i, b]) <= TIE * np.maximum(np.abs(s).max(axis=1), 1.0)

    route_tie = (routed_c != routed) & tie(scores, routed_c, routed)
    alone_tie = (alone_c != alone) & tie(scores1, alone_c, alone)
    novel_py = novelty > thresholds[alone]
    flag_tie = (novel_c != novel_py) & (alone_tie | (np.abs(novelty - thresholds[alone])
                                                      <= TIE * np.maximum(np.abs(thresholds[alone]), 1.0)))
    # the logits of the domain the program routed each sample to (on a tie, the other of the two)
    entries = list(ref.domains_.values())
    logits_py = np.empty_like(logits_c)
    for k, e in enumerate(entries):
        sel = routed_c == k
        if sel.any():
            logits_py[sel] = ref._logits_one(rows[sel], e)
    pred_py = logits_py.argmax(axis=1)
    tol = TOLERANCE.get(target, OTHER_TOLERANCE)
    diff = float(np.max(np.abs(logits_c - logits_py))) if len(per) else 0.0
    # float32 logits carry a relative error: the tolerance scales with the sample's largest logit (at least 1)
    scaled = float(np.max(np.abs(logits_c - logits_py).max(axis=1)
                          / np.maximum(np.abs(logits_py).max(axis=1), 1.0))) if len(per) else 0.0
    n = len(per)
    report = {
        "samples": n, "window": w,
        "routing_equal": int(np.sum(routed_c == routed)), "routing_ties": int(route_tie.sum()),
        "prediction_equal": int(np.sum(pred_c == pred_py)),
        "novelty_flag_equal": int(np.sum(novel_c == novel_py)), "novelty_flag_ties": int(flag_tie.sum()),
        "max_logit_difference": diff, "max_logit_difference_scaled": scaled, "tolerance": tol,
        "max_novelty_relative_difference": float(np.max(np.abs(novelty_c - novelty)
                                                        / np.maximum(np.abs(novelty), 1e-12))) if n else 0.0,
        "routed_counts": {name: int(np.sum(routed_c == k)) for k, name in enumerate(bank.domains)},
        "routed_index": routed_c.tolist(), "ticks": totals.get("ticks"),
    }
    report["ok"] = (report["routing_equal"] + report["routing_ties"] == n and report["prediction_equal"] == n
                    and report["novelty_flag_equal"] + report["novelty_flag_ties"] == n and scaled <= tol)
    return report


def make_size(out: str | os.PathLike) -> dict[str, int]:
    """``make size`` of a microcontroller project: flash and RAM bytes as the linker placed them."""
    res = subprocess.run(["make", "-s", "-C", str(out), "size"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise BankExportError(f"make size failed: {res.stderr[-1000:]}")
    got = {}
    for key in ("flash", "RAM"):
        m = re.search(rf"^{key} (\d+) bytes", res.stdout, re.M)
        if m:
            got[key.lower()] = int(m.group(1))
    return got
