"""ONNX in and out: ``from_onnx`` reads an MLP or CNN graph into a Backbone, ``to_onnx`` writes a
backbone or a fine-tuned model as a graph ONNX Runtime runs.

The core of edgetune never imports ``onnx``: this module imports it on first use and says
``pip install edgetune[onnx]`` when it is missing.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..torch import MissingExtraError

if TYPE_CHECKING:  # pragma: no cover
    from ..nn.mlp import Backbone
    from .importer import OnnxImport


def require_onnx() -> Any:
    """Import and return ``onnx``, or raise with the install command."""
    try:
        return importlib.import_module("onnx")
    except ImportError as e:
        raise MissingExtraError(f"this feature needs the onnx package, which is not installed ({e}); "
                                "install it with: pip install edgetune[onnx]") from None


def read_onnx(path: str | os.PathLike, *, labels: Sequence[str] | None = None) -> "OnnxImport":
    """The backbone of an ONNX file and what the import found (input shape, notes)."""
    require_onnx()
    from .importer import read_onnx as impl
    return impl(path, labels=labels)


def from_onnx(path: str | os.PathLike, *, labels: Sequence[str] | None = None) -> "Backbone":
    """An edgetune Backbone from an ONNX file holding an MLP or a CNN (see docs/onnx.md for what converts).

    Every node is checked before anything is returned: an operator that does not convert
    raises ``UsageError`` naming the node, its op type and the list of what converts; a
    damaged or hostile file raises ``ModelFileError`` without reading its tensors' claims.
    """
    return read_onnx(path, labels=labels).backbone


def to_onnx(model: Any, path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write ``model`` (a Backbone, an int8 backbone, or a fitted FineTuner) as an ONNX file.

    A float model becomes one node per layer (Gemm, Conv, MaxPool, AveragePool,
    GlobalAveragePool, Flatten, Add) and its activation after the input normalisation; a
    FineTuner's adapter is merged in (skip methods: the adapters that do not fold become an
    added branch); an int8 backbone becomes a QDQ graph. Written atomically.
    """
    require_onnx()
    from .exporter import to_onnx as impl
    return impl(model, path, opset=opset)


__all__ = ["from_onnx", "read_onnx", "require_onnx", "to_onnx"]
