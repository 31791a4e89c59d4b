"""The training-memory model of convolutional backbones against what real steps allocate."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune.errors import UsageError
from edgetune.memory import candidates, measure_memory, plan_memory, sparse_schemes
from edgetune.methods import method_class
from edgetune.methods.base import MethodOptions
from edgetune.nn.layers import Layer, LayerSpec, call_bytes

from .conftest import DATA_DIR

def _net(specs: list[LayerSpec], seed: int = 0) -> et.Backbone:
    rng = np.random.default_rng(seed)
    layers = []
    for s in specs:
        if s.has_params:
            bound = 1 / np.sqrt(np.prod(s.weight_shape[1:]))
            layers.append(Layer(s, rng.uniform(-bound, bound, s.weight_shape).astype(np.float32),
                                rng.uniform(-bound, bound, s.out_channels).astype(np.float32)))
        else:
            layers.append(Layer(s))
    return et.Backbone.from_layers(layers)


def cnn1d() -> list[LayerSpec]:
    """har-raw-like: conv, max pooling, a strided conv, flatten, dense."""
    c1 = LayerSpec.conv((6, 128), 16, 5, padding=2, activation="relu")
    p1 = LayerSpec.pool("max", c1.out_shape, 2)
    c2 = LayerSpec.conv(p1.out_shape, 16, 3, stride=2, padding=1, activation="relu")
    fl = LayerSpec.flatten(c2.out_shape)
    return [c1, p1, c2, fl, LayerSpec.dense(fl.out_features, 16, "relu"), LayerSpec.dense(16, 4)]


def dwres() -> list[LayerSpec]:
    """An inverted-residual block: depthwise and pointwise convolutions, a residual add, avg pooling, gap."""
    c1 = LayerSpec.conv((6, 128), 16, 3, padding=1, activation="relu")
    dw = LayerSpec.conv(c1.out_shape, 16, 3, padding=1, groups=16, activation="relu6")
    pw = LayerSpec.conv(dw.out_shape, 16, 1)
    add = LayerSpec.add(pw.out_shape, 1, "relu")
    ap = LayerSpec.pool("avg", add.out_shape, 2)
    gap = LayerSpec.gap(ap.out_shape)
    return [c1, dw, pw, add, ap, gap, LayerSpec.dense(16, 4)]


def cnn2d() -> list[LayerSpec]:
    c1 = LayerSpec.conv((3, 16, 16), 8, 3, padding=1, activation="relu")
    p1 = LayerSpec.pool("max", c1.out_shape, 2)
    c2 = LayerSpec.conv(p1.out_shape, 16, 3, stride=2, activation="relu")
    gap = LayerSpec.gap(c2.out_shape)
    return [c1, p1, c2, gap, LayerSpec.dense(16, 4)]


NETS = {"cnn1d": cnn1d, "dwres": dwres, "cnn2d": cnn2d}
METHODS = [("ft-all", None), ("ft-last", None), ("ft-bias", None), ("lora-all", None), ("lora-last", None),
           ("skip-lora", None), ("skip2-lora", None), ("sparse", None), ("sparse", "b1"),
           ("sparse", "w0:1/2,w1"), ("sparse", "b3,w-1")]
RNG = np.random.default_rng(0)
_BACKBONES: dict[str, tuple[et.Backbone, np.ndarray, np.ndarray]] = {}


def backbone(name: str) -> tuple[et.Backbone, np.ndarray, np.ndarray]:
    if name not in _BACKBONES:
        bb = _net(NETS[name]())
        x = RNG.normal(size=(60,) + bb.input_shape).astype(np.float32)
        bb.fit_normalizer(x)
        _BACKBONES[name] = (bb, bb.prepare(x), RNG.integers(0, 4, 60))
    return _BACKBONES[name]


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    """NumPy's first calls of some functions import modules and build tables (hundreds of KB that
    tracemalloc would count in the first step measured): make them once before measuring."""
    bb, x, y = backbone("dwres")
    for method, scheme in METHODS:
        measure_memory(bb, method, x[:4], y[:4], batch_size=2, scheme=scheme)


@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize("method,scheme", METHODS, ids=[f"{m}-{s or ''}" for m, s in METHODS])
@pytest.mark.parametrize("net", list(NETS))
def test_plan_matches_measurement(net, method, scheme, batch):
    bb, x, y = backbone(net)
    n = max(len(x), 2 * batch)  # two full batches of cache misses: the skip-cache's worst step
    x, y = np.resize(x, (n, x.shape[1])), np.resize(y, n)
    plan = plan_memory(bb, method, batch_size=batch, n_samples=n, scheme=scheme)
    got = measure_memory(bb, method, x, y, batch_size=batch, scheme=scheme)
    arrays = got["arrays"]
    # Persistent arrays: exact.
    assert plan.frozen_weights == arrays["frozen_weights"]
    assert plan.weight_copies == arrays["weight_copies"]
    assert plan.trainable == arrays["trainable"] and plan.gradients == arrays["gradients"]
    assert plan.optimizer_state == arrays["optimizer"] and plan.snapshot == arrays["snapshot"]
    assert plan.cache_bytes == arrays["cache"]
    # The whole step, the Python objects of each layer's calls included: within 10% of the
    # tracemalloc peak at batch 1 (where those objects are much of it) as at batch 20.
    assert abs(plan.total - got["peak"]) <= 0.10 * got["peak"], (plan.total, got["peak"])


@pytest.mark.parametrize("net", list(NETS))
def test_trainable_counts_are_the_methods_own(net):
    from edgetune.methods import make_method
    from edgetune.methods.sparse import SparseOptions, SparseUpdate

    bb, _, _ = backbone(net)
    for method, scheme in METHODS:
        plan = plan_memory(bb, method, scheme=scheme)
        m = SparseUpdate(bb, SparseOptions(scheme=scheme or "b2,w-1")) if method == "sparse" else \
            make_method(method, bb)
        assert plan.n_trainable == m.params.flat.size  # what the memory holds (skip: A as one block)
        if not method.startswith("skip"):
            assert plan.n_trainable == method_class(method).count_trainable(bb.specs, MethodOptions(scheme=scheme))


def test_call_bytes_follow_the_operations():
    """The per-kind bytes of one call against tracemalloc, operation by operation (20 rows)."""
    import tracemalloc

    rng = np.random.default_rng(1)
    specs = cnn1d() + dwres() + cnn2d()
    for spec in specs:
        h = rng.normal(size=(20, spec.in_features)).astype(np.float32)
        g = rng.normal(size=(20, spec.out_features)).astype(np.float32)
        w = rng.normal(size=spec.weight_shape).astype(np.float32) if spec.has_params else None
        calls = {"forward": lambda: spec.ops.forward(spec, h, w, residual=h if spec.kind == "add" else None),
                 "input_grad": lambda: spec.ops.input_grad(spec, g, w, h)}
        if spec.has_params:
            calls["weight_grad"] = lambda: spec.ops.weight_grad(spec, h, g)
        for call, run in calls.items():
            run()  # warm
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            r = run()
            held, peak = (v - base for v in tracemalloc.get_traced_memory())
            tracemalloc.stop()
            del r
            want = call_bytes(spec, call, 20)
            # Within 20% and 8 KB: NumPy's reductions and iterators (gap's mean, the window
            # scatter's buffers) add a few KB the model states only roughly.
            assert abs(want.out - held) <= 0.1 * held + 2048, (spec.describe(), call, want, held)
            assert abs(want.peak - peak) <= 0.2 * peak + 8192, (spec.describe(), call, want, peak)


def test_schemes_count_the_layers_with_weights():
    bb, _, _ = backbone("dwres")   # 7 layers, 4 with weights
    names = {c.plan.scheme for c in candidates(bb, budget=10 ** 9) if c.plan.method == "sparse"}
    assert len(names) == len(sparse_schemes(4)) == 5 * 5 ** 4 - 1
    with pytest.raises(UsageError, match="names layer 4"):
        plan_memory(bb, "sparse", scheme="w4")


def test_candidates_of_a_cnn_are_float_and_fit_or_not():
    bb, _, _ = backbone("cnn1d")
    cands = candidates(bb, budget=200_000, batch_size=[20, 1], n_samples=100)
    assert all(c.plan.backbone == "float32" and c.plan.cache != "int8" for c in cands)
    assert {c.fits for c in cands} == {True, False}
    assert all(c.fits == (c.plan.total <= 200_000) for c in cands)


def test_int8_cnn_is_refused_clearly():
    bb, _, _ = backbone("cnn1d")
    with pytest.raises(UsageError, match="int8 backbones of dense layers only"):
        plan_memory(bb, "skip-lora", int8=True)
    with pytest.raises(UsageError, match="int8 skip-cache"):
        plan_memory(bb, "skip2-lora", cache="int8")


# ---------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def fan_cnn(tmp_path_factory, private_cache):
    """A small 1-D CNN for damage1-1d's spectra (1, 512) -> 2, saved as a model directory."""
    from edgetune.data.task import load_task
    from edgetune.nn.arch import build_layers, parse_arch

    d = tmp_path_factory.mktemp("plan-cnn")
    task = load_task("damage1-1d", DATA_DIR)
    specs = parse_arch("conv:4:9:4:4,relu,maxpool:2,conv:8:5:2:2,relu,gap,dense:8,relu", (1, 512), 2)
    bb = et.Backbone.from_layers(build_layers(specs, seed=0), labels=task.labels)
    bb.fit_normalizer(task.x_pretrain[:200])
    bb.save(d / "m")
    return d


def test_plan_command_on_a_cnn(fan_cnn, capsys):
    import json

    from edgetune.cli import main

    out = fan_cnn / "p.json"
    assert main(["plan", "--model", str(fan_cnn / "m"), "--budget", "256KB", "--samples", "100", "--quiet",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "conv1d" in text and "recommended:" in text
    res = json.loads(out.read_text())
    assert res["fits"] and all(f["total"] <= 256 * 1024 for f in res["fits"])
    assert all(f["backbone"] == "float32" for f in res["fits"])
    bb = et.Backbone.load(fan_cnn / "m")
    for f in res["fits"]:
        if f["method"] not in ("sparse", "skip-lora", "skip2-lora"):
            assert f["trainable_params"] == method_class(f["method"]).count_trainable(bb.specs, MethodOptions())


def test_plan_command_fine_tunes_the_best_cnn_candidates(fan_cnn, capsys):
    from edgetune.cli import main

    assert main(["plan", "--model", str(fan_cnn / "m"), "--budget", "1MB", "--task", "damage1-1d", "--data-dir",
                 str(DATA_DIR), "--epochs", "1", "--evaluate", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "acc (1 ep)" in text and "run it: edgetune finetune --task damage1-1d" in text


def test_finetune_budget_on_a_cnn(fan_cnn, capsys):
    from edgetune.cli import main

    args = ["finetune", "--task", "damage1-1d", "--data-dir", str(DATA_DIR), "--model", str(fan_cnn / "m"),
            "--method", "lora-last", "--epochs", "1", "--quiet"]
    assert main(args + ["--budget", "20KB"]) == 1
    assert "over by" in capsys.readouterr().err
    assert main(args + ["--budget", "1MB"]) == 0
