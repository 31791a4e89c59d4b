"""MobileNetV2-class networks: the compiled engine's layer limit, the zoo's inverted-residual
blocks through from_torch, and the tiny-training memory benchmark on a small network."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.errors import UsageError
from edgetune.nn.arch import parse_arch
from edgetune.nn.layers import Layer

pytestmark = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

#: 3 + 13 x 3 + 2 = 44 layers: a stem, 13 residual depthwise-pointwise blocks, gap, classifier.
DEEP = "conv:8:3:1:same,relu6," + "res(dwconv:3:1:1,relu6,conv:8:1)," * 13 + "gap,dense:3"


def _deep_backbone(shape=(3, 12), seed=0) -> et.Backbone:
    rng = np.random.default_rng(seed)
    specs = parse_arch(DEEP, shape, 3)
    layers = [Layer(s, (rng.normal(size=s.weight_shape) * 0.3).astype(np.float32),
                    (rng.normal(size=s.bias_shape) * 0.1).astype(np.float32)) if s.has_params else Layer(s)
              for s in specs]
    return et.Backbone.from_layers(layers)


def _task(shape, n=30, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += 0.8 * y[:, None]
    return x, y


def test_the_limit_comes_from_c():
    lib = core.load()
    lib.et_max_layers.restype = __import__("ctypes").c_int32
    assert core.MAX_LAYERS == lib.et_max_layers() >= 80  # a MobileNetV2 imported layer by layer: about 65
    assert len(core.Backbone().layers) == core.MAX_LAYERS


@pytest.mark.parametrize("method,kw", [("ft-all", {}), ("sparse", {"scheme": "b6,w20:1/2,w-1"}),
                                       ("skip2-lora", {"rank": 2})])
def test_a_40_layer_cnn_trains_in_c_as_in_numpy(method, kw):
    bb = _deep_backbone()
    assert 40 < bb.n_layers <= core.MAX_LAYERS and sum(s.kind == "add" for s in bb.specs) == 13
    x, y = _task((3, 12))
    fits = []
    for engine in ("numpy", "c"):
        t = et.FineTuner(bb, method, engine=engine, epochs=3, batch_size=4, lr=0.02, seed=0, **kw).fit(x, y)
        assert t.history_.engine == engine
        fits.append(t)
    a, b = fits
    la, lb = ([e.loss for e in t.history_.epochs] for t in fits)
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    assert la[-1] < la[0]
    np.testing.assert_allclose(b.method.params.flat, a.method.params.flat, rtol=1e-4, atol=1e-6)


def test_a_backbone_above_the_limit_is_refused_naming_the_limit():
    n = core.MAX_LAYERS + 1
    arch = ",".join(["dense:4,relu"] * (n - 1))  # parse_arch adds the classifier
    bb = et.Backbone.from_layers([Layer(s, np.full(s.weight_shape, 0.1, np.float32), np.zeros(s.bias_shape, np.float32))
                                  for s in parse_arch(arch, (5,), 3)])
    assert bb.n_layers == n
    x, y = np.ones((6, 5), np.float32), np.arange(6) % 3
    with pytest.raises(UsageError, match=f"at most {core.MAX_LAYERS} layers \\(this backbone has {n}\\)"):
        et.FineTuner(bb, "ft-last", engine="c", epochs=1).fit(x, y)
    # engine="auto" runs it on the NumPy engine instead
    assert et.FineTuner(bb, "ft-last", engine="auto", epochs=1).fit(x, y).history_.engine == "numpy"


torch = pytest.importorskip("torch")


def test_from_torch_of_the_zoos_inverted_residual_blocks():
    from edgetune.torch import from_torch
    from edgetune.torch.zoo import NETWORKS, InvertedResidual, build

    model = build("mbv2-w0.35", classes=5, blocks=4).eval()  # stem, 4 blocks (one residual), last conv
    assert sum(isinstance(m, InvertedResidual) and m.residual for m in model.modules()) == 1
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 13
    bb = from_torch(model, input_shape=(3, 32, 32))
    kinds = [s.kind for s in bb.specs]
    assert kinds.count("conv2d") == 13 and kinds.count("add") == 1 and kinds[-2:] == ["gap", "dense"]
    assert any(s.groups > 1 and s.groups == s.in_shape[0] for s in bb.specs)   # depthwise
    assert {s.activation for s in bb.specs} == {"relu6", "identity"}           # BatchNorm folded
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(bb.forward(x.numpy().reshape(3, -1)), ref, atol=1e-4, rtol=1e-4)
    assert set(NETWORKS) == {"mbv2-w0.35", "mcunet-5fps", "proxyless-w0.3"}
    with pytest.raises(UsageError, match="unknown network"):
        build("resnet50")


def test_the_memory_table_on_a_small_network(tmp_path):
    from benchmarks.tiny_training_memory import FULL_INT8, measure, table, write_section

    rows = measure("mbv2-w0.35", 32, blocks=4)
    assert [r.method.split("[")[0] for r in rows] == ["ft-all", "sparse", "skip2-lora", "sparse", FULL_INT8.split("[")[0]]
    assert [r.backbone for r in rows] == ["float32"] * 3 + ["int8"] * 2
    full, sparse, skip, q, q_full = rows
    # the int8 network's full update trains every value the float one does, in less RAM than the
    # float full update (int8 codes kept, weights in flash) and more than its sparse update
    assert q_full.trainable == full.trainable
    assert q.device_arena < q_full.device_arena < full.device_arena
    # the fused update: no gradient vector, its largest tensor's gradient instead (the skip adapters keep theirs)
    assert full.device_arena < full.device_two_phase and sparse.device_arena < sparse.device_two_phase
    assert skip.device_arena == skip.device_two_phase
    assert 0 < full.device_two_phase - full.device_arena < 4 * full.params  # P floats gone, one tensor back
    assert q.method == sparse.method and q.numpy_plan is None and q.flash_weights > 0
    assert full.trainable == full.params > sparse.trainable > 0 and skip.trainable > 0
    # the sparse update needs less than the full update, in both planners
    assert sparse.numpy_plan < full.numpy_plan and sparse.device_arena < full.device_arena
    # the NumPy planner against tracemalloc (tests/test_memory_cnn.py holds it to 10%)
    assert all(abs(r.numpy_plan - r.numpy_measured) <= 0.1 * r.numpy_measured for r in rows[:3])
    assert full.flash_weights == 0 < sparse.flash_weights
    # the device's total is its arena plus the target's stack and statics
    assert all(r.device_total - r.device_arena == 4096 + 1536 for r in rows)
    # PyTorch's full update holds at least the parameters and their gradients
    assert full.torch_measured >= 8 * full.params and sparse.torch_measured is None
    text = table(rows, 32, "cmd")
    assert "2,939 (full update)" in text and "141 (sparse + reordering, int8)" in text
    assert f"| {full.device_two_phase / 1024:,.0f} -> {full.device_arena / 1024:,.0f} |" in text
    assert "2,939" not in table(rows, 32, "cmd", comparable=False)  # the paper's figures: its networks only
    doc = tmp_path / "budgets.md"
    doc.write_text("# Budgets\n\nbefore\n")
    write_section(text, doc)
    write_section(text.replace("cmd", "cmd2"), doc)  # regenerated in place, not appended
    got = doc.read_text()
    assert got.count("tiny-training-memory: start") == 1 and "cmd2" in got and "before" in got
