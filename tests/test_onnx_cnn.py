"""edgetune.onnx on convolutional backbones: PyTorch CNN -> ONNX -> edgetune -> ONNX -> ONNX
Runtime with equal logits; fine-tuned CNNs (merged, and skip adapters as an added branch);
refusals by node name; hostile conv tensors."""
from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgetune as et
from edgetune.errors import ModelFileError, UsageError
from edgetune.nn.layers import Layer, LayerSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from edgetune.onnx import from_onnx, read_onnx, to_onnx  # noqa: E402
from edgetune.onnx.importer import OPS  # noqa: E402


def run_ort(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def ops_of(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def export_torch(model: nn.Module, shape: tuple[int, ...], path, *, fold: bool) -> None:
    """torch.onnx.export with a dynamic batch; ``fold=False`` keeps BatchNormalization nodes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, *shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}}, do_constant_folding=fold)


def randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


class InvertedResidual(nn.Module):
    """MobileNetV2's block at stride 1: 1x1 expansion, depthwise 3x3, 1x1 projection, + input."""

    def __init__(self, c: int, expand: int = 2, conv=nn.Conv2d, bn=nn.BatchNorm2d):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(conv(c, h, 1, bias=False), bn(h), nn.ReLU6(),
                                  conv(h, h, 3, padding=1, groups=h, bias=False), bn(h), nn.ReLU6(),
                                  conv(h, c, 1, bias=False), bn(c))

    def forward(self, x):
        return x + self.conv(x)


def cnn2d() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          InvertedResidual(8), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1, groups=4),
                          nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    return randomise_batchnorm(model, 1), (3, 16, 16)


def cnn1d() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2, groups=2), nn.BatchNorm1d(8), nn.LeakyReLU(0.01),
                          InvertedResidual(8, conv=nn.Conv1d, bn=nn.BatchNorm1d), nn.MaxPool1d(2),
                          nn.Conv1d(8, 6, 3, stride=2), nn.Sigmoid(), nn.AvgPool1d(2), nn.Flatten(),
                          nn.Linear(6 * 3, 3))
    return randomise_batchnorm(model, 3), (4, 32)


# ---------------------------------------------------------------------- PyTorch -> ONNX -> edgetune -> ONNX
@pytest.mark.parametrize("make", [cnn2d, cnn1d], ids=["conv2d", "conv1d"])
@pytest.mark.parametrize("fold", [True, False], ids=["bn-fused-by-torch", "bn-nodes"])
def test_pytorch_cnn_round_trip(tmp_path, make, fold):
    from edgetune.torch import from_torch

    model, shape = make()
    export_torch(model, shape, tmp_path / "torch.onnx", fold=fold)
    ops = ops_of(tmp_path / "torch.onnx")
    n_bn = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    # torch fuses a BatchNorm into the Conv before it when it folds constants; kept, edgetune folds it
    assert (ops.count("BatchNormalization") < n_bn) if fold else (ops.count("BatchNormalization") == n_bn)
    assert {"Conv", "Add", "MaxPool", "AveragePool"} <= set(ops)
    imp = read_onnx(tmp_path / "torch.onnx")
    bb = imp.backbone
    assert imp.input_shape == ["n", *shape] and bb.input_shape == shape
    # the same chain of layers as edgetune's PyTorch converter reads from the module itself
    assert bb.specs == from_torch(model, input_shape=shape).specs
    assert "add" in [s.kind for s in bb.specs] and any(s.groups > 1 for s in bb.specs)
    x = np.random.default_rng(0).normal(size=(23, *shape)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(tmp_path / "torch.onnx", x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), want, rtol=1e-5, atol=1e-5)
    out = to_onnx(bb, tmp_path / "back.onnx")
    np.testing.assert_allclose(run_ort(out, x), want, rtol=1e-5, atol=1e-5)
    back = from_onnx(out)                      # edgetune's own graph reads back bit for bit
    assert back.specs == bb.specs and back.digest() == bb.digest()


def test_reshape_after_global_pooling_and_flatten_after_a_conv(tmp_path):
    """GlobalAveragePool then Reshape to (N, C) is nothing; Reshape of a conv output to one row a flatten layer."""
    rng = np.random.default_rng(4)
    w1, b1 = rng.normal(size=(6, 2, 3)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w2, b2 = rng.normal(size=(6 * 5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    w3 = rng.normal(size=(3, 2)).astype(np.float32)
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "flat": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", auto_pad="VALID"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "flat"], ["f"], name="to_rows"),
             helper.make_node("MatMul", ["f", "w2"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="fc_bias")]
    path = _graph(tmp_path, nodes, inits, (2, 7))
    bb = from_onnx(path)
    assert [s.kind for s in bb.specs] == ["conv1d", "flatten", "dense"]
    x = rng.normal(size=(9, 2, 7)).astype(np.float32)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), run_ort(path, x), rtol=1e-5, atol=1e-5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", auto_pad="SAME_UPPER"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Reshape", ["p", "flat"], ["f"], name="squeeze"),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    inits["w3"] = rng.normal(size=(3, 6)).astype(np.float32)
    path = _graph(tmp_path, nodes, inits, (2, 7), name="gap.onnx")
    bb = from_onnx(path)
    assert [s.kind for s in bb.specs] == ["conv1d", "gap", "dense"] and bb.specs[0].padding == (1,)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), run_ort(path, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- fine-tuned CNNs in ONNX Runtime
def cnn_task(shape=(3, 16), n=90, classes=3, seed=0):
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    t = np.arange(shape[-1])
    x = r.normal(size=(n, *shape)) * 0.5
    x += np.sin(t * (y[:, None] + 1) * 0.4)[:, None, :]  # a class is a frequency
    return x.astype(np.float32), y


@pytest.mark.parametrize("method", ["lora-all", "skip2-lora", "skip-lora", "ft-all", "sparse"])
def test_fine_tuned_cnn_runs_in_ort_with_the_same_logits(tmp_path, method):
    x, y = cnn_task()
    arch = "conv:8:3:1:same,relu6,res(conv:8:3:1:1,relu),maxpool:2,conv:6:3,relu,flatten,dense:8,relu"
    bb, _ = et.pretrain(x, y, arch=arch, epochs=3, seed=0)
    opts = {"train_last_bias": True} if method.startswith("skip") else {}
    tuner = et.FineTuner(bb, method, rank=2, epochs=4, lr=0.05, seed=1, **opts).fit(x + 0.5, (y + 1) % 3)
    want = tuner.decision_function(x)
    assert not np.allclose(want, bb.forward(bb.prepare(x)), atol=1e-3)   # the fine-tune changed the model
    path = to_onnx(tuner, tmp_path / "t.onnx")
    np.testing.assert_allclose(run_ort(path, x), want, rtol=1e-5, atol=1e-5)
    ops = ops_of(path)
    if method.startswith("skip"):  # the earlier layers' adapters: pooled taps, an added branch
        assert ops.count("GlobalAveragePool") == 3 and "MatMul" in ops
        with pytest.raises(UsageError, match="branch"):
            from_onnx(path)
    else:  # merged: a plain backbone (conv LoRA folded into the conv weights)
        assert "MatMul" not in ops
        assert from_onnx(path).digest() == tuner.merged().digest()


def test_skip_adapters_on_a_cnn_ending_without_a_dense_layer(tmp_path):
    """conv -> ... -> gap as the last layer: no adapter folds, every one is a branch."""
    s0 = LayerSpec.conv((2, 12), 6, 3, padding=1, activation="relu")
    s1 = LayerSpec.pool("avg", s0.out_shape, 2)
    s2 = LayerSpec.conv(s1.out_shape, 3, 1)
    s3 = LayerSpec.gap(s2.out_shape)
    rng = np.random.default_rng(0)
    layers = [Layer(s0, rng.normal(size=s0.weight_shape).astype(np.float32), np.zeros(6, np.float32)), Layer(s1),
              Layer(s2, rng.normal(size=s2.weight_shape).astype(np.float32), np.zeros(3, np.float32)), Layer(s3)]
    bb = et.Backbone.from_layers(layers)
    x, y = cnn_task(shape=(2, 12), n=60)
    bb.fit_normalizer(x)
    tuner = et.FineTuner(bb, "skip2-lora", rank=2, epochs=5, lr=0.1, train_last_bias=True).fit(x, y)
    path = to_onnx(tuner, tmp_path / "gap.onnx")
    np.testing.assert_allclose(run_ort(path, x), tuner.decision_function(x), rtol=1e-5, atol=1e-5)
    assert ops_of(path).count("MatMul") == 4  # two adapters, two products each


# ---------------------------------------------------------------------- refusals
def _graph(tmp_path, nodes, inits, shape=(2, 8), name="g.onnx", out="y", opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (tmp_path / name).write_bytes(model.SerializeToString())
    return tmp_path / name


CW = {"w": np.ones((4, 2, 3), np.float32), "w2": np.ones((4, 4, 1), np.float32), "fc": np.ones((3, 4), np.float32),
      "w8": np.ones((4, 8, 1), np.float32),
      "lo": np.array(0, np.float32), "hi": np.array(1, np.float32)}
_GAP_FC = [helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
           helper.make_node("Flatten", ["p"], ["f"], name="flat"),
           helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]


@pytest.mark.parametrize("first,match", [
    ([helper.make_node("Conv", ["x", "w"], ["c"], name="dilated", dilations=[2])],
     r"node 'dilated' \(Conv\) has dilations \[2\]"),
    ([helper.make_node("Conv", ["x", "w"], ["c"], name="lopsided", pads=[1, 0])],
     r"node 'lopsided' \(Conv\) has asymmetric pads \[1, 0\]"),
    ([helper.make_node("Conv", ["x", "w"], ["c"], name="same_even", auto_pad="SAME_UPPER", strides=[2])],
     r"node 'same_even' \(Conv\) has auto_pad=SAME_UPPER, which pads axis 0 asymmetrically"),
    ([helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
      helper.make_node("Concat", ["a", "a"], ["c"], name="cat", axis=1)],
     "node 'cat' has op type Concat"),
    ([helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
      helper.make_node("MaxPool", ["a"], ["c"], name="pool_ceil", kernel_shape=[2], ceil_mode=1)],
     r"node 'pool_ceil' \(MaxPool\) has ceil_mode=1"),
    ([helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
      helper.make_node("AveragePool", ["a"], ["c"], name="avg_excl", kernel_shape=[3], pads=[1, 1])],
     r"node 'avg_excl' \(AveragePool\) pads \[1\] with count_include_pad=0"),
    ([helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
      helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip01")],
     r"node 'clip01' \(Clip\) clips to \[0.0, 1.0\]"),
    ([helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
      helper.make_node("Relu", ["a"], ["r"], name="relu"),
      helper.make_node("Conv", ["r", "w2"], ["b"], name="conv2"),
      helper.make_node("Add", ["b", "a"], ["c"], name="skip_add")],
     r"node 'skip_add' \(Add\) adds 'a', an earlier tensor of the data path that is not the input of an earlier "
     r"layer"),
    ([helper.make_node("Transpose", ["x"], ["t"], name="to_nlc", perm=[0, 2, 1]),
      helper.make_node("Conv", ["t", "w8"], ["c"], name="conv")],
     r"node 'conv' \(Conv\) reads the graph's input reordered"),
    ([helper.make_node("Conv", ["x", "w"], ["a"], name="conv", group=2)],
     r"node 'conv' \(Conv\) has group=2 and a weight of shape \[4, 2, 3\] for 2 input channels"),
])
def test_unsupported_conv_graphs_are_refused_by_name(tmp_path, first, match):
    with pytest.raises(UsageError, match=match) as e:
        from_onnx(_graph(tmp_path, first + _GAP_FC, CW))
    if "op type" in match:  # the list of what converts comes with it
        assert all(op in str(e.value) for op in OPS)


def test_the_refused_examples_convert_once_fixed(tmp_path):
    """The positive control of the refusals above: the same graph with dilation 1 converts."""
    path = _graph(tmp_path, [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1])] + _GAP_FC, CW)
    bb = from_onnx(path)
    x = np.random.default_rng(0).normal(size=(5, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), run_ort(path, x), rtol=1e-5, atol=1e-5)


def test_a_conv_bias_as_an_add_and_a_batchnorm_fold_into_the_conv(tmp_path):
    rng = np.random.default_rng(9)
    inits = {"w": rng.normal(size=(4, 2, 3)).astype(np.float32), "cb": rng.normal(size=(1, 4, 1)).astype(np.float32),
             "g": rng.uniform(0.5, 2, 4).astype(np.float32), "be": rng.normal(size=4).astype(np.float32),
             "mu": rng.normal(size=4).astype(np.float32), "var": rng.uniform(0.5, 2, 4).astype(np.float32),
             "fc": rng.normal(size=(3, 4)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1]),
             helper.make_node("Add", ["a", "cb"], ["ab"], name="conv_bias"),
             helper.make_node("BatchNormalization", ["ab", "g", "be", "mu", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["c"], name="relu")] + _GAP_FC
    path = _graph(tmp_path, nodes, inits)
    bb = from_onnx(path)
    assert [s.kind for s in bb.specs] == ["conv1d", "gap", "dense"]
    x = rng.normal(size=(6, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), run_ort(path, x), rtol=1e-5, atol=1e-5)
    inits["cb"] = rng.normal(size=(1, 4, 8)).astype(np.float32)  # varies along the length: not a bias
    with pytest.raises(UsageError, match=r"node 'conv_bias' \(Add\) adds a constant of shape \[1, 4, 8\]"):
        from_onnx(_graph(tmp_path, nodes, inits, name="nobias.onnx"))


def test_a_conv_weight_claiming_1e12_elements_is_refused_without_allocating(tmp_path):
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1_000_000, 1_000_000, 1], raw_data=b"\0" * 48)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv")] + _GAP_FC, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [huge, numpy_helper.from_array(CW["fc"], "fc")])
    path = tmp_path / "huge.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="'w' claims shape"):
            from_onnx(path)
        assert tracemalloc.get_traced_memory()[1] < 20 * 2 ** 20
    finally:
        tracemalloc.stop()
    # padding that would make a sample's output absurdly large: refused by arithmetic, by name
    path = _graph(tmp_path, [helper.make_node("Conv", ["x", "w"], ["c"], name="padded", pads=[10 ** 9] * 2)]
                  + _GAP_FC, CW, name="pads.onnx")
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match=r"node 'padded' \(Conv\) gives 8e\+09 values per sample"):
            from_onnx(path)
        assert tracemalloc.get_traced_memory()[1] < 20 * 2 ** 20
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- command line
def test_cli_imports_a_cnn_and_writes_its_fine_tune(tmp_path):
    import json
    import subprocess
    import sys

    model, shape = cnn1d()
    export_torch(model, shape, tmp_path / "cnn.onnx", fold=False)
    x, y = cnn_task(shape=shape, n=80)
    task = tmp_path / "task.npz"
    np.savez(task, x_pretrain=x, y_pretrain=y, x_finetune=x[:50] + 0.3, y_finetune=y[:50], x_test=x[50:] + 0.3,
             y_test=y[50:])
    run = (lambda *a: subprocess.run([sys.executable, "-m", "edgetune", *a], capture_output=True, text=True,
                                     timeout=300))
    r = run("import", str(tmp_path / "cnn.onnx"), "--out", str(tmp_path / "m"), "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["input_shape"] == ["n", *shape] and any(s.startswith("add") for s in rep["layers"])
    r = run("finetune", "--task", str(task), "--model", str(tmp_path / "m"), "--method", "skip2-lora",
            "--epochs", "3", "--quiet", "--save-adapter", str(tmp_path / "a"), "--onnx", str(tmp_path / "ft.onnx"))
    assert r.returncode == 0, r.stderr
    tuner = et.FineTuner.load_adapter(et.Backbone.load(tmp_path / "m"), tmp_path / "a")
    np.testing.assert_allclose(run_ort(tmp_path / "ft.onnx", x), tuner.decision_function(x), rtol=1e-5, atol=1e-5)


def test_clip_bounds_as_attributes_and_same_padding(tmp_path):
    """Clip's bounds as attributes (opset 10) and SAME_LOWER padding that pads both ends alike."""
    rng = np.random.default_rng(6)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32) * 2
    fc = rng.normal(size=(3, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", auto_pad="SAME_LOWER"),
             helper.make_node("Clip", ["a"], ["c"], name="relu6", min=0.0, max=6.0),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1)]
    path = _graph(tmp_path, nodes, {"w": w, "fc": fc, "fb": np.ones(3, np.float32)}, (2, 5, 6), opset=10)
    bb = from_onnx(path)
    assert bb.specs[0].padding == (1, 1) and bb.specs[0].activation == "relu6"
    x = rng.normal(size=(7, 2, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), run_ort(path, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_cnn_files_give_a_clear_error_or_a_valid_model(tmp_path, flips):
    """Bytes changed anywhere in a CNN graph: an edgetune error or a backbone, nothing else."""
    path = tmp_path / "cnn.onnx"
    if not path.exists():
        bb = et.Backbone.from_layers([
            Layer(s, np.full(s.weight_shape, 0.1, np.float32), np.zeros(s.bias_shape, np.float32))
            if s.has_params else Layer(s) for s in _small_cnn_specs()])
        to_onnx(bb, path)
    blob = bytearray(path.read_bytes())
    for pos, value in flips:
        blob[pos % len(blob)] = value
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(blob))
    try:
        from_onnx(bad)
    except (ModelFileError, UsageError):
        pass


def _small_cnn_specs() -> list[LayerSpec]:
    s0 = LayerSpec.conv((2, 8), 4, 3, padding=1, activation="relu6")
    s1 = LayerSpec.conv(s0.out_shape, 4, 3, padding=1, groups=4)
    s2 = LayerSpec.add(s1.out_shape, 1, activation="relu")
    s3 = LayerSpec.pool("avg", s2.out_shape, 3, 1, 1)
    s4 = LayerSpec.flatten(s3.out_shape)
    s5 = LayerSpec.dense(s4.out_features, 3)
    return [s0, s1, s2, s3, s4, s5]


def test_a_residual_mlp_converts_both_ways(tmp_path):
    """Add of an earlier dense layer's input: an add layer on flat rows, not only in CNNs."""
    rng = np.random.default_rng(8)
    inits = {"w1": rng.normal(size=(6, 5)).astype(np.float32), "w2": rng.normal(size=(6, 6)).astype(np.float32),
             "b2": rng.normal(size=6).astype(np.float32), "w3": rng.normal(size=(3, 6)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], name="fc1", transB=1),
             helper.make_node("Tanh", ["a"], ["h"], name="tanh"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["z"], name="fc2", transB=1),
             helper.make_node("Add", ["h", "z"], ["s"], name="residual"),
             helper.make_node("Gemm", ["s", "w3"], ["y"], name="fc3", transB=1)]
    path = _graph(tmp_path, nodes, inits, (5,))
    bb = from_onnx(path)
    assert [(s.kind, s.source) for s in bb.specs] == [("dense", -1), ("dense", -1), ("add", 1), ("dense", -1)]
    x = rng.normal(size=(11, 5)).astype(np.float32)
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), run_ort(path, x), rtol=1e-5, atol=1e-5)
    out = to_onnx(bb, tmp_path / "back.onnx")
    np.testing.assert_allclose(run_ort(out, x), run_ort(path, x), rtol=1e-5, atol=1e-5)
    assert from_onnx(out).digest() == bb.digest()


def test_a_residual_of_a_reordered_input_is_refused(tmp_path):
    """edgetune's first dense layer takes the input as stored (its columns permuted), so a residual
    of the Transposed input would add other values: refused by name."""
    inits = {"w1": np.ones((6, 6), np.float32), "w2": np.ones((3, 6), np.float32)}
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="swap", perm=[0, 2, 1]),
             helper.make_node("Flatten", ["t"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1"], ["z"], name="fc1", transB=1),
             helper.make_node("Add", ["z", "f"], ["s"], name="residual"),
             helper.make_node("Gemm", ["s", "w2"], ["y"], name="fc2", transB=1)]
    with pytest.raises(UsageError, match=r"node 'residual' \(Add\) adds the graph's input reordered"):
        from_onnx(_graph(tmp_path, nodes, inits, (2, 3)))
