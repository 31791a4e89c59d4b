"""LoRA adapters in Hugging Face PEFT's file layout (NumPy only: safetensors + JSON).

A ``lora-all`` or ``lora-last`` adapter saved here loads with
``peft.PeftModel.from_pretrained(edgetune.torch.to_torch(backbone), path)`` and gives the
model edgetune fine-tuned; a PEFT LoRA adapter trained on that ``nn.Sequential`` (or on
any model with the same Linear layers under the same names) loads back into edgetune.

Layout, as PEFT writes it for an ``nn.Sequential`` whose Linear layers are "0", "2", ...:

- ``adapter_model.safetensors``: ``base_model.model.<name>.lora_A.weight`` (r, in) and
  ``base_model.model.<name>.lora_B.weight`` (out, r) per targeted layer; with
  ``bias="lora_only"`` also ``base_model.model.<name>.base_layer.bias`` (the whole bias,
  not a delta) for every targeted layer. Metadata: ``format: pt``, plus edgetune's
  method name and backbone digest so ``FineTuner.load_adapter`` can check the pairing.
- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha`` (scale alpha/r,
  as in edgetune), ``target_modules`` (the layer names), ``bias``, ``fan_in_fan_out:
  false`` (weights are (out, in) as in ``nn.Linear``), ``task_type: null``, and the
  other LoraConfig fields at their defaults.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ModelFileError, UsageError
from .nn.layers import lora_specs
from .nn.mlp import Backbone

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
PEFT_METHODS = ("lora-all", "lora-last")


def default_module_names(backbone: Backbone | int) -> list[str]:
    """Names of the layers in ``edgetune.torch.to_torch(backbone)``: an MLP's Linear layers
    are "0", "2", ... of an ``nn.Sequential``; any other backbone's layer k is "layers.k"."""
    if isinstance(backbone, int):
        return [str(2 * k) for k in range(backbone)]
    if backbone.is_plain_mlp():
        return [str(2 * k) for k in range(backbone.n_layers)]
    return [f"layers.{k}" for k in range(backbone.n_layers)]


def _names(backbone: Backbone, module_names: Sequence[str] | None) -> list[str]:
    names = default_module_names(backbone) if module_names is None else [str(n) for n in module_names]
    if len(names) != backbone.n_layers or len(set(names)) != len(names):
        raise UsageError(f"module_names must give {backbone.n_layers} distinct names (one per layer), got {names}")
    return names


def _check_target_modules(targets: Any, names: list[str], lora_layers: list[int], cfg_path: Path) -> None:
    """The layers the config's ``target_modules`` names must be the layers the tensors adapt
    (a list of names, matched as PEFT does: the whole name or its last dotted parts; or a
    regular expression over the whole name). 'all-linear' and a missing field are not checked."""
    import re

    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            named = [k for k, n in enumerate(names) if re.fullmatch(targets, n)]
        except re.error as e:
            raise ModelFileError(f"{cfg_path}: target_modules {targets!r} is not a regular expression ({e})") from None
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        named = [k for k, n in enumerate(names) if any(n == t or n.endswith("." + t) for t in targets)]
    else:
        raise ModelFileError(f"{cfg_path}: target_modules must be a list of layer names or a regular expression, "
                             f"got {json.dumps(targets)[:60]}")
    if named != lora_layers:
        raise ModelFileError(f"{cfg_path}: target_modules {json.dumps(targets)[:60]} names the layers "
                             f"{[names[k] for k in named]}, but the adapter's tensors adapt "
                             f"{[names[k] for k in lora_layers]}")


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def peft_files(method: Any, *, module_names: Sequence[str] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
    """(tensors, adapter_config, safetensors metadata) of a ``lora-all``/``lora-last`` method."""
    if getattr(method, "name", None) not in PEFT_METHODS:
        raise UsageError(
            f"only {' and '.join(PEFT_METHODS)} adapters have a PEFT equivalent, not {getattr(method, 'name', method)!r}: "
            f"skip adapters connect layers PEFT's LoRA cannot (save them in edgetune's format), and "
            f"ft-* methods change the backbone itself (save merged() or to_torch(merged()))")
    bb: Backbone = method.backbone
    names = _names(bb, module_names)
    t = method.adapter_tensors()
    opts = method.options
    targeted = [k for k in range(bb.n_layers) if f"layers.{k}.lora_A" in t]
    tensors: dict[str, np.ndarray] = {}
    for k in targeted:
        tensors[f"{PREFIX}{names[k]}.lora_A.weight"] = t[f"layers.{k}.lora_A"]
        tensors[f"{PREFIX}{names[k]}.lora_B.weight"] = t[f"layers.{k}.lora_B"]
    bias = "none"
    if "head.bias_delta" in t:
        # PEFT has no bias delta: with bias="lora_only" it saves (and trains) the whole bias
        # of every targeted layer; only the last one differs from the backbone here.
        bias = "lora_only"
        last = bb.n_layers - 1
        for k in targeted:
            b = bb.biases[k] + t["head.bias_delta"] if k == last else bb.biases[k]
            tensors[f"{PREFIX}{names[k]}.base_layer.bias"] = np.ascontiguousarray(b, dtype=bb.dtype)
    alpha = opts.alpha if opts.alpha is not None else opts.rank
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": int(opts.rank), "lora_alpha": _number(alpha), "lora_dropout": 0.0,
        "target_modules": [names[k] for k in targeted], "exclude_modules": None, "fan_in_fan_out": False,
        "bias": bias, "lora_bias": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    metadata = {"format": "pt", "edgetune_method": method.name, "edgetune_base_model_digest": bb.digest(),
                "edgetune_base_model_sizes": json.dumps(bb.sizes)}
    return tensors, config, metadata


def save_peft_adapter(method: Any, path: str | os.PathLike, *,
                      module_names: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT-loadable adapter directory for a ``lora-all``/``lora-last`` method
    (an existing adapter or model at ``path`` only with ``overwrite``)."""
    from .io_atomic import json_text, write_dir_atomic
    from .safetensors import dumps

    tensors, config, metadata = peft_files(method, module_names=module_names)
    return write_dir_atomic(path, {ADAPTER_WEIGHTS: dumps(tensors, metadata),
                                   ADAPTER_CONFIG: json_text(config).encode()}, overwrite=overwrite)


def read_peft_adapter(path: str | os.PathLike, backbone: Backbone, *,
                      module_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Read a PEFT LoRA adapter for ``backbone`` into edgetune's terms.

    Returns ``{"method", "rank", "alpha", "train_last_bias", "tensors", "digest"}`` with
    tensors named as ``lora-all``/``lora-last`` name them; ``digest`` is the backbone digest
    recorded by edgetune, or None for adapters written by PEFT itself. Raises
    ModelFileError for what edgetune's LoRA cannot represent (DoRA, per-layer ranks, a
    subset of layers other than all or the last, changed biases of hidden layers, ...).
    """
    from .safetensors import load_file

    from .io_atomic import read_json_config

    path = Path(path)
    cfg, cfg_path, w_path = read_json_config(path, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "a PEFT adapter")
    if cfg.get("peft_type") != "LORA":
        raise ModelFileError(f"{cfg_path}: only PEFT LoRA adapters are supported "
                             f"(peft_type {cfg.get('peft_type')!r})")
    unsupported = [k for k, ok in (
        ("use_dora", not cfg.get("use_dora")), ("fan_in_fan_out", not cfg.get("fan_in_fan_out")),
        ("lora_bias", not cfg.get("lora_bias")), ("modules_to_save", not cfg.get("modules_to_save")),
        ("rank_pattern", not cfg.get("rank_pattern")), ("alpha_pattern", not cfg.get("alpha_pattern")),
        ("bias", cfg.get("bias", "none") in ("none", "lora_only", "all")),
    ) if not ok]
    if unsupported:
        raise ModelFileError(f"{cfg_path}: PEFT options edgetune's LoRA does not support: "
                             + ", ".join(f"{k}={cfg.get(k)!r}" for k in unsupported))
    try:
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{cfg_path}: bad or missing r / lora_alpha ({e})") from None
    if r < 1 or not math.isfinite(alpha) or alpha <= 0:
        raise ModelFileError(f"{cfg_path}: r must be >= 1 and lora_alpha > 0, got r={r}, lora_alpha={alpha}")
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); edgetune by alpha/r
    tensors, meta = load_file(w_path)
    names = _names(backbone, module_names)
    last, dtype = backbone.n_layers - 1, backbone.dtype
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    lora_layers = []
    delta = None
    for k, name in enumerate(names):
        ka, kb = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        if (ka in tensors) != (kb in tensors):
            raise ModelFileError(f"{w_path}: layer '{name}' has only one of lora_A / lora_B")
        if ka in tensors:
            pair = lora_specs(backbone.specs[k], r)
            if pair is None:
                raise ModelFileError(f"{w_path}: layer '{name}' ({backbone.specs[k].kind}"
                                     f"{', grouped' if backbone.specs[k].groups > 1 else ''}) takes no LoRA adapter "
                                     f"in edgetune")
            for key, shape in ((ka, pair[0].weight_shape), (kb, pair[1].weight_shape)):
                if tensors[key].dtype.kind != "f":
                    raise ModelFileError(f"{w_path}: '{key}' holds {tensors[key].dtype} values; LoRA tensors are "
                                         f"floating point")
                if tensors[key].shape != shape:
                    raise ModelFileError(f"{w_path}: '{key}' has shape {list(tensors[key].shape)}, "
                                         f"expected {list(shape)} for this backbone with r={r}")
            out[f"layers.{k}.lora_A"] = tensors[ka].astype(dtype)
            out[f"layers.{k}.lora_B"] = tensors[kb].astype(dtype)
            used |= {ka, kb}
            lora_layers.append(k)
        for key in (f"{PREFIX}{name}.base_layer.bias", f"{PREFIX}{name}.bias"):
            if key not in tensors:
                continue
            used.add(key)
            b = tensors[key]
            if backbone.biases[k] is None or b.shape != backbone.biases[k].shape:
                if backbone.biases[k] is None:
                    raise ModelFileError(f"{w_path}: '{key}': layer '{name}' has no bias")
                raise ModelFileError(f"{w_path}: '{key}' has shape {list(b.shape)}, expected {list(backbone.biases[k].shape)}")
            d = b.astype(dtype) - backbone.biases[k]
            if k == last:
                delta = d
            elif np.any(d):
                raise ModelFileError(f"{w_path}: the adapter changes the bias of layer '{name}'; edgetune's "
                                     f"LoRA methods train only the last layer's bias")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ModelFileError(f"{w_path}: tensors edgetune cannot place on this backbone {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''} (expected layer names {names}; "
                             f"edgetune.torch.to_torch(backbone) names its Linear layers so)")
    from .methods import method_class

    every = [k for k, p in enumerate(method_class("lora-all").layer_plans(backbone.specs, r)) if p.lora]
    final = [k for k, p in enumerate(method_class("lora-last").layer_plans(backbone.specs, r)) if p.lora]
    if lora_layers == every and meta.get("edgetune_method") != "lora-last":
        method = "lora-all"
    elif lora_layers == final:
        method = "lora-last"
    else:
        raise ModelFileError(f"{w_path}: LoRA on layers {[names[k] for k in lora_layers]}; edgetune's LoRA "
                             f"methods put adapters on the layers {[names[k] for k in every]} (lora-all) or "
                             f"{[names[k] for k in final]} (lora-last)")
    _check_target_modules(cfg.get("target_modules"), names, lora_layers, cfg_path)
    train_last_bias = delta is not None
    if train_last_bias:
        out["head.bias_delta"] = delta
    for key, v in out.items():
        if not np.all(np.isfinite(v)):
            raise ModelFileError(f"{w_path}: tensor for '{key}' contains NaN or inf")
    return {"method": method, "rank": r, "alpha": alpha, "train_last_bias": train_last_bias,
            "tensors": out, "digest": meta.get("edgetune_base_model_digest")}
