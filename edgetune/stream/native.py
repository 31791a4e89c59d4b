"""The compiled OS-ELM (edgetune/core/et_oselm.c) through ctypes.

The state is one caller-owned buffer whose size C states (``et_oselm_state_size``); Python
allocates it as a NumPy array and checks every shape, dtype and size before C runs. The
library handle is the compiled engine's (``edgetune.core.load()``); this module only
declares the OS-ELM functions on it.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from .oselm import ACTIVATIONS

REFUSED = 1


class Config(ctypes.Structure):
    _fields_ = [("n_inputs", ctypes.c_int32), ("n_hidden", ctypes.c_int32), ("n_outputs", ctypes.c_int32),
                ("seed", ctypes.c_uint32), ("activation", ctypes.c_int32), ("symmetrize_every", ctypes.c_int32),
                ("keep_weights", ctypes.c_int32), ("delta", ctypes.c_float), ("forgetting", ctypes.c_float)]


class Header(ctypes.Structure):
    """et_oselm_header: the state's counters are read and set through it."""
    _fields_ = [("magic", ctypes.c_uint32), ("version", ctypes.c_uint32), ("cfg", Config),
                ("n_updates", ctypes.c_int64), ("n_refused", ctypes.c_int64), ("total_bytes", ctypes.c_uint64)]


class Drift(ctypes.Structure):
    """et_oselm_drift: the Page-Hinkley state (edgetune/stream/drift.py) handed to C."""
    _fields_ = [("delta", ctypes.c_double), ("threshold", ctypes.c_double), ("clip", ctypes.c_double),
                ("min_samples", ctypes.c_int64), ("n", ctypes.c_int64), ("mean", ctypes.c_double),
                ("sum", ctypes.c_double), ("min_sum", ctypes.c_double), ("n_detections", ctypes.c_int64)]


# flags per sample of et_oselm_detect_stream (et_oselm.h)
LEARNED, NOT_FINITE, ALARM, DRIFT, UPDATE_REFUSED = 1, 2, 4, 8, 16

_lib: Any = None


def library() -> Any:
    """The compiled library with the OS-ELM functions declared; ImportError if unavailable."""
    global _lib
    if _lib is not None:
        return _lib
    from .. import core

    lib = core.load()
    if lib is None or not hasattr(lib, "et_oselm_state_size"):
        raise ImportError(f"the compiled OS-ELM is not available: {core.unavailable_reason() or 'rebuild with pip install .'}")
    vp, sz, i32, f32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_float
    P = ctypes.POINTER
    lib.et_oselm_state_size.argtypes, lib.et_oselm_state_size.restype = [P(Config)], sz
    lib.et_oselm_init.argtypes, lib.et_oselm_init.restype = [vp, sz, P(Config)], i32
    lib.et_oselm_check.argtypes, lib.et_oselm_check.restype = [vp, sz], i32
    lib.et_oselm_P.argtypes, lib.et_oselm_P.restype = [vp], vp
    lib.et_oselm_beta.argtypes, lib.et_oselm_beta.restype = [vp], vp
    lib.et_oselm_uniform.argtypes, lib.et_oselm_uniform.restype = [ctypes.c_uint32, ctypes.c_uint32], f32
    lib.et_oselm_hidden.argtypes, lib.et_oselm_hidden.restype = [vp, vp, vp], i32
    lib.et_oselm_predict.argtypes, lib.et_oselm_predict.restype = [vp, vp, vp], i32
    lib.et_oselm_update.argtypes, lib.et_oselm_update.restype = [vp, vp, vp], i32
    lib.et_oselm_update_hidden.argtypes, lib.et_oselm_update_hidden.restype = [vp, vp, vp], i32
    lib.et_oselm_ae_stream.argtypes = [vp, vp, i32, f32, vp, vp]
    lib.et_oselm_ae_stream.restype = i32
    lib.et_oselm_checksum.argtypes, lib.et_oselm_checksum.restype = [vp], ctypes.c_uint32
    lib.et_oselm_drift_size.argtypes, lib.et_oselm_drift_size.restype = [], sz
    if lib.et_oselm_drift_size() != ctypes.sizeof(Drift):
        raise ImportError("the compiled engine's et_oselm_drift differs from edgetune.stream.native.Drift: "
                          "rebuild it (pip install .)")
    lib.et_oselm_detect_stream.argtypes = [vp, i32, vp, vp, vp, vp, i32, ctypes.c_double, P(Drift), i32, vp, vp,
                                           vp, vp]
    lib.et_oselm_detect_stream.restype = i32
    _lib = lib
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class NativeOSELM:
    """An OS-ELM whose state lives in one C buffer; the same math as :class:`OSELM` in float32."""

    def __init__(self, n_inputs: int, n_outputs: int, n_hidden: int = 64, *, seed: int = 0, delta: float = 1.0,
                 forgetting: float = 1.0, activation: str = "sigmoid", symmetrize_every: int = 64,
                 keep_weights: bool = True):
        if activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {activation!r}: use {', '.join(ACTIVATIONS)}")
        self._lib = library()
        self.cfg = Config(n_inputs, n_hidden, n_outputs, seed, ACTIVATIONS.index(activation), symmetrize_every,
                          int(bool(keep_weights)), delta, forgetting)
        size = self._lib.et_oselm_state_size(ctypes.byref(self.cfg))
        if size == 0:
            raise UsageError(f"invalid OS-ELM configuration: inputs {n_inputs}, hidden {n_hidden}, outputs "
                             f"{n_outputs}, delta {delta}, forgetting {forgetting}")
        self.state = np.zeros(size // 4, np.float32)   # float-aligned, size is a multiple of 16
        rc = self._lib.et_oselm_init(_ptr(self.state), self.state.nbytes, ctypes.byref(self.cfg))
        if rc != 0:
            raise UsageError(f"et_oselm_init refused the configuration ({rc})")
        L = n_hidden
        self.P_ = np.ctypeslib.as_array(ctypes.cast(self._lib.et_oselm_P(_ptr(self.state)),
                                                    ctypes.POINTER(ctypes.c_float)), (L, L))
        self.beta_ = np.ctypeslib.as_array(ctypes.cast(self._lib.et_oselm_beta(_ptr(self.state)),
                                                       ctypes.POINTER(ctypes.c_float)), (L, n_outputs))

    @property
    def nbytes(self) -> int:
        return self.state.nbytes

    @property
    def header(self) -> Header:
        """The state's header (its counters n_updates, n_refused are read and set here)."""
        return Header.from_buffer(self.state)

    def checksum(self) -> int:
        return int(self._lib.et_oselm_checksum(_ptr(self.state)))

    def set_state(self, P: np.ndarray, beta: np.ndarray) -> "NativeOSELM":
        if np.shape(P) != self.P_.shape or np.shape(beta) != self.beta_.shape:
            raise DataError(f"P must be {self.P_.shape} and beta {self.beta_.shape}")
        self.P_[...] = P
        self.beta_[...] = beta
        return self

    def _vec(self, v: Any, n: int, what: str) -> np.ndarray:
        a = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
        if a.shape != (n,):
            raise DataError(f"{what} must have {n} values, got {a.size}")
        return a

    def hidden(self, x: Any) -> np.ndarray:
        x = self._vec(x, self.cfg.n_inputs, "x")
        h = np.empty(self.cfg.n_hidden, np.float32)
        self._lib.et_oselm_hidden(_ptr(self.state), _ptr(x), _ptr(h))
        return h

    def predict(self, x: Any) -> np.ndarray:
        x = self._vec(x, self.cfg.n_inputs, "x")
        y = np.empty(self.cfg.n_outputs, np.float32)
        self._lib.et_oselm_predict(_ptr(self.state), _ptr(x), _ptr(y))
        return y

    def learn_one(self, x: Any, t: Any) -> bool:
        x = self._vec(x, self.cfg.n_inputs, "x")
        t = self._vec(t, self.cfg.n_outputs, "t")
        rc = self._lib.et_oselm_update(_ptr(self.state), _ptr(x), _ptr(t))
        if rc < 0:
            raise DataError(f"et_oselm_update refused its arguments ({rc})")
        return rc == 0

    def ae_stream(self, z: Any, learn_below_err: float) -> tuple[np.ndarray, np.ndarray]:
        """Test-then-train over rows z (already standardised): errors before learning, and
        1 learned / 0 not / 2 refused per row."""
        if self.cfg.n_inputs != self.cfg.n_outputs:
            raise UsageError("ae_stream needs an autoencoder (n_inputs == n_outputs)")
        z = np.ascontiguousarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.cfg.n_inputs:
            raise DataError(f"z must have shape (samples, {self.cfg.n_inputs}), got {z.shape}")
        err = np.empty(z.shape[0], np.float32)
        learned = np.empty(z.shape[0], np.int32)
        rc = self._lib.et_oselm_ae_stream(_ptr(self.state), _ptr(z), z.shape[0], float(learn_below_err),
                                          _ptr(err), _ptr(learned))
        if rc != 0:
            raise DataError(f"et_oselm_ae_stream refused its arguments ({rc})")
        return err, learned


class NativeDetector:
    """One environment of a fitted AnomalyDetector (default: the last learned, the current
    room), streaming in C: score, then learn if well inside the threshold. The transform and
    standardisation run vectorised in NumPy."""

    def __init__(self, det: Any, *, keep_weights: bool = True, environment: int = -1):
        det._check_fitted()
        self.det = det
        n_env = len(det.environments_)
        if not -n_env <= environment < n_env:
            raise UsageError(f"environment {environment}: the detector has {n_env} (0..{n_env - 1})")
        env = det.environments_[environment]
        m = env.model
        self.env = env
        self.native = NativeOSELM(m.n_inputs, m.n_outputs, m.n_hidden, seed=m.seed, delta=m.delta,
                                  forgetting=m.forgetting, activation=m.activation,
                                  symmetrize_every=m.symmetrize_every, keep_weights=keep_weights)
        self.native.set_state(m.P_, m.beta_)

    @classmethod
    def from_detector(cls, det: Any, **kw: Any) -> "NativeDetector":
        return cls(det, **kw)

    def stream(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scores (higher is more normal, -1 the threshold) and what was learned, per row."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.det.n_features_in_:
            raise DataError(f"stream: x must have shape (samples, {self.det.n_features_in_}), got {x.shape}")
        if self.det.kind != "oselm":
            f = self.det._features(x.astype(np.float64)).astype(np.float32)
        elif self.det.transform == "log":
            if np.any(x < 0):
                raise DataError("transform='log' takes non-negative inputs")
            f = np.log(self.det._band(x) + np.float32(1e-3))   # the detector's transform, in float32
        else:
            f = self.det._band(x)
        z = (f - self.env.mean.astype(np.float32)) / self.env.std.astype(np.float32)
        thr = self.env.threshold
        err, learned = self.native.ae_stream(z, self.det.learn_below * thr)
        return -err.astype(np.float64) / thr, learned


class NativeStream:
    """Every environment of a fitted AnomalyDetector in C, for its stream
    (:meth:`AnomalyDetector.learn_many`): one C state per environment, kept between calls
    (the random input weights are generated once); :meth:`load` copies the detector's state
    in (P and beta in float32), :meth:`store` copies it back."""

    def __init__(self, det: Any):
        self.det = det
        self.models: list[Any] = []
        self.natives: list[NativeOSELM] = []

    def _sync_environments(self) -> None:
        envs = self.det.environments_
        if [id(e.model) for e in envs] == [id(m) for m in self.models]:
            return
        kept = {id(m): nat for m, nat in zip(self.models, self.natives)}
        self.natives = [kept.get(id(e.model)) or NativeOSELM(
            e.model.n_inputs, e.model.n_outputs, e.model.n_hidden, seed=e.model.seed, delta=e.model.delta,
            forgetting=e.model.forgetting, activation=e.model.activation,
            symmetrize_every=e.model.symmetrize_every) for e in envs]
        self.models = [e.model for e in envs]
        d = envs[0].mean.shape[0]
        self.mean = np.empty((len(envs), d), np.float32)
        self.inv_std = np.empty((len(envs), d), np.float32)
        for k, e in enumerate(envs):
            self.mean[k] = e.mean
            self.inv_std[k] = 1.0 / e.std
        self.thresholds = np.array([e.threshold for e in envs], np.float64)
        self.ptrs = (ctypes.c_void_p * len(envs))(*[_ptr(n.state) for n in self.natives])
        L = envs[0].model.n_hidden
        self.zbuf = np.empty((len(envs), d + 2 * L), np.float32)   # et_oselm_detect_stream's scratch

    def load(self) -> None:
        self._sync_environments()
        for m, nat in zip(self.models, self.natives):
            nat.set_state(m.P_, m.beta_)
            h = nat.header
            h.n_updates, h.n_refused = m.n_updates_, m.n_refused_

    def store(self) -> None:
        for m, nat in zip(self.models, self.natives):
            m.P_ = nat.P_.astype(m.dtype)
            m.beta_ = nat.beta_.astype(m.dtype)
            h = nat.header
            m.n_updates_, m.n_refused_ = int(h.n_updates), int(h.n_refused)

    def run(self, f: np.ndarray, drift: Any, stop_on_drift: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Rows f (features, before standardisation) through C; the drift detector's state
        goes in and comes back. Returns (rows processed, ratio, environment, flags)."""
        f = np.ascontiguousarray(f, dtype=np.float32)
        n_env, d = self.mean.shape
        if f.ndim != 2 or f.shape[1] != d:
            raise DataError(f"the stream's features must have shape (samples, {d}), got {f.shape}")
        n = f.shape[0]
        if n > 2 ** 31 - 1:
            raise DataError("at most 2**31 - 1 samples per call")
        ratio = np.empty(n, np.float64)
        env = np.empty(n, np.int32)
        flags = np.empty(n, np.int32)
        s = drift.state()
        ph = Drift(drift.delta, drift.threshold, drift.clip, drift.min_samples, s["n"], s["mean"], s["sum"],
                   s["min_sum"], s["n_detections"])
        done = self.natives[0]._lib.et_oselm_detect_stream(
            self.ptrs, n_env, _ptr(self.mean), _ptr(self.inv_std), _ptr(self.thresholds), _ptr(f), n,
            float(self.det.learn_below), ctypes.byref(ph), int(stop_on_drift), _ptr(self.zbuf), _ptr(ratio),
            _ptr(env), _ptr(flags))
        if done < 0:
            raise DataError(f"et_oselm_detect_stream refused its arguments ({done})")
        drift.set_state({"n": ph.n, "mean": ph.mean, "sum": ph.sum, "min_sum": ph.min_sum,
                         "n_detections": ph.n_detections})
        return done, ratio[:done], env[:done], flags[:done]
