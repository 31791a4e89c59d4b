"""The layer description every part reads: specs, backbones built on them, int8 as data,
model files of format 2 and of format 1 (written by earlier versions)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import ModelFileError, UsageError
from edgetune.nn.layers import LAYER_KINDS, OPS, Layer, LayerSpec, apply_layer, chain_specs, check_chain
from edgetune.quant import dequantize, quantize

from .conftest import small_backbone, toy_task


def test_dense_spec_derives_its_shapes_and_round_trips():
    s = LayerSpec.dense(7, 5, "relu")
    assert (s.kind, s.in_shape, s.out_shape, s.in_features, s.out_features) == ("dense", (7,), (5,), 7, 5)
    assert s.weight_shape == (5, 7) and s.bias_shape == (5,) and s.n_params == 40
    assert LayerSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.ops is OPS["dense"] and "dense" in LAYER_KINDS


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="conv9d", in_shape=(3,), out_channels=2), "unknown layer kind 'conv9d'"),
    (dict(kind="dense", in_shape=(0,), out_channels=2), "input shape must be whole numbers >= 1"),
    (dict(kind="dense", in_shape=(3,), out_channels=0), "at least one output channel"),
    (dict(kind="dense", in_shape=(3, 4), out_channels=2), "flat input"),
    (dict(kind="dense", in_shape=(3,), out_channels=2, kernel=(3,)), "no kernel"),
    (dict(kind="dense", in_shape=(3,), out_channels=2, groups=2), "no kernel, stride, padding or groups"),
    (dict(kind="dense", in_shape=(3,), out_channels=True), "out_channels must be a whole number"),
    (dict(kind="dense", in_shape="3", out_channels=2), "in_shape must be a list of whole numbers"),
    (dict(kind="dense", in_shape=(3,), out_channels=2, activation="swish"), "unknown activation 'swish'"),
])
def test_bad_specs_are_refused_by_name(kwargs, message):
    with pytest.raises(UsageError, match=message):
        LayerSpec(**kwargs)


def test_spec_from_file_form_checks_fields():
    with pytest.raises(UsageError, match=r"missing \['out_channels'\]"):
        LayerSpec.from_dict({"kind": "dense", "in_shape": [3]})
    with pytest.raises(UsageError, match=r"unexpected \['dilation'\]"):
        LayerSpec.from_dict({"kind": "dense", "in_shape": [3], "out_channels": 2, "dilation": 1})
    with pytest.raises(UsageError, match="must be an object"):
        LayerSpec.from_dict([1, 2])
    with pytest.raises(UsageError, match="layer 1 takes 4 inputs but layer 0 gives 5"):
        check_chain([LayerSpec.dense(3, 5), LayerSpec.dense(4, 2)])


def test_a_chain_of_layers_is_the_mlp_bit_for_bit():
    bb = small_backbone(sizes=(9, 8, 6, 3), dtype=np.float32, seed=2)
    x = np.random.default_rng(0).normal(size=(11, 9)).astype(np.float32)
    assert bb.specs == chain_specs([9, 8, 6, 3], "relu")
    h = x
    for layer in bb.layers:
        h = apply_layer(layer, h)
    np.testing.assert_array_equal(h, bb.forward(x))
    layers = [Layer(layer.spec, layer.weight.copy(), layer.bias.copy()) for layer in bb.layers]
    again = et.Backbone.from_layers(layers, labels=bb.labels)
    np.testing.assert_array_equal(again.forward(x), bb.forward(x))
    assert again.digest() == bb.digest()
    taps = bb.forward_taps(x)
    assert taps.shape == (11, sum(bb.in_widths) + 3)
    np.testing.assert_array_equal(taps[:, -3:], bb.forward(x))


def _old_digest(bb) -> str:
    """The backbone digest as edgetune computed it before layer descriptions (adapters record it)."""
    hsh = hashlib.blake2b(digest_size=16)
    hsh.update(json.dumps([bb.sizes, bb.activation.name, str(bb.dtype)]).encode())
    for a in (*bb.weights, *bb.biases, bb.input_mean, bb.input_std):
        hsh.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return hsh.hexdigest()


def test_an_mlp_keeps_the_digest_its_adapters_recorded():
    for sizes in ((9, 8, 6, 3), (5, 2)):
        bb = et.Backbone.build(sizes, activation="tanh", seed=1)
        assert bb.digest() == _old_digest(bb)


def _as_format_1(model_dir, *, int8: bool) -> None:
    """Rewrite a saved model's config.json as earlier versions wrote it (tensors unchanged)."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    old = {k: cfg[k] for k in ("sizes", "activation", "labels", "normalization", "weights_sha256")}
    if int8:
        old.update(format="edgetune-int8-backbone", format_version=1, quantization=cfg["quantization"])
    else:
        old.update(format="edgetune-backbone", format_version=1, dtype=cfg["dtype"])
    cfg_path.write_text(json.dumps(old))


def test_format_1_files_still_load(tmp_path):
    x, y = toy_task(n=40, d=7, classes=3, seed=4)
    bb = small_backbone(sizes=(7, 6, 5, 3), dtype=np.float32, seed=5).fit_normalizer(x)
    q = quantize(bb, x)
    xp = bb.prepare(x)
    for model, name in ((bb, "f"), (q, "q")):
        model.save(tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["format_version"] == 2 and cfg["layers"][0] == model.specs[0].to_dict()
        _as_format_1(tmp_path / name, int8=model.is_int8)
        back = et.Backbone.load(tmp_path / name)
        assert back.is_int8 == model.is_int8 and back.specs == model.specs
        assert back.digest() == model.digest()
        np.testing.assert_array_equal(back.forward(xp), model.forward(xp))


def test_a_newer_format_or_a_bad_layer_list_is_refused(tmp_path):
    bb = small_backbone(sizes=(7, 6, 3), dtype=np.float32)
    bb.save(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    good = json.loads(cfg_path.read_text())
    for edit, message in (({"format_version": 3}, "format version 3 is newer"),
                          ({"layers": "dense"}, "field 'layers' must be a list"),
                          ({"layers": [{"kind": "dense", "in_shape": [7], "out_channels": 6, "groups": 2},
                                       good["layers"][1]]}, "field 'layers': .*groups"),
                          ({"layers": good["layers"][:1]}, "no activation after it"),
                          ({"layers": [{**good["layers"][0], "activation": "identity"}]},
                           r"field 'sizes' \[7, 6, 3\] does not match")):
        cfg_path.write_text(json.dumps({**good, **edit}))
        with pytest.raises(ModelFileError, match=message):
            et.Backbone.load(tmp_path / "m")


def test_per_layer_activations_run_in_both_engines():
    rng = np.random.default_rng(3)
    specs = [LayerSpec.dense(4, 5, "relu"), LayerSpec.dense(5, 6, "tanh"), LayerSpec.dense(6, 2)]
    layers = [Layer(s, rng.normal(size=s.weight_shape).astype(np.float32),
                    rng.normal(size=s.bias_shape).astype(np.float32)) for s in specs]
    bb = et.Backbone.from_layers(layers)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    h1 = np.maximum(x @ layers[0].weight.T + layers[0].bias, 0)
    h2 = np.tanh(h1 @ layers[1].weight.T + layers[1].bias)
    np.testing.assert_allclose(bb.forward(x), h2 @ layers[2].weight.T + layers[2].bias, rtol=1e-5, atol=1e-6)
    assert not bb.is_plain_mlp()
    y = rng.integers(0, 2, 8)
    # the compiled engine runs the layer-wise and skip methods with each layer's own activation
    tuner = et.FineTuner(bb, "lora-all", epochs=2, engine="auto").fit(x, y)
    assert tuner.history_.summary()["engine"] == "c"
    ref = et.FineTuner(bb, "lora-all", epochs=2, engine="numpy").fit(x, y)
    np.testing.assert_allclose([e.loss for e in tuner.history_.epochs], [e.loss for e in ref.history_.epochs], rtol=1e-5)
    assert et.FineTuner(bb, "skip2-lora", epochs=2).fit(x, y).history_.summary()["engine"] == "c"


def test_int8_is_data_on_the_same_backbone():
    x, y = toy_task(n=40, d=7, classes=3, seed=4)
    bb = small_backbone(sizes=(7, 6, 5, 3), dtype=np.float32, seed=5).fit_normalizer(x)
    q = quantize(bb, x)
    assert type(q) is et.Backbone and q.is_int8 and not bb.is_int8
    assert q.weights == [None, None, None] and all(layer.quant.qweight.dtype == np.int8 for layer in q.layers)
    assert q.specs == bb.specs and q.sizes == bb.sizes and q.dtype == np.float32
    assert not dequantize(q).is_int8
    for name in ("ft-all", "lora-all", "ft-bias"):
        with pytest.raises(UsageError, match="skip2-lora"):
            et.FineTuner(q, name, epochs=1).fit(x, y)
    with pytest.raises(UsageError, match="already int8"):
        quantize(q, x)
