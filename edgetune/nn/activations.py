"""Activations whose derivative can be written from their output alone.

Keeping only the output h (not the pre-activation z) halves what the backward pass must
remember. ``grad(h)`` returns dh/dz evaluated at that output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class Activation:
    name: str
    forward: Callable[[np.ndarray], np.ndarray]          # overwrites z with h and returns it
    grad_mul: Callable[[np.ndarray, np.ndarray], None]   # dh *= f'(z), given h; in place


def _relu_fwd(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0, out=z)


def _relu_grad(dh: np.ndarray, h: np.ndarray) -> None:
    dh *= h > 0


def _relu6_fwd(z: np.ndarray) -> np.ndarray:
    return np.clip(z, 0, 6, out=z)


def _relu6_grad(dh: np.ndarray, h: np.ndarray) -> None:
    dh *= (h > 0) & (h < 6)


def _leaky_fwd(z: np.ndarray) -> np.ndarray:
    return np.multiply(z, z.dtype.type(0.01), out=z, where=z < 0)


def _leaky_grad(dh: np.ndarray, h: np.ndarray) -> None:
    dh *= np.where(h > 0, 1.0, 0.01).astype(dh.dtype, copy=False)


def _tanh_fwd(z: np.ndarray) -> np.ndarray:
    return np.tanh(z, out=z)


def _tanh_grad(dh: np.ndarray, h: np.ndarray) -> None:
    dh *= 1 - h * h


def _sigmoid_fwd(z: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-z)) written so that large |z| never overflows.
    pos = z >= 0
    e = np.exp(-np.abs(z))
    z[...] = np.where(pos, 1 / (1 + e), e / (1 + e))
    return z


def _sigmoid_grad(dh: np.ndarray, h: np.ndarray) -> None:
    dh *= h * (1 - h)


def _identity_fwd(z: np.ndarray) -> np.ndarray:
    return z


def _identity_grad(dh: np.ndarray, h: np.ndarray) -> None:
    return None


ACTIVATIONS: dict[str, Activation] = {
    a.name: a for a in (
        Activation("relu", _relu_fwd, _relu_grad),
        Activation("relu6", _relu6_fwd, _relu6_grad),
        Activation("leaky_relu", _leaky_fwd, _leaky_grad),
        Activation("tanh", _tanh_fwd, _tanh_grad),
        Activation("sigmoid", _sigmoid_fwd, _sigmoid_grad),
        Activation("identity", _identity_fwd, _identity_grad),
    )
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UsageError(f"unknown activation '{name}': use one of {', '.join(ACTIVATIONS)}") from None
