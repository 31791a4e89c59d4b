"""edgetune.onnx: ONNX import and export of MLPs, checked against ONNX Runtime; refusals and
hostile files."""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgetune as et
from edgetune.errors import ModelFileError, UsageError

from .conftest import small_backbone, toy_task

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgetune.onnx import from_onnx, read_onnx, to_onnx  # noqa: E402
from edgetune.onnx.importer import OPS  # noqa: E402

ACTS = ["relu", "leaky_relu", "tanh", "sigmoid", "identity"]


def run_ort(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def same_backbone(a: et.Backbone, b: et.Backbone) -> bool:
    return a.digest() == b.digest() and a.labels == b.labels


def normalized(sizes=(7, 6, 5, 3), activation="relu", dtype=np.float32, seed=0) -> et.Backbone:
    bb = small_backbone(sizes=sizes, activation=activation, dtype=dtype, seed=seed)
    return bb.fit_normalizer(np.random.default_rng(seed).normal(2.0, 3.0, size=(50, sizes[0])))


# ---------------------------------------------------------------------- edgetune -> ONNX -> edgetune
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backbone_round_trip_is_exact_and_ort_agrees(tmp_path, activation, dtype):
    bb = normalized(activation=activation, dtype=dtype)
    bb.labels = ["a", "b", "c"]
    path = to_onnx(bb, tmp_path / "m.onnx")
    back = from_onnx(path)
    assert same_backbone(bb, back)                       # weights, normalisation and labels, bit for bit
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(33, 7)).astype(dtype)
    np.testing.assert_allclose(run_ort(path, x), bb.forward(bb.prepare(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["skip2-lora", "skip-lora", "lora-all", "lora-last", "ft-all", "ft-bias"])
def test_fine_tuned_model_runs_in_ort_with_the_same_logits(tmp_path, method):
    x, y = toy_task(n=80, d=7, classes=3, seed=3, shift=1.5)
    bb = normalized()
    tuner = et.FineTuner(bb, method, rank=2, epochs=15, lr=0.05, train_last_bias=method.startswith("skip"),
                         seed=1).fit(x, y)
    path = to_onnx(tuner, tmp_path / "t.onnx")
    got, want = run_ort(path, x), tuner.decision_function(x)
    assert not np.allclose(want, bb.forward(bb.prepare(x)), atol=1e-3)  # the adapter changed the model
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if method.startswith("skip"):  # adapters on earlier layers' inputs: an added branch, not a fold
        assert "MatMul" in ops
        with pytest.raises(UsageError, match="residual|branch"):
            from_onnx(path)
    else:
        assert same_backbone(from_onnx(path), tuner.merged())


@pytest.mark.parametrize("method", ["skip2-lora", "sparse"])
def test_int8_backbone_is_a_qdq_graph_with_the_same_logits(tmp_path, method):
    from edgetune.quant import quantize

    x, y = toy_task(n=120, d=7, classes=3, seed=4)
    bb, _ = et.pretrain(x, y, hidden=[16, 8], epochs=30, seed=0)
    q = quantize(bb, bb.prepare(x))
    path = to_onnx(q, tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 3 and "Gemm" not in ops
    got, want = run_ort(path, x), q.forward(q.prepare(x))
    # The same integers: ONNX Runtime's rounding may differ from edgetune's at exact ties only.
    last = q.layers[-1].quant
    step = float(np.max(last.input_scale * last.wscale)) * 2
    assert np.max(np.abs(got - want)) <= step
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    opts = {"train_last_bias": True} if method == "skip2-lora" else {}
    tuner = et.FineTuner(q, method, epochs=10, lr=0.05, **opts).fit(x, (y + 1) % 3)
    assert not np.allclose(tuner.decision_function(x), want, atol=1e-3)
    path = to_onnx(tuner, tmp_path / "qt.onnx")
    got, want = run_ort(path, x), tuner.decision_function(x)
    assert np.max(np.abs(got - want)) <= step + 1e-5
    with pytest.raises(UsageError, match="QuantizeLinear"):  # a QDQ graph is for deployment, not import
        from_onnx(path)


# ---------------------------------------------------------------------- PyTorch -> ONNX -> edgetune -> ONNX
torch_act = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "leaky_relu": "LeakyReLU"}


@pytest.mark.parametrize("activation", list(torch_act))
@pytest.mark.parametrize("flatten", [False, True])
def test_pytorch_round_trip(tmp_path, activation, flatten):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    act = getattr(nn, torch_act[activation])
    layers = [nn.Linear(12, 10), act(), nn.Linear(10, 8), act(), nn.Dropout(0.2), nn.Linear(8, 4)]
    model = nn.Sequential(*([nn.Flatten()] if flatten else []), *layers).eval()
    shape = (3, 2, 6) if flatten else (3, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(tmp_path / "torch.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    bb = from_onnx(tmp_path / "torch.onnx")
    assert bb.sizes == [12, 10, 8, 4] and bb.activation.name == activation
    x = np.random.default_rng(0).normal(size=(25, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bb.forward(bb.prepare(x.reshape(25, -1))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_ort(tmp_path / "torch.onnx", x), want, rtol=1e-5, atol=1e-6)
    out = to_onnx(bb, tmp_path / "back.onnx")
    np.testing.assert_allclose(run_ort(out, x.reshape(25, -1)), want, rtol=1e-5, atol=1e-6)


def test_pytorch_batchnorm_is_folded(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        for bn in (model[0], model[2]):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n) * 2)
            bn.running_var.copy_(torch.rand(n) * 3 + 0.1)
            bn.weight.copy_(torch.randn(n))
            bn.bias.copy_(torch.randn(n))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 12),), str(tmp_path / "bn.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}}, do_constant_folding=False)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "bn.onnx")).graph.node}
    bb = from_onnx(tmp_path / "bn.onnx")
    assert bb.sizes == [12, 10, 3] and bb.input_mean is not None
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(30, 12)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bb.forward(bb.prepare(x)), want, rtol=1e-4, atol=1e-5)
    bad = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.BatchNorm1d(10), nn.Linear(10, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bad, (torch.randn(4, 12),), str(tmp_path / "bad.onnx"), dynamo=False,
                          do_constant_folding=False)
    with pytest.raises(UsageError, match="BatchNormalization.*follows an activation"):
        from_onnx(tmp_path / "bad.onnx")


# ---------------------------------------------------------------------- Keras-style graphs
def _keras_graph(tmp_path, *, nhwc=(4, 3, 2), softmax=True, name="keras.onnx", perm=(0, 3, 1, 2), norm=True):
    """What tf2onnx writes for Normalization -> Flatten -> Dense(relu) -> Dense(softmax) on an NHWC
    input, with the Transpose to NCHW a conv model would need at the start; MatMul + Add, no Gemm."""
    rng = np.random.default_rng(5)
    h, w, c = nhwc
    d = h * w * c
    w1, b1 = rng.normal(size=(d, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w2, b2 = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    mean, std = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, size=c).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"),
                                                            (mean, "mean"), (std, "std"),
                                                            (np.array([-1, d], np.int64), "shape"))]
    nodes = []
    x = "input_1"
    if norm:  # per-channel: broadcasts over the last (channel) axis of NHWC
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"], name="normalization/sub"),
                  helper.make_node("Div", ["centred", "std"], ["scaled"], name="normalization/truediv")]
        x = "scaled"
    nodes += [
        helper.make_node("Transpose", [x], ["nchw"], name="transpose_to_nchw", perm=list(perm)),
        helper.make_node("Reshape", ["nchw", "shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "W1"], ["mm1"], name="dense/MatMul"),
        helper.make_node("Add", ["mm1", "B1"], ["z1"], name="dense/BiasAdd"),
        helper.make_node("Relu", ["z1"], ["h1"], name="dense/Relu"),
        helper.make_node("MatMul", ["h1", "W2"], ["mm2"], name="dense_1/MatMul"),
        helper.make_node("Add", ["B2", "mm2"], ["logits"], name="dense_1/BiasAdd"),
    ]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="dense_1/Softmax", axis=-1))
        out = "probs"
    graph = helper.make_graph(nodes, "keras", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", h, w, c])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["unk__0", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="tf2onnx")
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("nhwc,perm", [((4, 3, 2), (0, 3, 1, 2)), ((1, 1, 24), (0, 3, 1, 2)), ((4, 3, 2), (0, 1, 2, 3))])
def test_keras_style_graph_imports(tmp_path, nhwc, perm):
    path = _keras_graph(tmp_path, nhwc=nhwc, perm=perm)
    imp = read_onnx(path)
    bb = imp.backbone
    assert bb.sizes == [24, 6, 3] and bb.input_mean is not None
    assert imp.input_shape == ["unk__0", *nhwc] and any("Softmax" in n for n in imp.notes)
    x = np.random.default_rng(2).normal(size=(40, *nhwc)).astype(np.float32)
    probs = run_ort(path, x)
    logits = bb.forward(bb.prepare(x.reshape(40, -1)))   # the sample as stored (NHWC), flattened
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), probs, rtol=1e-4, atol=1e-6)
    # and back out: the exported graph reproduces the original's logits
    np.testing.assert_allclose(run_ort(to_onnx(bb, tmp_path / "out.onnx"), x.reshape(40, -1)), logits,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- refusals
def _graph(tmp_path, nodes, inits, out="y", d=4, name="g.onnx", opset=17, inputs=None):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(tmp_path / name))
    return tmp_path / name


W = {"W": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32), "W2": np.ones((2, 3), np.float32),
     "b2": np.zeros(2, np.float32)}


@pytest.mark.parametrize("nodes,match", [
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("Gelu", ["h"], ["a"], name="act1"),
      helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1)],
     "node 'act1' has op type Gelu"),
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("FusedThing", ["h"], ["y"], name="custom", domain="com.example")],
     "node 'custom' has op type FusedThing of domain 'com.example'"),
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("Relu", ["h"], ["a"], name="r"),
      helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
      helper.make_node("Relu", ["y"], ["y2"], name="last_relu")],
     "outputs are"),
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("Relu", ["h"], ["a"], name="r"),
      helper.make_node("Add", ["a", "h"], ["s"], name="residual"),
      helper.make_node("Gemm", ["s", "W2", "b2"], ["y"], name="fc2", transB=1)],
     r"node 'residual' \(Add\) .*residual"),
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("LeakyRelu", ["h"], ["a"], name="lr", alpha=0.2),
      helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1)],
     "alpha=0.2"),
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("Relu", ["h"], ["a"], name="r"),
      helper.make_node("Tanh", ["a"], ["t"], name="t"),
      helper.make_node("Gemm", ["t", "W2", "b2"], ["y"], name="fc2", transB=1)],
     "right after another activation"),
    ([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
      helper.make_node("Mul", ["h", "b"], ["m"], name="scale_hidden"),
      helper.make_node("Gemm", ["m", "W2", "b2"], ["y"], name="fc2", transB=1)],
     "Mul after the first layer"),
])
def test_unsupported_graphs_are_refused_by_name(tmp_path, nodes, match):
    path = _graph(tmp_path, nodes, W, out=nodes[-1].output[0] if "outputs" not in match else "y")
    with pytest.raises(UsageError, match=match) as e:
        from_onnx(path)
    if "op type" in match:  # the list of what converts comes with it
        assert all(op in str(e.value) for op in OPS)


def test_activation_after_the_last_layer_is_refused(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
             helper.make_node("Sigmoid", ["h"], ["y"], name="out_sigmoid")]
    with pytest.raises(UsageError, match="out_sigmoid.*follows the last layer"):
        from_onnx(_graph(tmp_path, nodes, W))


def test_import_cli_refuses_before_writing(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
             helper.make_node("Concat", ["h", "h"], ["y"], name="concat0", axis=1)]
    path = _graph(tmp_path, nodes, W)
    r = subprocess.run([sys.executable, "-m", "edgetune", "import", str(path), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "node 'concat0' has op type Concat" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------- hostile files
def test_truncated_files_are_refused_cleanly(tmp_path):
    blob = (to_onnx(normalized(sizes=(30, 20, 3)), tmp_path / "m.onnx")).read_bytes()
    bad = tmp_path / "cut.onnx"
    for cut in sorted({1, 2, 7, 16, 40, 100, 500, 1000, 2000, len(blob) // 2, len(blob) - 200, len(blob) - 40,
                       len(blob) - 3, len(blob) - 1}):
        bad.write_bytes(blob[:cut])
        with pytest.raises((ModelFileError, UsageError)):
            from_onnx(bad)
    bad.write_bytes(b"")
    with pytest.raises(ModelFileError, match="no ONNX graph"):
        from_onnx(bad)
    with pytest.raises(ModelFileError, match="not found"):
        from_onnx(tmp_path / "nowhere.onnx")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_bytes_give_a_clear_error_or_a_valid_model(tmp_path, flips):
    """Bytes changed anywhere in a valid file: an edgetune error or a backbone, nothing else."""
    path = tmp_path / "m.onnx"
    if not path.exists():
        to_onnx(normalized(sizes=(9, 6, 3), activation="tanh"), path)
    blob = bytearray(path.read_bytes())
    for pos, value in flips:
        blob[pos % len(blob)] = value
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(blob))
    try:
        from_onnx(bad)
    except (ModelFileError, UsageError):
        pass


def _one_layer(tmp_path, weight: TensorProto, name="h.onnx"):
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [weight])
    path = tmp_path / name
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def test_a_tensor_claiming_1e12_elements_is_refused_without_allocating(tmp_path):
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1_000_000, 1_000_000], raw_data=b"\0" * 48)
    t2 = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3, 1_000_000_000_000 // 3], float_data=[0.0] * 12)
    for k, tensor in enumerate((t, t2)):
        path = _one_layer(tmp_path, tensor, f"huge{k}.onnx")
        tracemalloc.start()
        try:
            with pytest.raises(ModelFileError, match="claims shape"):
                from_onnx(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20 * 2 ** 20
    # an input claiming 10^12 features per sample: refused before anything is sized by it
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"], name="flat")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10 ** 6, 10 ** 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    wide = tmp_path / "wide.onnx"
    wide.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match="1e\\+12 features"):
            from_onnx(wide)
        assert tracemalloc.get_traced_memory()[1] < 20 * 2 ** 20
    finally:
        tracemalloc.stop()
    # a tensor whose bytes are fewer than its shape claims
    t3 = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3, 4], raw_data=b"\0" * 47)
    with pytest.raises(ModelFileError, match="48 bytes.*47"):
        from_onnx(_one_layer(tmp_path, t3, "short.onnx"))


def _external(tmp_path, location: str, *, offset=0, length=None) -> TensorProto:
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3, 4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), *((("length", str(length)),) if length else ())):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def test_external_data_is_read_only_inside_the_models_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    (folder / "weights.bin").write_bytes(b"\0" * 8 + w.tobytes())
    (tmp_path / "secret.bin").write_bytes(w.tobytes())
    good = _one_layer(folder, _external(folder, "weights.bin", offset=8, length=48), "ok.onnx")
    np.testing.assert_array_equal(from_onnx(good).weights[0], w)          # the positive control
    for loc in ("../secret.bin", str(tmp_path / "secret.bin"), "sub/../../secret.bin"):
        with pytest.raises(ModelFileError, match="outside the model's folder"):
            from_onnx(_one_layer(folder, _external(folder, loc), "escape.onnx"))
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        from_onnx(_one_layer(folder, _external(folder, "link.bin"), "link.onnx"))
    with pytest.raises(ModelFileError, match="truncated"):
        from_onnx(_one_layer(folder, _external(folder, "weights.bin", offset=40), "short.onnx"))
    with pytest.raises(ModelFileError, match="not a file"):
        from_onnx(_one_layer(folder, _external(folder, "missing.bin"), "missing.onnx"))


# ---------------------------------------------------------------------- command line
def test_cli_import_finetune_evaluate_onnx(tmp_path, data_dir):
    x, y = toy_task(n=90, d=7, classes=3, seed=8)
    task = tmp_path / "task.npz"
    np.savez(task, x_pretrain=x, y_pretrain=y, x_finetune=x[:60] + 1.0, y_finetune=y[:60], x_test=x[60:] + 1.0,
             y_test=y[60:])
    bb, _ = et.pretrain(x, y, hidden=[8], epochs=20)
    to_onnx(bb, tmp_path / "pre.onnx")
    cli = [sys.executable, "-m", "edgetune"]
    run = (lambda *a: subprocess.run([*cli, *a], capture_output=True, text=True, timeout=300))
    r = run("import", str(tmp_path / "pre.onnx"), "--out", str(tmp_path / "m"), "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["sizes"] == [7, 8, 3]
    assert same_backbone(et.Backbone.load(tmp_path / "m"), bb)
    r = run("import", str(tmp_path / "pre.onnx"), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "--force" in r.stderr
    r = run("finetune", "--task", str(task), "--model", str(tmp_path / "m"), "--method", "skip2-lora", "--epochs", "5",
            "--quiet", "--save-adapter", str(tmp_path / "a"), "--onnx", str(tmp_path / "ft.onnx"))
    assert r.returncode == 0, r.stderr
    r = run("evaluate", "--task", str(task), "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "a"),
            "--onnx", str(tmp_path / "ev.onnx"), "--quiet")
    assert r.returncode == 0, r.stderr
    tuner = et.FineTuner.load_adapter(bb, tmp_path / "a")
    for f in ("ft.onnx", "ev.onnx"):
        np.testing.assert_allclose(run_ort(tmp_path / f, x), tuner.decision_function(x), rtol=1e-5, atol=1e-5)
    r = run("finetune", "--task", str(task), "--model", str(tmp_path / "m"), "--onnx", str(tmp_path / "m"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_missing_extra_is_named(tmp_path):
    code = ("import sys; sys.modules['onnx'] = None\n"
            "import edgetune.onnx as o\n"
            "try:\n    o.from_onnx('x.onnx')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "MissingExtraError" in r.stdout and "pip install edgetune[onnx]" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import edgetune, edgetune.cli, sys; "
                        "print(any(m == 'onnx' or m.startswith('onnx.') for m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False"  # the core never imports it
