"""Write a device project: the engine's C sources, the model as C data, a device API, a
Makefile and an example program, for one target.

The model is not re-described here: ``CoreModel`` (edgetune/core/engine.py) builds the very
structs the Python package hands to the compiled engine, and the export prints those structs
and the arrays they point to as C initialisers. The adapter's file layout is read off the
method the same way (its ``adapter_tensors`` on a parameter vector of indices), and the
adapter files' header and config are the bytes ``FineTuner.save_adapter`` writes.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackboneMismatch, BudgetError, UsageError
from ..units import format_bytes, format_exact
from .targets import KB, QEMU_MEMORY, Target, get_target

TEMPLATES = Path(__file__).resolve().parent / "templates"
SAMPLES_MAGIC = b"ETSMPL01"
#: Code of the exported program besides the data (measured: 20-40 KB on the targets).
CODE_ESTIMATE = 48 * KB


@dataclass
class ExportOptions:
    model: str
    method: str
    target: str
    out: str
    adapter: str | None = None
    task: str | None = None
    data_dir: str | None = None
    epochs: int | None = None
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    rank: int = 1
    int8: bool = False
    budget: str | None = None
    partial_cache: bool = False
    max_samples: int | None = None
    test_samples: int | None = None
    flash: str | None = None
    force: bool = False
    toolchain_check: bool = True
    strict: bool = True         # refuse an --adapter trained on another backbone
    scheme: str | None = None   # sparse: the update scheme, or "auto" (chosen for the RAM limit on the task)
    auto_epochs: int | None = None          # scheme "auto": the analysis (edgetune.scheme_search.auto_scheme)
    auto_layers: int | None = None
    auto_ratios: list[str] | None = None
    auto_val_split: float | None = None


@dataclass
class ExportResult:
    out: Path
    target: str
    manifest: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- C text
def epoch_losses(output: str) -> list[tuple[int, float]]:
    """The (epoch, loss) pairs an exported program printed, each loss the exact double from its
    "epoch N loss X bits HEX" line (main_linux.c.in: on stderr; main_mcu.c.in: before the JSON
    line, which holds only 10 digits), so two builds' runs can be compared bit for bit."""
    import re

    return [(int(e), struct.unpack(">d", bytes.fromhex(h))[0])
            for e, h in re.findall(r"^epoch (\d+) loss \S+ bits ([0-9a-f]{16})$", output, flags=re.M)]


def _c_float(v: float) -> str:
    v = float(np.float32(v))
    if not np.isfinite(v):
        raise UsageError(f"the model holds a non-finite value ({v}); it cannot be exported")
    return float.hex(v) + "f"


def _c_double(v: float) -> str:
    return float.hex(float(v))


def _c_array(name: str, a: np.ndarray, static: bool = True) -> str:
    a = np.ascontiguousarray(a).ravel()
    ctype = {np.dtype(np.float32): "float", np.dtype(np.int8): "int8_t", np.dtype(np.int32): "int32_t",
             np.dtype(np.uint8): "uint8_t"}[a.dtype]
    if ctype == "float":
        items = [_c_float(v) for v in a.tolist()] if a.size < 64 else None
        if items is None:  # %.9g round-trips every float32 exactly and is much shorter than hex
            if not np.all(np.isfinite(a)):
                raise UsageError("the model holds a non-finite value; it cannot be exported")
            items = [f"{v:.9g}f" for v in a.astype(np.float64).tolist()]
            items = [s if ("." in s or "e" in s or "n" in s) else s[:-1] + ".0f" for s in items]
    else:
        items = [str(v) for v in a.tolist()]
    lines = [", ".join(items[i:i + 12]) for i in range(0, len(items), 12)] or ["0"]
    body = ",\n    ".join(lines)
    return f"{'static ' if static else ''}const {ctype} {name}[{max(a.size, 1)}] = {{\n    {body}\n}};\n"


def _address(p: Any) -> int:
    return ctypes.cast(p, ctypes.c_void_p).value or 0


def _c_struct(s: ctypes.Structure, names: dict[int, str], indent: str = "    ") -> str:
    """A designated initialiser for a core struct; pointers become the names of emitted arrays.
    An array of structs (the backbone's layers) lists its elements that are not all zero."""
    parts = []
    for fname, ftype in s._fields_:
        v = getattr(s, fname)
        if isinstance(v, ctypes.Array):
            elem = ftype._type_
            if issubclass(elem, ctypes.Structure):
                inner = indent + "    "
                items = [f"[{i}] = {_c_struct(x, names, inner + '    ')}" for i, x in enumerate(v)
                         if any(bytes(x))]
                parts.append(f".{fname} = {{\n{inner}" + f",\n{inner}".join(items) + f"\n{indent}}}")
                continue
            if issubclass(elem, ctypes._Pointer):
                vals = [names[_address(p)] if _address(p) else "NULL" for p in v]
            elif elem in (ctypes.c_float,):
                vals = [_c_float(x) for x in v]
            else:
                vals = [str(int(x)) for x in v]
            parts.append(f".{fname} = {{{', '.join(vals)}}}")
        elif isinstance(v, ctypes._Pointer) or ftype.__name__.startswith("LP_"):
            addr = _address(v)
            parts.append(f".{fname} = {names[addr] if addr else 'NULL'}")
        elif ftype is ctypes.c_float:
            parts.append(f".{fname} = {_c_float(v)}")
        elif ftype is ctypes.c_double:
            parts.append(f".{fname} = {_c_double(v)}")
        else:
            parts.append(f".{fname} = {int(v)}")
    close = indent[:-4]
    return "{\n" + indent + f",\n{indent}".join(parts) + "\n" + close + "}"


def _adapter_layout(method: Any) -> list[dict[str, Any]]:
    """Each adapter tensor (in file order) as (offset, rows, cols, strides) into the parameters.

    Found by evaluating ``adapter_tensors()`` on parameters that hold their own indices.
    """
    flat = method.params.flat
    saved = flat.copy()
    if flat.size >= 2 ** 24:
        raise UsageError("the adapter has too many parameters to export")
    try:
        flat[...] = np.arange(flat.size, dtype=flat.dtype)
        tensors = {k: np.array(v, np.float64) for k, v in method.adapter_tensors().items()}
    finally:
        flat[...] = saved
    out = []
    for name in sorted(tensors):  # safetensors files list tensors sorted by name
        t = tensors[name]
        shape = list(t.shape)
        m = t.reshape(1, -1) if t.ndim == 1 else t.reshape(t.shape[0], -1)
        rows, cols = m.shape
        off = int(m[0, 0])
        rs = int(m[1, 0] - m[0, 0]) if rows > 1 else 0
        cs = int(m[0, 1] - m[0, 0]) if cols > 1 else 0
        want = off + rs * np.arange(rows)[:, None] + cs * np.arange(cols)[None, :]
        if not np.array_equal(m, want):
            raise UsageError(f"adapter tensor {name} is not a strided view of the parameters; it cannot be exported")
        out.append({"name": name, "shape": shape, "offset": off, "rows": rows, "cols": cols,
                    "row_stride": rs, "col_stride": cs})
    return out


# ----------------------------------------------------------------------------- the project
def _load_inputs(opts: ExportOptions, target: Target):
    """Model (int8 if asked), task, method (seeded, or from an adapter), training setup."""
    from ..api import FineTuner
    from ..methods import method_class
    from ..methods.sparse import AUTO
    from ..quant import load_any, quantize
    from ..quant.cache import attach_int8_cache

    cls = method_class(opts.method)
    if opts.scheme is not None and not cls.takes_scheme:
        raise UsageError(f"--scheme chooses the sparse update's trained parts: use it with --method sparse, "
                         f"not {opts.method}")
    if opts.scheme is not None and opts.adapter:
        raise UsageError("--scheme and --adapter: a trained adapter carries its own scheme (adapter_config.json); "
                         "drop --scheme")
    if opts.scheme is not None and opts.scheme.strip().lower() == AUTO and not opts.task:
        raise UsageError("--scheme auto measures what each part of a scheme buys on your task: give --task")
    if opts.partial_cache and not cls.uses_cache:
        raise UsageError(f"--partial-cache applies to methods with a skip-cache (skip2-lora), not {opts.method}")
    model = load_any(opts.model)
    task = None
    if opts.task:
        from ..data.task import load_task
        from ..experiment import check_compatible

        task = load_task(opts.task, opts.data_dir)
        check_compatible(model, task)
    if opts.int8 and not model.is_int8:
        if task is None:
            raise UsageError("--int8 on a float model needs --task: the int8 scales are calibrated on the task's "
                             "pre-training split")
        model = quantize(model, task.x_pretrain)
    d = task.defaults if task is not None else {}
    train = {"epochs": opts.epochs or d.get("epochs", 100), "batch_size": opts.batch_size or d.get("batch_size", 20),
             "lr": opts.lr or d.get("lr", 0.01), "optimizer": opts.optimizer or "sgd", "seed": opts.seed}
    n_task = len(task.y_finetune) if task is not None else None
    max_samples = opts.max_samples or n_task or 100
    scheme, search = opts.scheme, None
    if scheme is not None and scheme.strip().lower() == AUTO:
        scheme, search = _auto_scheme(opts, target, model, task, train, max_samples)
    if opts.adapter:
        try:
            tuner = FineTuner.load_adapter(model, opts.adapter, strict=opts.strict, epochs=train["epochs"],
                                           batch_size=train["batch_size"], lr=train["lr"],
                                           optimizer=train["optimizer"], seed=opts.seed, engine="c")
        except BackboneMismatch:
            raise BackboneMismatch(f"{opts.adapter}: adapter was trained on a different backbone (same shape, other "
                                   f"weights); pass --no-strict (ExportOptions(strict=False)) to export it "
                                   f"anyway") from None
        if tuner.method_name != opts.method:
            raise UsageError(f"--adapter {opts.adapter} holds a {tuner.method_name} adapter, not {opts.method}")
    else:
        tuner = FineTuner(model, opts.method, rank=opts.rank, epochs=train["epochs"], batch_size=train["batch_size"],
                          lr=train["lr"], optimizer=train["optimizer"], seed=opts.seed, engine="c", scheme=scheme)
    cache = None
    if cls.uses_cache:
        cache = "int8" if opts.int8 else "float32"
        if cache == "int8":
            row = sum(model.tap_widths)  # an int8 cache row: the inputs of every skip adapter
            if max_samples * row >= MAX_STATIC_ARENA:
                raise BudgetError(f"--max-samples {max_samples}: the int8 skip-cache alone would be "
                                  f"{format_bytes(max_samples * row)} ({max_samples * row} bytes); a device arena "
                                  f"of 2 GiB or more does not link; lower --max-samples")
            x_calib = None
            if any(spec.spatial for spec in model.specs):  # a CNN's taps are pooled: their scales are calibrated
                if task is None:
                    raise UsageError("an int8 skip-cache on a CNN needs --task: its scales are calibrated on the "
                                     "task's pre-training split")
                x_calib = task.x_pretrain
            attach_int8_cache(tuner.method, max_samples, x_calib=x_calib)
    return model, task, tuner, train, max_samples, cache, search


def _ram_limit(opts: ExportOptions, target: Target) -> tuple[int | None, int | None]:
    """(--budget in bytes or None, the RAM the program must fit: the budget, else a microcontroller's RAM)."""
    from ..units import parse_bytes

    budget = parse_bytes(opts.budget, "--budget") if opts.budget is not None else None
    if budget is not None and budget <= 0:
        raise UsageError(f"--budget must be more than 0 bytes, got {opts.budget!r}")
    return budget, budget if budget is not None else (target.ram_bytes if target.kind == "mcu" else None)


def _auto_scheme(opts: ExportOptions, target: Target, model: Any, task: Any, train: dict[str, Any],
                 max_samples: int) -> tuple[str, Any]:
    """Scheme "auto": the contribution analysis on the samples the program trains on (the task's
    seeded subset of --max-samples fine-tuning samples; a validation split of them, never the
    test split), the budget checked against the device plan of each scheme: the compiled
    engine's arena, the program's statics and stack (plan_device_memory), weights in flash."""
    from ..memory import plan_device_memory
    from ..methods import make_method
    from ..scheme_search import DEFAULT_EPOCHS, DEFAULT_VAL_FRACTION, auto_scheme

    _, limit = _ram_limit(opts, target)
    if limit is None:
        raise UsageError(f"--scheme auto chooses the scheme for a RAM limit: give --budget for {target.name}, "
                         f"e.g. --budget 256KB")
    val = DEFAULT_VAL_FRACTION if opts.auto_val_split is None else opts.auto_val_split
    if not 0 < val < 1:
        raise UsageError(f"--auto-val-split must be between 0 and 1 (a share of the fine-tuning data), got {val}")
    n_layers = len(model.tap_layers)
    if opts.auto_layers is not None and opts.auto_layers > n_layers:
        raise UsageError(f"--auto-layers {opts.auto_layers}: the model has {n_layers} layers with weights")
    idx = _subset(len(task.y_finetune), max_samples, opts.seed, 1)  # the samples the program trains on
    store = target.kind != "mcu"

    def plan_fn(scheme: str):
        method = make_method("sparse", model, scheme=scheme)
        return plan_device_memory(method, batch_size=train["batch_size"], max_samples=max_samples,
                                  optimizer=train["optimizer"], store_samples=store,
                                  pointer_bytes=target.pointer_bytes, statics=target.statics, stack=target.stack)

    try:
        result = auto_scheme(model, task.x_finetune[idx], task.y_finetune[idx], budget=limit, plan_fn=plan_fn,
                             epochs=opts.auto_epochs or DEFAULT_EPOCHS, batch_size=train["batch_size"],
                             lr=train["lr"], optimizer=train["optimizer"], seed=opts.seed, val_fraction=val,
                             layers=opts.auto_layers, ratios=opts.auto_ratios, engine="auto", verify=False)
    except BudgetError as e:
        hint = "; a smaller --batch-size needs less" if train["batch_size"] > 1 else ""
        raise BudgetError(f"{e} on {target.name} (at batch {train['batch_size']}{hint})") from None
    return result.scheme, result


def _subset(n: int, k: int | None, seed: int, salt: int) -> np.ndarray:
    """The first-k-of-a-seeded-shuffle subset of 0..n-1 (all when k is None or >= n), sorted."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, k, replace=False))


def plan_export(opts: ExportOptions) -> dict[str, Any]:
    """Everything the export decides before writing: refuses (with the numbers) what cannot be done."""
    from ..memory import plan_device_memory
    from ..units import parse_bytes

    target = get_target(opts.target)
    if opts.toolchain_check:
        target.check_tools()
    mcu = target.kind == "mcu"
    budget, ram_limit = _ram_limit(opts, target)
    if mcu and budget is not None and budget > QEMU_MEMORY:
        raise UsageError(f"--budget {format_exact(budget)}: the emulated {target.name} board has "
                         f"{format_exact(QEMU_MEMORY)} of RAM")
    model, task, tuner, train, max_samples, cache, search = _load_inputs(opts, target)
    method = tuner.method

    train_idx = test_idx = None
    if task is not None:
        train_idx = _subset(len(task.y_finetune), max_samples, opts.seed, 1)
        test_idx = _subset(len(task.y_test), opts.test_samples, opts.seed, 2)
    n_train = len(train_idx) if train_idx is not None else 0
    store = not mcu  # a microcontroller reads its linked-in samples in place (flash)

    def plan(capacity: int | None):
        return plan_device_memory(method, batch_size=train["batch_size"], max_samples=max_samples,
                                  optimizer=train["optimizer"], cache=cache, cache_capacity=capacity,
                                  store_samples=store, pointer_bytes=target.pointer_bytes,
                                  statics=target.statics, stack=target.stack)

    capacity = max_samples if cache else 0
    p = plan(capacity)
    if ram_limit is not None and p.total > ram_limit:
        what = "--budget" if budget is not None else f"the {target.name}'s RAM"
        fit_cap = None
        if cache:
            lo, hi = 0, capacity
            while lo < hi:  # the largest capacity that fits
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if plan(mid).total <= ram_limit else (lo, mid - 1)
            if plan(lo).total <= ram_limit:
                fit_cap = lo
        if cache and opts.partial_cache and fit_cap is not None:
            capacity = fit_cap
            p = plan(capacity)
        else:
            fit_n = None
            lo, hi = 0, max_samples
            while lo < hi:
                mid = (lo + hi + 1) // 2
                ok = mid >= 1 and plan_device_memory(
                    method, batch_size=train["batch_size"], max_samples=mid, optimizer=train["optimizer"],
                    cache=cache, store_samples=store, pointer_bytes=target.pointer_bytes, statics=target.statics,
                    stack=target.stack).total <= ram_limit
                lo, hi = (mid, hi) if ok else (lo, mid - 1)
            fit_n = lo or None
            hints = []
            if fit_cap is not None:
                hints.append(f"--partial-cache (caches {fit_cap} of {max_samples} samples, recomputes the rest)")
            if fit_n:
                hints.append(f"--max-samples {fit_n}")
            hint = f"; try {' or '.join(hints)}" if hints else \
                "; nothing of this method fits: try a smaller --batch-size or another method (edgetune plan)"
            raise BudgetError(f"{p.explain(ram_limit)} ({what}; {p.total} of {ram_limit} bytes): over by "
                              f"{format_exact(p.total - ram_limit)}{hint}")
    if not mcu:
        _check_linux_limits(target, p.total, train["epochs"], n_train,
                            0 if test_idx is None else len(test_idx), model.sizes[0], _existing_parent(opts.out))
    # Flash: the weights, the example program's samples and the code.
    from ..core.engine import CoreModel

    core = CoreModel(method, train["batch_size"])
    weights = sum(a.nbytes for a in core._keep)
    sample_bytes = 0
    if mcu and task is not None:
        sample_bytes = (n_train + len(test_idx)) * (4 * model.sizes[0] + 4) + 4 * train["epochs"] * n_train
    flash = weights + 4 * method.params.flat.size + CODE_ESTIMATE + sample_bytes
    flash_limit = parse_bytes(opts.flash) if opts.flash else target.flash_bytes
    if mcu:
        if flash_limit > QEMU_MEMORY:
            raise UsageError(f"--flash {format_exact(flash_limit)}: the emulated board has {format_exact(QEMU_MEMORY)}")
        if weights + CODE_ESTIMATE > flash_limit:
            raise BudgetError(f"the model does not fit {target.name}'s flash: its weights are {format_bytes(weights)} "
                              f"(+ about {format_bytes(CODE_ESTIMATE)} of code), the flash is {format_exact(flash_limit)}"
                              f"; use a smaller or an int8 model (--int8), or --flash BYTES for a larger part")
        if flash > flash_limit:
            raise BudgetError(f"the project does not fit {target.name}'s flash: weights {format_bytes(weights)}, "
                              f"linked-in samples {format_bytes(sample_bytes)} ({n_train} training, {len(test_idx)} test, "
                              f"{train['epochs']} epochs of shuffles), code about {format_bytes(CODE_ESTIMATE)}: "
                              f"{format_exact(flash)} of {format_exact(flash_limit)}; link fewer samples "
                              f"(--max-samples, --test-samples) or fewer --epochs")
    p.flash_weights = weights
    return {"target": target, "model": model, "task": task, "tuner": tuner, "core": core, "train": train,
            "max_samples": max_samples, "cache": cache, "capacity": capacity, "plan": p, "budget": budget,
            "ram_limit": ram_limit, "flash_limit": flash_limit if mcu else None, "flash_estimate": flash,
            "train_idx": train_idx, "test_idx": test_idx, "scheme_search": search}


#: The exported Linux program's own bound on --epochs (main_linux.c.in): ET_MODEL_EPOCHS is an int32.
MAX_EPOCHS = 1_000_000
#: A static array at or above 2 GiB does not link on x86-64 or aarch64 (the small code model).
MAX_STATIC_ARENA = 2 * 1024 ** 3


def _existing_parent(out: str) -> Path | None:
    """The nearest existing folder at or above ``out``'s parent (where the project will be written)."""
    if not str(out).strip():
        return None
    p = Path(os.path.abspath(out)).parent
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p if p.is_dir() else None


def _check_linux_limits(target: Target, arena: int, epochs: int, n_train: int, n_test: int, inputs: int,
                        out_dir: Path | None) -> None:
    """Refuse, before any work, a Linux export that cannot build or run: the program's epoch bound,
    a static arena that does not link, an arena that does not fit this machine's memory (host),
    a samples file that does not fit the disk under ``out_dir``; with the numbers and what to change."""
    from ..memory import available_memory

    if epochs > MAX_EPOCHS:
        raise UsageError(f"--epochs {epochs}: the exported program trains at most {MAX_EPOCHS} epochs; export "
                         f"fewer (beyond the exported shuffles the program shuffles itself: ./train --epochs N)")
    if arena >= MAX_STATIC_ARENA:
        raise BudgetError(f"the device program's RAM would be {format_bytes(arena)} ({arena} bytes): a static arena "
                          f"of 2 GiB or more does not link; lower --max-samples or use --partial-cache with --budget")
    have = available_memory()
    if target.name == "host" and have is not None and arena > have:
        raise BudgetError(f"the device program's RAM would be {format_bytes(arena)} ({arena} bytes); this machine "
                          f"has {format_bytes(have)} ({have} bytes) available; lower --max-samples or use "
                          f"--partial-cache with --budget")
    samples = 24 + (n_train + n_test) * (4 * inputs + 4) + 4 * epochs * n_train
    free = shutil.disk_usage(out_dir).free if out_dir is not None else None
    if n_train and free is not None and samples > free:
        raise BudgetError(f"samples.bin would be {format_bytes(samples)} ({samples} bytes), mostly the shuffles of "
                          f"{epochs} epochs of {n_train} samples; the disk has {format_bytes(free)} free; export "
                          f"fewer --epochs (beyond the exported shuffles the program shuffles itself: "
                          f"./train --epochs N)")


def _model_c(d: dict[str, Any], adapter_files: tuple[bytes, str]) -> tuple[str, str]:
    """et_model.c and et_model.h: the core structs, the arrays they point to, the training setup."""
    core, tuner, train, target = d["core"], d["tuner"], d["train"], d["target"]
    method, model = tuner.method, d["model"]
    names: dict[int, str] = {}
    arrays = []
    for a in core._keep:
        if a.ctypes.data in names or a.size == 0:
            continue
        name = f"et_data_{len(names)}"
        names[a.ctypes.data] = name
        arrays.append(_c_array(name, a))
    extra = []
    cache_obj = getattr(method, "cache", None)
    col_scales = "NULL"
    if d["cache"] == "int8":
        extra.append(_c_array("et_col_scales", cache_obj.col_scales))
        col_scales = "et_col_scales"
    mean = std = "NULL"
    if model.input_mean is not None:  # per feature (MLP) or per channel (CNN): norm_shape
        extra.append(_c_array("et_input_mean", np.asarray(model.input_mean, np.float32)))
        mean = "et_input_mean"
    if model.input_std is not None:
        extra.append(_c_array("et_input_std", np.asarray(model.input_std, np.float32)))
        std = "et_input_std"
    extra.append(_c_array("et_initial_params", method.params.flat.astype(np.float32)))
    layout = _adapter_layout(method)
    tensors = ",\n    ".join(f'{{"{t["name"]}", {t["offset"]}, {t["rows"]}, {t["cols"]}, {t["row_stride"]}, '
                               f'{t["col_stride"]}}}' for t in layout)
    opt = tuner.config
    from ..core.engine import OPTIMIZERS

    kinds = {"sgd": "SGD", "momentum": "Momentum", "adam": "Adam"}
    cache_kind = {None: "ET_CACHE_NONE", "float32": "ET_CACHE_FLOAT", "int8": "ET_CACHE_INT8"}[d["cache"]]
    header, config = adapter_files
    classes = model.sizes[-1]
    h = f"""/* Generated by edgetune export: the model and its training setup (see README.md). */
#ifndef ET_MODEL_H
#define ET_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "et_device.h"

#define ET_MODEL_INPUTS {model.sizes[0]}
#define ET_MODEL_CLASSES {classes}
#define ET_MODEL_MAX_SAMPLES {d["max_samples"]}
#define ET_MODEL_EPOCHS {train["epochs"]}
#define ET_MODEL_SEED {train["seed"]}u
/* et_device_arena_bytes(&et_model) on {target.name} ({target.pointer_bytes}-byte pointers), as the engine computed it */
#define ET_MODEL_ARENA_BYTES {d["plan"].arena}
#define ET_MODEL_ADAPTER_BYTES {4 * sum(t["rows"] * t["cols"] for t in layout)}

extern const et_model_desc et_model;
extern const char et_model_method[];
extern const char et_model_target[];
/* adapter_model.safetensors: this header, then et_device_read_adapter()'s bytes */
extern const unsigned char et_adapter_header[];
extern const size_t et_adapter_header_bytes;
/* adapter_config.json */
extern const char et_adapter_config[];

#endif
"""
    hdr_items = ", ".join(str(b) for b in header)
    c = f"""/* Generated by edgetune export: the model as C data. Do not edit; export again instead.
 * method {method.name}, backbone {'-'.join(map(str, model.sizes))} ({'int8' if model.is_int8 else 'float32'}),
 * target {target.name}. The structs are the ones edgetune's Python binding hands to the same engine. */
#include "et_model.h"

{''.join(arrays)}
{''.join(extra)}
static const et_backbone et_model_backbone = {_c_struct(core.bb, names)};

static const et_method et_model_method_struct = {_c_struct(core.m, names)};

static const et_adapter_tensor et_model_tensors[{len(layout)}] = {{
    {tensors}
}};

const et_model_desc et_model = {{
    .backbone = &et_model_backbone,
    .method = &et_model_method_struct,
    .initial_params = et_initial_params,
    .optimizer = {OPTIMIZERS[kinds[train["optimizer"]]]},
    .lr = {_c_double(opt.lr)},
    .momentum = {_c_double(opt.momentum if train["optimizer"] == "momentum" else 0.0)},
    .weight_decay = {_c_double(opt.weight_decay)},
    .beta1 = {_c_double(0.9)},
    .beta2 = {_c_double(0.999)},
    .eps = {_c_double(1e-8)},
    .batch = {train["batch_size"]},
    .cache_kind = {cache_kind},
    .cache_capacity = {d["capacity"]},
    .col_scales = {col_scales},
    .max_samples = {d["max_samples"]},
    .store_samples = {0 if target.kind == "mcu" else 1},
    .input_mean = {mean},
    .input_std = {std},
    .norm_channels = {model.norm_shape[0]},
    .n_tensors = {len(layout)},
    .tensors = et_model_tensors,
}};

const char et_model_method[] = {json.dumps(method.name)};
const char et_model_target[] = {json.dumps(target.name)};
const unsigned char et_adapter_header[{len(header)}] = {{{hdr_items}}};
const size_t et_adapter_header_bytes = {len(header)};
const char et_adapter_config[] = {json.dumps(config)};
"""
    return h, c


def _adapter_files(tuner: Any) -> tuple[bytes, str]:
    """The adapter files' safetensors header (with its length prefix) and config, as edgetune writes them."""
    from ..api import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    files = tuner.adapter_files()
    blob = files[ADAPTER_WEIGHTS]
    cfg = json.loads(files[ADAPTER_CONFIG])
    (n,) = struct.unpack("<Q", blob[:8])
    cfg.pop("adapter_sha256", None)  # the device writes the data; the loader checks shapes and the backbone digest
    cfg["written_by"] = "edgetune export (device program)"
    return blob[:8 + n], json.dumps(cfg, indent=2) + "\n"


def _write_samples_bin(d: dict[str, Any], f: Any) -> None:
    """The Linux program's samples file: raw inputs (the program normalises them), labels, shuffles.
    The shuffles are generated and written a block of epochs at a time, so a long run's file
    never sits whole in memory."""
    task, tr, te = d["task"], d["train_idx"], d["test_idx"]
    epochs = d["train"]["epochs"]
    flat = d["model"].sizes[0]  # one flat row per sample: a CNN's (C, L) or (C, H, W) channels first
    xs, ys = task.x_finetune[tr].reshape(len(tr), flat).astype("<f4"), task.y_finetune[tr].astype("<i4")
    xt, yt = task.x_test[te].reshape(len(te), flat).astype("<f4"), task.y_test[te].astype("<i4")
    f.write(SAMPLES_MAGIC + struct.pack("<4i", xs.shape[1], len(ys), len(yt), epochs))
    for part in (xs, ys, xt, yt):
        f.write(part.tobytes())
    rng = np.random.default_rng(d["train"]["seed"])
    block = max(1, (8 << 20) // (4 * max(len(tr), 1)))
    for start in range(0, epochs, block):
        f.write(_orders(len(tr), min(block, epochs - start), rng).astype("<i4").tobytes())


def _orders(n: int, epochs: int, rng: np.random.Generator) -> np.ndarray:
    """The trainer's shuffles: one ``rng.permutation(n)`` per epoch from ``default_rng(seed)``
    (edgetune/train.py); ``rng`` carries on from block to block."""
    out = np.empty((epochs, n), np.int32)
    for e in range(epochs):
        out[e] = rng.permutation(n)
    return out


def _samples_c(d: dict[str, Any]) -> str:
    """The microcontroller's linked-in samples (normalised: they stand in for a sensor driver)."""
    model, task, tr, te = d["model"], d["task"], d["train_idx"], d["test_idx"]
    out = ["/* Generated by edgetune export: the samples linked into the firmware (flash), already normalised\n"
           " * with the model's input mean and std, and the trainer's shuffle per epoch. */\n"
           "#include \"et_samples.h\"\n\n"]
    if task is None:
        out.append("const float et_train_x[1] = {0};\nconst int32_t et_train_y[1] = {0};\n"
                   "const float et_test_x[1] = {0};\nconst int32_t et_test_y[1] = {0};\n"
                   "const int32_t et_orders[1] = {0};\n")
        return "".join(out)
    out.append(_c_array("et_train_x", model.prepare(task.x_finetune[tr]), static=False))
    out.append(_c_array("et_train_y", task.y_finetune[tr].astype(np.int32), static=False))
    out.append(_c_array("et_test_x", model.prepare(task.x_test[te]), static=False))
    out.append(_c_array("et_test_y", task.y_test[te].astype(np.int32), static=False))
    out.append(_c_array("et_orders", _orders(len(tr), d["train"]["epochs"], np.random.default_rng(d["train"]["seed"])),
                        static=False))
    return "".join(out)


def _samples_h(d: dict[str, Any]) -> str:
    n_train = len(d["train_idx"]) if d["task"] is not None else 0
    n_test = len(d["test_idx"]) if d["task"] is not None else 0
    epochs = d["train"]["epochs"] if d["task"] is not None else 0
    return f"""/* Generated by edgetune export: the linked-in samples (see et_samples.c). */
#ifndef ET_SAMPLES_H
#define ET_SAMPLES_H

#include <stdint.h>

#define ET_TRAIN_SAMPLES {n_train}
#define ET_TEST_SAMPLES {n_test}
#define ET_ORDER_EPOCHS {epochs}

extern const float et_train_x[];
extern const int32_t et_train_y[];
extern const float et_test_x[];
extern const int32_t et_test_y[];
extern const int32_t et_orders[];   /* (ET_ORDER_EPOCHS, ET_TRAIN_SAMPLES) */

#endif
"""


def _template(name: str, **subst: Any) -> str:
    text = (TEMPLATES / name).read_text()
    for k, v in subst.items():
        text = text.replace("@" + k + "@", str(v))
    return text


def _copy_template(name: str, dest: Path) -> None:
    """A C file of the device project, stored as ``templates/NAME.in``: it includes the
    engine's and the generated headers, which exist only beside it in an exported project."""
    shutil.copyfile(TEMPLATES / f"{name}.in", dest)


def check_out(opts: ExportOptions) -> Path:
    """The project directory ``opts.out`` will replace, checked before any work: not an input
    (model, adapter, task file, data folder), not holding one or lying inside one, not the
    current directory or one holding it (resolved through symlinks; --force does not change
    that), not a file, and a symlink only if it points to a directory (which is replaced)."""
    from ..io_atomic import check_not_input, check_writable, recover_dir

    text = str(opts.out)
    if not text.strip():
        raise UsageError("--out: empty path; give the project directory to write")
    out = Path(text)
    if out.is_symlink():
        real = os.path.realpath(out)
        if not os.path.isdir(real):
            why = "a file" if os.path.exists(real) else "nothing (a dangling or looping link)"
            raise UsageError(f"--out {text} is a symbolic link to {os.readlink(out)}, which is {why}; remove the "
                             f"link or choose another --out")
        out = Path(real)
    out = Path(os.path.abspath(out))
    if out == Path(out.anchor) or not out.name:
        raise UsageError(f"--out {text}: the file system's root cannot be a project directory")
    _recover_old_swap(out)  # a project moved aside by a killed export is put back first
    recover_dir(out)
    task_file = opts.task if opts.task and Path(opts.task).exists() else None
    check_not_input(out, {"--model": opts.model, "--adapter": opts.adapter, "--task": task_file,
                          "--data-dir": opts.data_dir}, option="--out", replaced=True)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text} exists and is not a directory")
    if out.exists() and not opts.force:
        raise UsageError(f"{text} exists; choose another --out or pass --force to replace it")
    check_writable(out, directory=True)
    return out


def _recover_old_swap(out: Path) -> None:
    """Earlier versions of the export moved the old project aside as ``.NAME.old-PID`` before
    renaming the new one in; a crash between the two left only that copy. Put it back when
    ``out`` is missing, else remove it (only copies of processes that are gone)."""
    from ..io_atomic import _pid_alive

    prefix = f".{out.name}.old-"
    try:
        entries = [e for e in os.scandir(out.parent) if e.name.startswith(prefix) and e.name[len(prefix):].isdigit()]
    except OSError:
        return
    for e in sorted(entries, key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True):
        if _pid_alive(int(e.name[len(prefix):])) or not e.is_dir(follow_symlinks=False):
            continue
        if not out.exists():
            os.rename(e.path, out)
        else:
            shutil.rmtree(e.path, ignore_errors=True)


def export_project(opts: ExportOptions, plan: dict[str, Any] | None = None) -> ExportResult:
    """Write the project for ``opts`` into ``opts.out`` atomically: it is written into a hidden
    folder beside it and exchanged with the old project in one step, under ``opts.out``'s
    lock (the same machinery as model saves, so a crash leaves the old project or the new one
    and the next run removes what a dead process left). ``plan``: ``plan_export(opts)``'s
    result when the caller has it already."""
    from .. import core as core_pkg
    from ..io_atomic import replace_dir_atomic

    out = check_out(opts)
    d = plan if plan is not None else plan_export(opts)
    target, tuner = d["target"], d["tuner"]
    adapter_files = _adapter_files(tuner)
    manifest = _manifest(d, opts)

    def fill(tmp: Path) -> None:
        for f in (*core_pkg.SOURCES, *core_pkg.HEADERS):
            if target.kind == "mcu" and f == "et_clock.c":
                continue  # POSIX only
            shutil.copyfile(core_pkg.SOURCE_DIR / f, tmp / f)
        h, c = _model_c(d, adapter_files)
        (tmp / "et_model.h").write_text(h)
        (tmp / "et_model.c").write_text(c)
        mcu = target.kind == "mcu"
        if mcu:
            (tmp / "et_samples.h").write_text(_samples_h(d))
            (tmp / "et_samples.c").write_text(_samples_c(d))
            _copy_template("main_mcu.c", tmp / "main.c")
            _copy_template(target.startup_template, tmp / "startup.c")
            _copy_template(target.header_template, tmp / "et_mcu.h")
            (tmp / "link.ld").write_text(_template(
                target.linker_template, FLASH=d["flash_limit"], RAM=d["ram_limit"], STACK=target.stack,
                TARGET=target.name))
            (tmp / "Makefile").write_text(_template(
                target.makefile_template, TARGET=target.name, CPU_FLAGS=target.cpu_flags, MACHINE=target.machine,
                CC=target.compiler()))
        else:
            _copy_template("main_linux.c", tmp / "main.c")
            if d["task"] is not None:
                with open(tmp / "samples.bin", "wb") as f:
                    _write_samples_bin(d, f)
            run = "" if target.name == "host" or target.compiler() == "cc" else f"{target.qemu} "
            (tmp / "Makefile").write_text(_template(
                "Makefile.linux", TARGET=target.name, CC=target.compiler(), CC_PACKAGE=target.cc_package,
                RUN=run, STATIC="-static" if target.name != "host" else "",
                QEMU=target.qemu or "", QEMU_PACKAGE=target.qemu_package or ""))
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(d, manifest))
        for f in tmp.iterdir():  # durable before the swap, like a model's files
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    def still_free(path: Path) -> None:  # under the lock: another export may have written it meanwhile
        _recover_old_swap(path)
        if path.exists() and not opts.force:
            raise UsageError(f"{opts.out} exists (written by another process meanwhile); choose another --out "
                             f"or pass --force to replace it")

    replace_dir_atomic(out, fill, check=still_free)
    return ExportResult(out=Path(opts.out), target=target.name, manifest=manifest)


def _manifest(d: dict[str, Any], opts: ExportOptions) -> dict[str, Any]:
    model, tuner, train, p = d["model"], d["tuner"], d["train"], d["plan"]
    return {
        "format": "edgetune-export", "format_version": 1, "target": d["target"].name, "method": tuner.method_name,
        "model": str(opts.model), "sizes": model.sizes, "input_shape": list(model.input_shape),
        "layers": [spec.describe() for spec in model.specs], "backbone": "int8" if model.is_int8 else "float32",
        "model_digest": model.digest(), "rank": tuner.method.options.rank, "adapter": opts.adapter,
        "task": d["task"].name if d["task"] is not None else None, **train,
        "max_samples": d["max_samples"], "cache": d["cache"], "cache_capacity": d["capacity"],
        "train_indices": d["train_idx"].tolist() if d["train_idx"] is not None else None,
        "test_indices": d["test_idx"].tolist() if d["test_idx"] is not None else None,
        "budget": d["budget"], "ram_limit": d["ram_limit"], "flash_limit": d["flash_limit"],
        "flash_estimate": d["flash_estimate"], "memory": p.as_dict(),
        **({"scheme": str(tuner.method.scheme), "qas": bool(tuner.method.qas)}
           if tuner.method.takes_scheme else {}),
        **({"scheme_search": d["scheme_search"].as_dict()} if d["scheme_search"] is not None else {}),
    }


def _readme(d: dict[str, Any], m: dict[str, Any]) -> str:
    target = d["target"]
    p = d["plan"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in p.breakdown().items())
    if target.kind == "mcu":
        run = f"""    make            # builds train.elf with {target.cc} and {target.libc}
    make run        # runs it under QEMU ({target.machine}), output by semihosting; the last line is JSON
    make size       # flash and RAM as the linker placed them
    make icount     # the same run, with QEMU counting instructions (see 'instructions' in the JSON)

The samples are linked into the firmware (et_samples.c, normalised): they stand in for a
sensor. A program on a real part calls et_device_add_sample() with raw readings instead
(export without --task and a RAM budget that holds the sample store) or keeps its samples
in flash and calls et_device_use_samples()."""
    else:
        run = f"""    make            # builds ./train with {target.compiler()}
    make run        # {('under ' + target.qemu + ', ') if target.qemu else ''}trains on samples.bin and prints the result, last line JSON
    ./train [SAMPLES] [--epochs N] [--save-adapter DIR] [--quiet]

SAMPLES defaults to samples.bin beside the program. --save-adapter DIR writes
adapter_model.safetensors + adapter_config.json, which `edgetune evaluate --adapter DIR`
and `FineTuner.load_adapter` read."""
    model = d["model"]
    if model.is_plain_mlp():
        on, layers = "-".join(map(str, m["sizes"])), ""
    else:  # a CNN: its layers, as the engine runs them (one flat channels-first row per sample)
        on = f"a {len(m['layers'])}-layer network on {'x'.join(map(str, m['input_shape']))} inputs"
        rows_l = "\n".join(f"| {k} | {text} |" for k, text in enumerate(m["layers"]))
        layers = f"""
## Layers

A sample is one flat row of {m['sizes'][0]} floats, channels first; the program normalises it
per channel (a mean and a std for each of the {model.norm_shape[0]} input channels).

| layer | kind, input -> output shape |
|---|---|
{rows_l}
"""
    return f"""# edgetune device project: {m['method']} on {on} ({m['backbone']}), {target.name}

Written by `edgetune export`. The C engine (`et_core.h`, `et_kernels.c`, `et_layers.c`, `et_conv.c`,
`et_int8.c`, `et_train.c`, `et_abi.c`) and the device API `et_device.c/.h` (samples, train,
predict, adapter bytes) are copies of the files inside the edgetune Python package that
wrote this project; `et_model.c` holds the model as `const` arrays and the very structs
that package hands to the engine; one static arena of `ET_MODEL_ARENA_BYTES` holds
everything that changes.
{layers}
{run}

Shuffles: for its {m['epochs']} exported epochs the program uses the same per-epoch orders as
edgetune's trainer (seed {m['seed']}), so it reaches the same loss; beyond them, or on other
samples, the device shuffles with its own xorshift32 generator.

## RAM (edgetune's memory model, {target.pointer_bytes}-byte pointers)

| piece | bytes |
|---|---|
{rows}
| **total** | **{p.total}** |

Batch {m['batch_size']}, {m['max_samples']} samples at most, skip-cache {m['cache'] or 'none'}
({m['cache_capacity']} rows), lr {m['lr']}, optimizer {m['optimizer']}. Everything the export
decided is in `export.json`.
"""
