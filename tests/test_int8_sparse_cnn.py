"""The sparse update with Quantization-Aware Scaling on int8 CNNs: the gradients of the
trained int8 rows and biases against finite differences of the straight-through graph (QAS
= the float gradient scaled by the unit^-2), the pruned backward pass against the full one,
the compiled engine against NumPy (1-D, 2-D, depthwise, residual; sgd, momentum, adam)."""
from __future__ import annotations

import numpy as np
import pytest

import edgetune as et
from edgetune import core
from edgetune.methods.sparse import SparseOptions, SparseUpdate
from edgetune.nn.arch import build_layers, parse_arch
from edgetune.quant import quantize

needs_c = pytest.mark.skipif(not core.available(), reason=f"compiled engine: {core.unavailable_reason()}")

#: (architecture, one sample's input shape); parse_arch adds the head (dense to the classes).
ARCHS = {
    # weighted: 0 conv (the add's source), 1 depthwise, 2 pointwise, 3 grouped strided conv, 4 dense, 5 head
    "1d-residual": ("conv:8:3:1:same,relu6,res(dwconv:3:1:1,relu6,conv:8:1),maxpool:2,conv:6:3:2:1:2,relu,gap,"
                    "dense:6,relu", (3, 20)),
    # weighted: 0 conv2d (stride 2, padding 1), 1 conv2d in a residual, 2 dense after flatten, 3 head
    "2d": ("conv:6:3:2:1,relu,res(conv:6:3:1:1,relu),maxpool:2,flatten,dense:5,relu", (2, 11, 9)),
    # weighted: 0 strided padded conv, 1 conv, 2 dense, 3 head; average pooling, identity between convs
    "1d-flatten": ("conv:4:5:2:2,relu,avgpool:3:1,conv:4:3,flatten,dense:5,relu", (2, 17)),
    # as above with average pooling: max pooling of int8 values has ties, where the loss has no
    # derivative to take by finite differences
    "1d-residual-avg": ("conv:8:3:1:same,relu6,res(dwconv:3:1:1,relu6,conv:8:1),avgpool:2,conv:6:3:2:1:2,relu,gap,"
                        "dense:6,relu", (3, 20)),
    "2d-avg": ("conv:6:3:2:1,relu,res(conv:6:3:1:1,relu),avgpool:2,flatten,dense:5,relu", (2, 11, 9)),
}


def _int8(name: str, n: int = 45, classes: int = 3, seed: int = 1):
    arch, shape = ARCHS[name]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += (0.8 * y).reshape(-1, *([1] * (len(shape) - 1)))
    bb = et.Backbone.from_layers(build_layers(parse_arch(arch, shape, classes), seed=seed)).fit_normalizer(x)
    return quantize(bb, x), x, y


def _forward(m: SparseUpdate, xp: np.ndarray, ids: np.ndarray, g: np.ndarray) -> None:
    m.params.grad[...] = 0
    m.forward(xp, ids)
    m.backward(g)


def _ste_loss(m: SparseUpdate, xp: np.ndarray, g: np.ndarray):
    """L(W, b) = sum(g * logits) of the method's graph from its first trained layer, in float64:
    the weights and biases as dequantised floats, each int8 rounding of an activation replaced
    by the fixed offset the method's own forward pass applied there, and a constant where that
    pass's gradient stops (the clip, a ReLU at 0). Its exact gradient is the straight-through one."""
    bb = m.backbone
    n, first = bb.n_layers, m.first
    kept: dict[int, np.ndarray] = {}
    m._start_generic(xp, kept)
    hs = [None if h is None else h.astype(np.float64) for h in m._kept]
    src0 = {k: v.astype(np.float64) for k, v in kept.items()}

    def run(W, B, base=None):
        h, src, a0 = hs[first], dict(src0), {}
        for k in range(first, n):
            spec = bb.specs[k]
            if k in m._sources:
                src[k] = h
            z = spec.ops.forward(spec, h, W.get(k), residual=src[spec.source] if spec.kind == "add" else None)
            if spec.has_params:
                z = spec.ops.add_bias(spec, z, B[k])
            a = spec.act.forward(z)
            if k == n - 1:
                return float(np.sum(g * a)), a0
            target = hs[k + 1]
            top = 127.0 * np.float32(bb.layers[k + 1].quant.input_scale)
            live = np.ones_like(target)
            spec.act.grad_mul(live, target)
            live = (live != 0) & (target < top) & (target > -top)
            a0[k + 1] = a
            h = target if base is None else np.where(live, a + (target - base[k + 1]), target)
        raise AssertionError

    W = {k: m._weight(k).astype(np.float64) for k in range(first, n) if bb.specs[k].has_params}
    B = {k: m._bias_generic(k).astype(np.float64) for k in range(first, n) if bb.specs[k].has_params}
    _, base = run(W, B)
    return lambda W, B: run(W, B, base)[0], W, B


@pytest.mark.parametrize("name,scheme", [("1d-residual-avg", "w0:1/4,b1"), ("1d-residual-avg", "w1,b3"),
                                         ("2d-avg", "w0:1/2,b2"), ("2d-avg", "w1:1/2,w2:1/8"),
                                         ("1d-flatten", "b2,w1:1/4")])
def test_qas_gradients_are_the_float_gradients_scaled(name, scheme):
    """d/dWq with QAS = dL/dW / s_W and d/dbq = dL/db / (s_x s_W) per output channel (without QAS:
    times the unit), dL/dW and dL/db by central differences of the straight-through graph."""
    q, x, y = _int8(name, n=9)
    xp, ids = q.prepare(x), np.arange(9)
    g = np.random.default_rng(5).normal(size=(9, 3)).astype(np.float32)
    grads = {}
    for qas in (True, False):
        m = SparseUpdate(q, SparseOptions(scheme=scheme, qas=qas))
        _forward(m, xp, ids, g)
        grads[qas] = {k: v.copy() for k, v in m.params.grads.items()}
    loss, W, B = _ste_loss(m, xp, g)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name_, gq in grads[True].items():
        k = int(name_.split(".")[1])
        tensor = W if name_.endswith("weight") else B
        unit = m.w_unit[k] if name_.endswith("weight") else m.b_unit[k]
        unit = unit[:gq.shape[0]].reshape((-1,) + (1,) * (gq.ndim - 1)).astype(np.float64)
        flat = np.ravel_multi_index(np.indices(gq.shape).reshape(gq.ndim, -1), tensor[k].shape)
        pick = rng.choice(flat.size, size=min(flat.size, 24), replace=False)
        numeric = np.empty(pick.size)
        for j, i in enumerate(flat[pick]):
            old = tensor[k].flat[i]
            tensor[k].flat[i] = old + eps
            lp = loss(W, B)
            tensor[k].flat[i] = old - eps
            lm = loss(W, B)
            tensor[k].flat[i] = old
            numeric[j] = (lp - lm) / (2 * eps)
        dense = np.broadcast_to(unit, gq.shape).ravel()[pick]
        scale = np.abs(numeric).max() + 1e-12
        np.testing.assert_allclose(gq.ravel()[pick], numeric / dense, atol=2e-4 * scale / dense.min(), rtol=2e-3)
        np.testing.assert_allclose(grads[False][name_].ravel()[pick], numeric * dense, atol=2e-4 * scale * dense.max(),
                                   rtol=2e-3)
        assert np.abs(numeric).max() > 0, f"{name_}: no gradient reaches this tensor"


@pytest.mark.parametrize("name,scheme", [("1d-residual", "w0:1/4"), ("1d-residual", "w1:1/2,b2"),
                                         ("2d", "w0:1/4,w1:1/2"), ("1d-flatten", "w1:1/8,b1")])
def test_pruned_backward_equals_the_full_backward_on_the_trained_tensors(name, scheme):
    """The pruned pass (trained rows only, nothing below the first trained layer) gives the same
    gradients as a pass that trains every row and bias from that layer on."""
    q, x, _ = _int8(name, n=11)
    xp, ids = q.prepare(x), np.arange(11)
    g = np.random.default_rng(2).normal(size=(11, 3)).astype(np.float32)
    m = SparseUpdate(q, SparseOptions(scheme=scheme))
    weighted = q.tap_layers
    first_w = weighted.index(m.first)
    full = ",".join([f"b{len(weighted) - first_w}"] + [f"w{i}" for i in range(first_w, len(weighted))])
    f = SparseUpdate(q, SparseOptions(scheme=full))
    assert f.first == m.first
    _forward(m, xp, ids, g)
    _forward(f, xp, ids, g)
    np.testing.assert_array_equal(f.predict_logits(xp), m.predict_logits(xp))
    for tname, gv in m.params.grads.items():
        ref = f.params.grads[tname][:gv.shape[0]]
        np.testing.assert_allclose(gv, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert all(m._kept[k] is None for k in range(m.first))


def test_frozen_int8_tensors_stay_and_the_merged_model_is_int8():
    q, x, y = _int8("1d-residual")
    before = [(layer.quant.qweight.copy(), layer.quant.qbias.copy()) for layer in q.layers]
    t = et.FineTuner(q, "sparse", scheme="w0:1/4,b2", epochs=3, batch_size=8, lr=0.05, seed=0,
                     engine="numpy").fit(x, y)
    assert all(np.array_equal(layer.quant.qweight, w) and np.array_equal(layer.quant.qbias, b)
               for layer, (w, b) in zip(q.layers, before))
    merged = t.method.merged_backbone()
    assert merged.is_int8 and merged.layers[0].quant.qweight.dtype == np.int8
    w0 = merged.layers[0].quant.qweight
    assert np.array_equal(w0[2:], before[0][0][2:]) and not np.array_equal(w0[:2], before[0][0][:2])
    assert merged.forward(merged.prepare(x)).shape == (len(x), 3)


@needs_c
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("name,scheme", [("1d-residual", "w0:1/4,b2"), ("1d-residual", "w1,b3"),
                                         ("2d", "w1:1/2,w2:1/8,b1"), ("2d", "w0:1/4"),
                                         ("1d-flatten", "b2,w1:1/4"),
                                         # the residual add inside the integer pass before the first trained layer
                                         ("1d-residual", "w-1,b2"), ("2d", "b1")])
def test_c_equals_numpy(name, scheme, optimizer):
    """The compiled engine runs the same graph: the integer pass to the first trained layer, then
    the fake-quantised layers; losses within 1e-5, the same predictions, the same int8 merge."""
    q, x, y = _int8(name)
    lr = 0.6 if optimizer == "adam" else 0.05  # Adam steps ~lr in int8 units: below 0.5 nothing rounds anew
    runs = {}
    for engine in ("numpy", "c"):
        t = et.FineTuner(q, "sparse", scheme=scheme, optimizer=optimizer, epochs=4, batch_size=7, lr=lr, seed=3,
                         engine=engine).fit(x, y)
        assert t.history_.engine == engine
        runs[engine] = t
    la, lb = ([e.loss for e in runs[k].history_.epochs] for k in ("numpy", "c"))
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    assert la[-1] != la[0]
    np.testing.assert_array_equal(runs["c"].predict(x), runs["numpy"].predict(x))
    pa, pb = (runs[k].method.params.flat for k in ("numpy", "c"))
    np.testing.assert_allclose(pb, pa, rtol=1e-4, atol=1e-3)


@needs_c
def test_c_keeps_no_float_activation_below_the_first_trained_layer():
    """The workspace C sizes for a late first layer is smaller than for the first layer: the
    integer pass keeps int8 values before it, no float ones."""
    from edgetune.core.engine import CoreModel
    from edgetune.methods import make_method
    q, _, _ = _int8("1d-residual")
    sizes = {}
    for scheme in ("w0,b1", "w-1"):
        m = make_method("sparse", q, scheme=scheme)
        sizes[scheme] = CoreModel(m, 16).workspace_bytes()
    assert sizes["w-1"] < sizes["w0,b1"]


@needs_c
def test_c_integer_pass_keeps_one_sample_of_what_is_still_read():
    """The integer pass before the first trained layer runs a sample at a time through two int8
    buffers in turn (a layer's input in one, its requantised output in the other): more frozen layers of
    the same shape in front cost only their entries in the per-layer tables, not their int8
    inputs (8 x 400 bytes each); an add there holds its source's int8 input until it runs, one
    sample of it, and no dequantised float copy for the batch (4 x 3,200 floats). An add, though it
    has no weights, runs one channel at a time too: its int32 accumulator holds one channel of 400
    positions, as a convolution's does, not its whole output."""
    from edgetune.core.engine import CoreModel
    from edgetune.methods import make_method
    shape, width = (3, 400), 8 * 400
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, *shape)).astype(np.float32)

    def workspace(arch: str) -> int:
        bb = et.Backbone.from_layers(build_layers(parse_arch(arch, shape, 3), seed=0)).fit_normalizer(x)
        return CoreModel(make_method("sparse", quantize(bb, x), scheme="b1"), 4).workspace_bytes()

    conv = "conv:8:3:1:same,relu,"
    one, three, five = (workspace(conv * d + "gap") for d in (1, 3, 5))
    residual = workspace(conv + "res(conv:8:3:1:same,relu)," + conv + "gap")  # as many layers as three, + the add
    assert 0 <= three - one < width and 0 <= five - three < width, (one, three, five)
    assert width <= residual - three < width + 256, (three, residual)  # the held input only


@needs_c
def test_c_integer_pass_accumulates_one_output_channel_at_a_time():
    """A convolution before the first trained layer accumulates and requantises one output channel
    at a time: twice its output channels (8 -> 16 of 400 positions) cost 3,200 more int8 values in
    the one of the two buffers that takes its output, not a wider int32 accumulator (4 x 3,200
    bytes more) beside them."""
    from edgetune.core.engine import CoreModel
    from edgetune.methods import make_method
    shape, width = (3, 400), 8 * 400
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, *shape)).astype(np.float32)

    def workspace(channels: int) -> int:
        arch = f"conv:{channels}:3:1:same,relu,conv:8:3:1:same,relu,gap"
        bb = et.Backbone.from_layers(build_layers(parse_arch(arch, shape, 3), seed=0)).fit_normalizer(x)
        return CoreModel(make_method("sparse", quantize(bb, x), scheme="b1"), 4).workspace_bytes()

    narrow, wide = workspace(8), workspace(16)
    assert width <= wide - narrow < width + 256, (narrow, wide)


@needs_c
@pytest.mark.parametrize("int8", [True, False])
def test_c_workspace_pieces_add_up_to_its_size(int8):
    """et_workspace_pieces names the pieces plan_layout carves; they add up to et_workspace_size (+ 64
    bytes for an unaligned pointer), at the host's pointers and a microcontroller's."""
    from edgetune.memory import core_workspace_for, core_workspace_pieces
    from edgetune.methods import make_method
    from edgetune.quant.int8 import dequantize
    q, _, _ = _int8("1d-residual")
    bb = q if int8 else dequantize(q)
    assert bb.is_int8 == int8
    for scheme in ("w0:1/4,b2", "w1,b3", "b2"):
        m = make_method("sparse", bb, scheme=scheme)
        for pb in (4, 8):
            pieces = core_workspace_pieces(m, 7, pointer_bytes=pb)
            assert sum(pieces.values()) + 64 == core_workspace_for(m, 7, pointer_bytes=pb), (scheme, pieces)
            assert all(v % 64 == 0 for v in pieces.values()) and pieces["snapshot"] >= 4 * m.params.flat.size


@needs_c
def test_c_reserves_no_weight_gradient_scratch_for_a_frozen_convolution():
    """The sparse update computes a convolution's weight gradient for its trained rows only, and none
    where only its bias trains: the kernels' scratch is sized for what runs (float and int8) (a pointwise layer of 64
    channels at 50 positions from 8: its whole weight gradient would need (64 x 50 + 8 x 64) floats)."""
    from edgetune.memory import core_workspace_pieces
    from edgetune.methods import make_method
    shape = (3, 50)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, *shape)).astype(np.float32)
    bb = et.Backbone.from_layers(build_layers(parse_arch("conv:8:3:1:same,relu,conv:64:1,relu,gap", shape, 3),
                                              seed=0)).fit_normalizer(x)
    for backbone in (bb, quantize(bb, x)):
        scratch = {s: core_workspace_pieces(make_method("sparse", backbone, scheme=s), 4).get("scratch", 0)
                   for s in ("b1", "w1:1/8,b1", "w1,b1")}
        # the pointwise forward and input gradient need none; the float update runs the frozen 3-tap
        # convolution in front in floats (its im2col: 3 x 3 x 50), the int8 one as the integer pass
        assert scratch["b1"] == (0 if backbone.is_int8 else -(-3 * 3 * 50 * 4 // 64) * 64), scratch
        if not backbone.is_int8:
            assert scratch["w1:1/8,b1"] == -(-(64 * 50 + 8 * 8) * 4 // 64) * 64, scratch  # 8 of 64 rows
            assert scratch["w1,b1"] == -(-(64 * 50 + 8 * 64) * 4 // 64) * 64, scratch
        else:  # a block of the trained rows at a time, as a layer of those rows (16 of 64)
            assert scratch["w1:1/8,b1"] == (8 * 50 + 8 * 8) * 4, scratch
            assert scratch["w1,b1"] == (16 * 50 + 8 * 16) * 4, scratch


@needs_c
def test_c_keeps_the_inputs_from_the_first_trained_layer_on_as_int8_or_as_a_mask():
    """From its first trained layer on the sparse update's forward pass is fake-quantised: every layer's
    input is an int8 value times its scale. Where a kernel reads it (a layer with trained rows: their
    weight gradient; a max pooling; an add's source) it is kept as that int8 code (1 byte a value, not a
    float's 4), the floats rebuilt where they are read; where only its gradient's mask is read (the
    activation's derivative and the int8 clamp, 0 or 1), as one bit a value. The same floats and
    products: the comparisons with NumPy above, tests/test_core_fused.py and
    benchmarks/int8_sparse_identity.py against an earlier build."""
    from edgetune.memory import core_workspace_pieces
    from edgetune.methods import make_method
    shape, width, batch = (3, 400), 8 * 400, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, *shape)).astype(np.float32)

    def pieces(depth: int, scheme: str) -> dict[str, int]:
        arch = "conv:8:3:1:same,relu," * depth + "gap"
        bb = et.Backbone.from_layers(build_layers(parse_arch(arch, shape, 3), seed=0)).fit_normalizer(x)
        return core_workspace_pieces(make_method("sparse", quantize(bb, x), scheme=scheme), batch)

    three, five = pieces(3, "w0:1/4,b1"), pieces(5, "w0:1/4,b1")
    # two more frozen convolutions: a mask of their inputs each (4 x 3,200 bits), no codes, no floats
    assert five["actm[k]"] - three["actm[k]"] == 2 * batch * width // 8, (three, five)
    assert five.get("actq[k]", 0) == three.get("actq[k]", 0) == batch * 3 * 400  # layer 0's input only
    assert sum(five.values()) - sum(three.values()) < 2 * batch * width // 8 + 256, (three, five)
    assert three["act[k]"] == 64  # as floats: the logits only (4 x 3 classes, one 64-byte piece)
    # a trained layer's input is read by its weight gradient: its codes, in place of its mask
    trained = pieces(5, "w0:1/4,w2:1/4,b1")
    assert trained["actq[k]"] - five["actq[k]"] == batch * width, (five, trained)
    assert five["actm[k]"] - trained["actm[k]"] == batch * width // 8, (five, trained)


@needs_c
def test_c_assembles_a_pointwise_or_dense_int8_weight_a_block_at_a_time():
    """On an int8 network the sparse update runs every layer with weights from its first trained one on
    in floats, dequantised into one weight scratch: a dense or pointwise layer 4 output channels at a time
    forward and, for its input's gradient, 4 input channels (dense: 16 inputs) of every output channel at
    a time, so the scratch no longer holds the widest such layer whole (here 64 x 8 floats): the 3x3
    convolution's 8 x 9, the head's 3 outputs x 64 inputs, or the pointwise layer's 64 x 4 where its
    input's gradient is taken. The same floats in the same products (the comparisons with NumPy above;
    benchmarks/int8_sparse_identity.py against an earlier build)."""
    from edgetune.memory import core_workspace_pieces
    from edgetune.methods import make_method
    shape = (3, 50)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, *shape)).astype(np.float32)
    bb = et.Backbone.from_layers(build_layers(parse_arch("conv:8:3:1:same,relu,conv:64:1,relu,gap", shape, 3),
                                              seed=0)).fit_normalizer(x)
    q = quantize(bb, x)
    sw = {s: core_workspace_pieces(make_method("sparse", q, scheme=s), 4)["sw"] for s in ("b1", "w0:1/4,b1")}
    assert sw["b1"] == 3 * 64 * 4, sw  # the head forward (its 3 rows) and input gradient (3 x 16)
    assert sw["w0:1/4,b1"] == 64 * 4 * 4, sw  # the pointwise layer's input gradient, 4 of its 8 input channels
    dw = et.Backbone.from_layers(build_layers(parse_arch("conv:64:1,relu,dwconv:9:1:4,relu,gap", shape, 3),
                                              seed=0)).fit_normalizer(x)
    # a depthwise layer of 64 channels: 4 channels' filters at a time (5 for the last block, which a lone
    # channel joins), not 64 x 9 floats; the head's 3 rows of 64 are the largest block
    assert core_workspace_pieces(make_method("sparse", quantize(dw, x), scheme="w0:1/4,b1"), 4)["sw"] == 3 * 64 * 4
    float_sw = core_workspace_pieces(make_method("sparse", bb, scheme="w0:1/4,b1"), 4)["sw"]
    assert float_sw == -(-8 * 9 * 4 // 64) * 64  # float: the trained layer whole, as before


@needs_c
def test_c_sizes_each_gradient_buffer_for_the_inputs_that_land_in_it():
    """The two float buffers of the int8 sparse update's passes (a layer's input and output forward, the
    gradients backward) alternate layer by layer, each input's floats where its gradient will be: each is
    sized for every other layer's input, not both for the widest (here the gap's 64 x 50 inputs in one,
    the pointwise layer's 8 x 50 in the other, at batch 4)."""
    from edgetune.memory import core_workspace_pieces
    from edgetune.methods import make_method
    shape = (3, 50)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, *shape)).astype(np.float32)
    bb = et.Backbone.from_layers(build_layers(parse_arch("conv:8:3:1:same,relu,conv:64:1,relu,gap", shape, 3),
                                              seed=0)).fit_normalizer(x)
    pieces = core_workspace_pieces(make_method("sparse", quantize(bb, x), scheme="w0:1/4"), 4)
    assert pieces["gbuf[0]"] + pieces["gbuf[1]"] == 4 * (8 * 50 + 64 * 50) * 4, pieces


@needs_c
def test_c_refuses_a_missing_int8_unit_and_the_adapter_round_trips(tmp_path):
    """C checks the units of every layer with weights from the first trained one on before it
    runs (the planner may size a workspace without them); the adapter file rebuilds the run."""
    from edgetune.core.engine import CoreError, CoreModel
    from edgetune.methods import make_method
    q, x, y = _int8("1d-residual")
    model = CoreModel(make_method("sparse", q, scheme="w1,b3"), 8)
    xp = q.prepare(x).reshape(len(x), -1).astype(np.float32)
    ids = np.arange(8, dtype=np.int32)
    assert np.isfinite(model.batch_gradient(xp, y.astype(np.int32), ids))
    k = q.tap_layers[-1]
    model.m.b_unit[k] = None
    with pytest.raises(CoreError, match="invalid argument"):
        model.batch_gradient(xp, y.astype(np.int32), ids)
    t = et.FineTuner(q, "sparse", scheme="w1,b3", epochs=3, lr=0.05, engine="c").fit(x, y)
    t.save_adapter(tmp_path / "adapter")
    loaded = et.FineTuner.load_adapter(q, tmp_path / "adapter")
    np.testing.assert_array_equal(loaded.method.params.flat, t.method.params.flat)
    np.testing.assert_array_equal(loaded.predict(x), t.predict(x))


# ---------------------------------------------------------------------------- export of int8 CNNs
@pytest.fixture(scope="module")
def int8_cnn(tmp_path_factory):
    """damage1-1d's fan spectra on a small int8 CNN (conv, max pooling, a depthwise residual
    block, average pooling, flatten: layers without weights between the weighted ones)."""
    from .conftest import DATA_DIR
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.fail(f"the shared data sets are expected at {DATA_DIR}")
    task = et.load_task("damage1-1d", DATA_DIR)
    some = np.random.default_rng(0).permutation(len(task.y_pretrain))[:400]
    arch = "conv:8:9:4:4,relu,maxpool:2,res(dwconv:3:1:1,relu,conv:8:1),conv:12:5:2:2,relu,avgpool:2,flatten,dense:24,relu"
    model, _ = et.pretrain(task.x_pretrain[some], task.y_pretrain[some], arch=arch, labels=task.labels, epochs=4,
                           lr=0.02, seed=0)
    path = quantize(model, task.x_pretrain[some]).save(tmp_path_factory.mktemp("int8cnn") / "model")
    return path, task, ["--task", "damage1-1d", "--data-dir", str(DATA_DIR)]


def _export(model_dir, task_option, out, target, *extra) -> dict:
    import json
    from edgetune.cli import main
    assert main(["export", "--model", str(model_dir), "--target", target, "--out", str(out), "--quiet",
                 *task_option, *extra]) == 0
    return json.loads((out / "export.json").read_text())


def _python_run(model, task, man, *, int8_cache=False):
    """The exported configuration on the Python package's compiled engine (an int8 cache on a CNN:
    scales calibrated on the pre-training split, as the export does)."""
    from edgetune.quant import attach_int8_cache
    tr, te = man["train_indices"], man["test_indices"]
    tuner = et.FineTuner(model, man["method"], epochs=man["epochs"], seed=man["seed"], batch_size=man["batch_size"],
                         lr=man["lr"], engine="c")
    if int8_cache:
        attach_int8_cache(tuner.method, len(tr), x_calib=task.x_pretrain)
    tuner.fit(task.x_finetune[tr], task.y_finetune[tr])
    return tuner.history_.final_loss, tuner.score(task.x_test[te], task.y_test[te])


@needs_c
@pytest.mark.parametrize("method,extra", [("sparse", []), ("skip2-lora", ["--int8"])])
def test_host_program_on_an_int8_cnn_reaches_the_python_loss(int8_cnn, method, extra, tmp_path):
    import subprocess
    from .test_export import last_json, make, needs
    needs(("cc", "gcc"), ("make", "make"))
    model_dir, task, task_option = int8_cnn
    out = tmp_path / "dev"
    man = _export(model_dir, task_option, out, "host", "--method", method, "--epochs", "3", "--max-samples", "120",
                  "--test-samples", "80", *extra)
    assert man["backbone"] == "int8" and man["cache"] == ("int8" if method == "skip2-lora" else None)
    make(out)
    res = last_json(subprocess.run([str(out / "train"), "--quiet"], capture_output=True, text=True, timeout=120,
                                   check=True).stdout)
    loss, acc = _python_run(et.Backbone.load(model_dir), task, man, int8_cache=method == "skip2-lora")
    assert res["epochs"] == 3 and res["samples"] == 120
    assert res["final_loss"] == pytest.approx(loss, rel=1e-6) and res["accuracy_after"] == acc
    assert res["arena_needed_bytes"] == man["memory"]["arena"]


@needs_c
def test_cortex_m4_sparse_on_an_int8_cnn_fits_256kb_and_matches_python(int8_cnn, tmp_path):
    from .test_export import last_json, make, needs, sections
    needs(("arm-none-eabi-gcc", "gcc-arm-none-eabi"), ("qemu-system-arm", "qemu-system-arm"))
    model_dir, task, task_option = int8_cnn
    out = tmp_path / "m4"
    budget = 256 * 1024
    man = _export(model_dir, task_option, out, "cortex-m4", "--method", "sparse",
                  "--budget", "256KB", "--batch-size", "4", "--max-samples", "100", "--test-samples", "60",
                  "--epochs", "2")
    make(out, timeout=300)
    res = last_json(make(out, "run", timeout=300))
    loss, acc = _python_run(et.Backbone.load(model_dir), task, man)
    assert res["target"] == "cortex-m4" and res["epochs"] == 2 and res["samples"] == 100
    assert res["final_loss"] == pytest.approx(loss, rel=1e-4)  # FMA on the M4: a few float32 roundings differ
    assert res["accuracy_after"] == pytest.approx(acc)
    assert res["arena_needed_bytes"] == man["memory"]["arena"]
    s = sections(out / "train.elf")
    ram, plan = s[".data"] + s[".bss"] + s[".stack"], man["memory"]["total"]
    # the arena is the plan's to the byte (above); the plan's statics are a bound, 208 bytes above what this
    # program links (docs/budgets.md): 1% of a plan of 20 KB, so that much on top of the 1%
    assert ram <= budget and plan <= budget and 0 <= plan - ram <= 0.01 * plan + 256, (ram, plan)
