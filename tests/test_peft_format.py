"""LoRA adapters in PEFT's layout: written without torch, read back, and loaded by PEFT."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import ModelFileError, UsageError
from edgetune.peft_format import read_peft_adapter
from edgetune.safetensors import load_file, save_file

from .conftest import toy_task

# PEFT pulls in huggingface_hub: never let a test reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"


def tuned(method="lora-all", rank=2, alpha=None, train_last_bias=False, seed=0):
    x, y = toy_task(n=60, d=7, classes=3, seed=seed)
    bb, _ = et.pretrain(x, y, hidden=[6, 5], epochs=3, seed=seed)
    xf, yf = toy_task(n=60, d=7, classes=3, seed=seed + 1, shift=0.5)
    t = et.FineTuner(bb, method, rank=rank, alpha=alpha, train_last_bias=train_last_bias, epochs=5,
                     lr=0.05, seed=seed).fit(xf, yf)
    return bb, t, xf


def test_file_layout_matches_peft(tmp_path):
    bb, t, _ = tuned("lora-all", rank=2, alpha=3)
    t.save_adapter(tmp_path, format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] is None
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 3 and cfg["bias"] == "none"
    assert cfg["target_modules"] == ["0", "2", "4"] and cfg["fan_in_fan_out"] is False
    assert cfg["use_dora"] is False and cfg["use_rslora"] is False and cfg["lora_dropout"] == 0.0
    tensors, meta = load_file(tmp_path / "adapter_model.safetensors")
    assert meta["format"] == "pt" and meta["edgetune_base_model_digest"] == bb.digest()
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in "024" for ab in "AB"}
    sizes = bb.sizes
    for k, n in enumerate("024"):
        assert tensors[f"base_model.model.{n}.lora_A.weight"].shape == (2, sizes[k])
        assert tensors[f"base_model.model.{n}.lora_B.weight"].shape == (sizes[k + 1], 2)
    np.testing.assert_array_equal(tensors["base_model.model.2.lora_B.weight"],
                                  t.method.params["layers.1.lora_B"])


def test_reference_safetensors_reads_it(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    _, t, _ = tuned("lora-last", train_last_bias=True)
    t.save_adapter(tmp_path, format="peft")
    ref = st.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(ref) == {"base_model.model.4.lora_A.weight", "base_model.model.4.lora_B.weight",
                        "base_model.model.4.base_layer.bias"}


@pytest.mark.parametrize("method", ["lora-all", "lora-last"])
@pytest.mark.parametrize("rank, alpha", [(1, None), (2, 5.0), (2, 0.5)])
@pytest.mark.parametrize("train_last_bias", [False, True])
def test_round_trip_through_peft_files(tmp_path, method, rank, alpha, train_last_bias):
    bb, t, x = tuned(method, rank, alpha, train_last_bias)
    t.save_adapter(tmp_path, format="peft")
    back = et.FineTuner.load_adapter(bb, tmp_path)
    assert back.method_name == method
    for k, v in t.method.params.values.items():
        if k == "head.bias_delta":  # stored as the whole bias: (b + d) - b, to rounding
            np.testing.assert_allclose(back.method.params[k], v, atol=1e-6)
        else:
            np.testing.assert_array_equal(back.method.params[k], v)
    np.testing.assert_allclose(back.decision_function(x), t.decision_function(x), rtol=1e-5, atol=1e-6)


def test_default_format_is_unchanged(tmp_path):
    _, t, _ = tuned("lora-all")
    t.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format"] == "edgetune-adapter"


@pytest.mark.parametrize("method", ["skip-lora", "skip2-lora", "ft-all", "ft-last", "ft-bias"])
def test_methods_without_a_peft_equivalent_are_refused(tmp_path, method):
    bb = et.Backbone.build([4, 3, 2])
    with pytest.raises(UsageError, match="PEFT equivalent"):
        et.FineTuner(bb, method).save_adapter(tmp_path, format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


def test_unknown_format(tmp_path):
    with pytest.raises(UsageError, match="format"):
        et.FineTuner(et.Backbone.build([4, 3, 2]), "lora-all").save_adapter(tmp_path, format="onnx")


def test_strict_refuses_another_backbone(tmp_path):
    bb, t, _ = tuned("lora-all")
    t.save_adapter(tmp_path, format="peft")
    other = bb.copy()
    other.weights[0][0, 0] += 1
    with pytest.raises(ModelFileError, match="different backbone"):
        et.FineTuner.load_adapter(other, tmp_path)
    et.FineTuner.load_adapter(other, tmp_path, strict=False)


def edit(tmp_path, config=None, tensors=None):
    if config:
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg.update(config)
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        t, meta = load_file(tmp_path / "adapter_model.safetensors")
        tensors(t)
        save_file(t, tmp_path / "adapter_model.safetensors", meta)


@pytest.mark.parametrize("config, tensors, match", [
    ({"use_dora": True}, None, "use_dora"),
    ({"rank_pattern": {"2": 4}}, None, "rank_pattern"),
    ({"peft_type": "IA3"}, None, "only PEFT LoRA"),
    ({"r": 3}, None, "expected"),
    (None, lambda t: t.pop("base_model.model.2.lora_B.weight"), "only one of"),
    (None, lambda t: [t.pop(f"base_model.model.2.lora_{ab}.weight") for ab in "AB"], r"\(lora-all\) or"),
    (None, lambda t: t.update({"base_model.model.0.base_layer.bias": np.ones(6, np.float32)}), "bias of layer '0'"),
    (None, lambda t: t.update({"base_model.model.9.lora_A.weight": np.ones((2, 6), np.float32)}), "cannot place"),
    (None, lambda t: t["base_model.model.0.lora_A.weight"].fill(np.nan), "NaN"),
])
def test_unsupported_or_damaged_peft_adapters(tmp_path, config, tensors, match):
    bb, t, _ = tuned("lora-all")
    t.save_adapter(tmp_path, format="peft")
    edit(tmp_path, config, tensors)
    with pytest.raises(ModelFileError, match=match):
        et.FineTuner.load_adapter(bb, tmp_path)


def test_rslora_scale_is_translated(tmp_path):
    bb, t, x = tuned("lora-last", rank=2, alpha=2)
    t.save_adapter(tmp_path, format="peft")
    edit(tmp_path, {"use_rslora": True})
    info = read_peft_adapter(tmp_path, bb)
    assert info["alpha"] / info["rank"] == pytest.approx(2 / np.sqrt(2))  # alpha / sqrt(r)


# ------------------------------------------------------------------ with PEFT itself
def peft_and_torch():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    return torch, peft


@pytest.mark.parametrize("method", ["lora-all", "lora-last"])
@pytest.mark.parametrize("train_last_bias", [False, True])
def test_peft_loads_edgetune_adapters_with_the_same_outputs(tmp_path, method, train_last_bias):
    torch, peft = peft_and_torch()
    from edgetune.torch import to_torch

    bb, t, x = tuned(method, rank=2, alpha=3, train_last_bias=train_last_bias)
    t.save_adapter(tmp_path, format="peft")
    model = peft.PeftModel.from_pretrained(to_torch(bb), str(tmp_path))
    got = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, t.decision_function(x), rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(merged(torch.from_numpy(x)).detach().numpy(), t.decision_function(x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets, bias, method", [
    (["0", "2", "4"], "none", "lora-all"),
    (["4"], "lora_only", "lora-last"),
])
def test_edgetune_loads_adapters_trained_by_peft(tmp_path, targets, bias, method):
    torch, peft = peft_and_torch()
    from edgetune.torch import to_torch

    bb, _, x = tuned("lora-all")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, bias=bias)
    model = peft.get_peft_model(to_torch(bb), cfg)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(tmp_path))
    back = et.FineTuner.load_adapter(bb, tmp_path)
    assert back.method_name == method and back.method.options.train_last_bias == (bias != "none")
    want = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(back.decision_function(x), want, rtol=1e-5, atol=1e-5)
