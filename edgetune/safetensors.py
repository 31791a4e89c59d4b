"""The safetensors file format in plain NumPy (the core must not need the Rust package).

Layout: 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the tensor bytes (little-endian, C order). Files we write load with the reference
``safetensors`` library and vice versa; every inconsistency in a file we read raises
``ModelFileError`` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import ModelFileError
from .io_atomic import write_bytes_atomic

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        code = _CODES.get(np.dtype(dt).newbyteorder("<") if dt.itemsize > 1 else dt)
        if code is None:
            raise TypeError(f"tensor '{name}': dtype {arr.dtype} cannot be stored in safetensors")
        data = np.ascontiguousarray(arr, dtype=DTYPES[code]).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align tensor data to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def loads(buf: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    def bad(msg: str) -> ModelFileError:
        return ModelFileError(f"{source}: not a valid safetensors file: {msg}")

    if len(buf) < 8:
        raise bad(f"only {len(buf)} bytes (truncated?)")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > MAX_HEADER or 8 + n > len(buf):
        raise bad(f"header claims {n} bytes but the file has {len(buf) - 8} after the length field (truncated?)")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data = memoryview(buf)[8 + n:]
    tensors: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise bad(f"entry '{name}' lacks dtype/shape/data_offsets")
        dt = DTYPES.get(info["dtype"])
        if dt is None:
            raise bad(f"tensor '{name}' has unsupported dtype {info['dtype']!r}")
        shape, offs = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)):
            raise bad(f"tensor '{name}' has a malformed shape or offsets")
        begin, end = offs
        expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if not 0 <= begin <= end <= len(data):
            raise bad(f"tensor '{name}' lies at bytes {begin}..{end} but the data is {len(data)} bytes (truncated?)")
        if end - begin != expected:
            raise bad(f"tensor '{name}' of shape {shape} {info['dtype']} needs {expected} bytes, has {end - begin}")
        spans.append((begin, end, name))
        tensors[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).copy()
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise bad(f"tensor '{name}' starts at {begin}, expected {pos} (overlap or gap)")
        pos = end
    if pos != len(data):
        raise bad(f"{len(data) - pos} bytes after the last tensor")
    return tensors, dict(metadata)


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temporary file, fsync, rename)."""
    return write_bytes_atomic(path, dumps(tensors, metadata))


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, expected a .safetensors file") from None
    return loads(buf, str(path))
