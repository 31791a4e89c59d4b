"""Reading an ONNX file without trusting it.

The protobuf is parsed with external data left on disk. A tensor's claims (dims, dtype,
where its bytes are) are checked against the bytes that exist before an array is made:
a header claiming 10^12 elements is refused by arithmetic, never by a failed allocation,
and external data must be a file inside the model's folder, long enough for the claim.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError

#: The largest tensor edgetune reads from an ONNX file (a dense layer of 16k x 16k float32).
MAX_TENSOR_BYTES = 1 << 30

# TensorProto.DataType -> (NumPy dtype, the typed field that may hold the values)
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype(np.float32), "float_data"),
    11: (np.dtype(np.float64), "double_data"),
    10: (np.dtype(np.float16), "int32_data"),
    7: (np.dtype(np.int64), "int64_data"),
    6: (np.dtype(np.int32), "int32_data"),
    3: (np.dtype(np.int8), "int32_data"),
    2: (np.dtype(np.uint8), "int32_data"),
}
_DTYPE_NAMES = {1: "float", 11: "double", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8"}


def load_model(path: Path) -> Any:
    """The parsed ModelProto, external data not loaded; ModelFileError for a damaged file."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise ModelFileError(f"ONNX file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file")
    if path.stat().st_size >= 2 ** 31:
        raise ModelFileError(f"{path} is larger than 2 GB, the limit of an ONNX protobuf (large tensors "
                             f"belong in external data)")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not a readable ONNX file (truncated or damaged): {e}") from None
    if not model.HasField("graph") or not model.graph.output:
        raise ModelFileError(f"{path} holds no ONNX graph with an output (truncated, or not an ONNX model)")
    _check_text(model, path)
    return model


def _check_text(msg: Any, path: Path) -> None:
    """Every text field is text: ONNX's protobuf does not check UTF-8, so a damaged name
    would otherwise reach the converter as bytes."""
    from google.protobuf.message import Message

    for fd, value in msg.ListFields():
        items = value if not isinstance(value, (str, bytes, Message)) and hasattr(value, "__len__") else [value]
        if fd.type == fd.TYPE_STRING:
            if any(not isinstance(v, str) for v in items):
                raise ModelFileError(f"{path}: field '{fd.name}' of {msg.DESCRIPTOR.name} is not valid UTF-8 text "
                                     f"(the file is damaged)")
        elif fd.type == fd.TYPE_MESSAGE:
            for v in items:
                _check_text(v, path)


@dataclass(frozen=True)
class TensorHeader:
    """What a TensorProto claims, checked for consistency; ``read()`` makes the array."""
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    proto: Any
    folder: Path
    where: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        t = self.proto
        n, itemsize = self.size, self.dtype.itemsize
        if t.data_location == 1:  # EXTERNAL
            data = self._read_external(n * itemsize)
            arr = np.frombuffer(data, dtype=self.dtype.newbyteorder("<"))
        elif t.raw_data:
            if len(t.raw_data) != n * itemsize:
                raise ModelFileError(f"{self.where}: tensor '{self.name}' claims {n} elements of "
                                     f"{_DTYPE_NAMES[t.data_type]} ({n * itemsize} bytes) but holds "
                                     f"{len(t.raw_data)} bytes")
            arr = np.frombuffer(t.raw_data, dtype=self.dtype.newbyteorder("<"))
        else:
            field = _DTYPES[t.data_type][1]
            values = getattr(t, field)
            if len(values) != n:
                raise ModelFileError(f"{self.where}: tensor '{self.name}' claims {n} elements but holds "
                                     f"{len(values)}")
            if t.data_type == 10:  # float16 values are stored as their bit patterns in int32_data
                arr = np.asarray(values, dtype=np.uint16).view(np.float16)
            else:
                arr = np.asarray(values, dtype=self.dtype)
        arr = np.array(arr, dtype=self.dtype, copy=True).reshape(self.shape)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelFileError(f"{self.where}: tensor '{self.name}' contains NaN or inf")
        return arr

    def _read_external(self, nbytes: int) -> bytes:
        info = {e.key: e.value for e in self.proto.external_data}
        loc = info.get("location", "")
        if not loc:
            raise ModelFileError(f"{self.where}: tensor '{self.name}' is stored externally but names no file")
        rel = Path(loc)
        target = (self.folder / rel).resolve()
        folder = self.folder.resolve()
        if rel.is_absolute() or (target != folder and folder not in target.parents):
            raise ModelFileError(f"{self.where}: tensor '{self.name}' points to external data '{loc}' outside "
                                 f"the model's folder {folder}; refused")
        if not target.is_file():
            raise ModelFileError(f"{self.where}: external data '{loc}' of tensor '{self.name}' is not a file "
                                 f"in {folder}")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else nbytes
        except ValueError:
            raise ModelFileError(f"{self.where}: tensor '{self.name}' has a non-numeric external offset or "
                                 f"length") from None
        if offset < 0 or length != nbytes:
            raise ModelFileError(f"{self.where}: tensor '{self.name}' claims {nbytes} bytes but its external "
                                 f"data record says offset {offset}, length {length}")
        size = target.stat().st_size
        if offset + nbytes > size:
            raise ModelFileError(f"{self.where}: tensor '{self.name}' needs bytes {offset}..{offset + nbytes} of "
                                 f"'{loc}', which has {size} (truncated)")
        with open(target, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise ModelFileError(f"{self.where}: external data '{loc}' ended early")
        return data


def check_tensor(t: Any, folder: Path, where: str, *, name: str | None = None) -> TensorHeader:
    """The checked header of TensorProto ``t``: a known dtype, non-negative dims, a sane size."""
    name = name or t.name or "(unnamed)"
    if t.data_type not in _DTYPES:
        raise ModelFileError(f"{where}: tensor '{name}' has data type {t.data_type}; edgetune reads "
                             f"{', '.join(_DTYPE_NAMES.values())} tensors")
    if t.HasField("segment"):
        raise ModelFileError(f"{where}: tensor '{name}' is segmented, which edgetune does not read")
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise ModelFileError(f"{where}: tensor '{name}' has a negative dimension {list(dims)}")
    dtype = _DTYPES[t.data_type][0]
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelFileError(f"{where}: tensor '{name}' claims shape {list(dims)} ({math.prod(dims):.3g} "
                             f"elements, {nbytes:.3g} bytes), more than the {MAX_TENSOR_BYTES >> 20} MB edgetune "
                             f"reads; refused")
    # A tensor held in the file itself cannot be larger than the file: say so before reading.
    if t.data_location != 1 and not t.raw_data:
        field = _DTYPES[t.data_type][1]
        if len(getattr(t, field)) != math.prod(dims):
            raise ModelFileError(f"{where}: tensor '{name}' claims shape {list(dims)} "
                                 f"({math.prod(dims)} elements) but holds {len(getattr(t, field))}")
    elif t.data_location != 1 and len(t.raw_data) != nbytes:
        raise ModelFileError(f"{where}: tensor '{name}' claims shape {list(dims)} ({nbytes} bytes) but holds "
                             f"{len(t.raw_data)} bytes (truncated or damaged)")
    return TensorHeader(name, dtype, dims, t, folder, where)


def describe_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path))
