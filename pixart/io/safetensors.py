"""`.safetensors` without torch: the header read alone, tensors as copy-on-write maps of the file, atomic writes."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .base import CheckpointError, widen_bf16

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def _header(f, path) -> dict:
    """The JSON header, its length bounded by the file's size and its entries type-checked against the data that
    follows it: CheckpointError naming the file for anything else (never a huge read or a TypeError)."""
    def bad(why):
        return CheckpointError(f"{path}: not a safetensors file ({why})")
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise bad(f"header length {n} exceeds the file's {size} bytes" if n > size - 8
                  else f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON: {str(e)[:80]}") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ is not an object of strings")
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list):
            raise bad(f"tensor {name!r} has no dtype / shape / data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has a bad shape {shape!r}")
        if len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1] <= data:
            raise bad(f"tensor {name!r} has data offsets {offsets!r} outside the file's {data} data bytes")
        item = 2 if info["dtype"] == "BF16" else np.dtype(_DTYPES[info["dtype"]]).itemsize \
            if info["dtype"] in _DTYPES else None
        if item is not None and offsets[1] - offsets[0] != math.prod(shape) * item:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
    return header


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` strings of a .safetensors file (empty when it has none); reads only the header."""
    try:
        with open(path, "rb") as f:
            return dict(_header(f, path).get("__metadata__") or {})
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder, not a safetensors file") from None


def safetensors_entries(path) -> dict:
    """{name: (shape, read)} for one .safetensors file, reading only the header: `read()` gives that one tensor (bf16
    widened to fp32 exactly) as a copy-on-write map of the file, as safetensors' own loader does: no copy is made
    and no fresh memory touched until something writes to it, which makes loading a large file far faster than
    reading it into new memory (measurements: docs/benchmarks.md, 'Design measurements')."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: weight file missing (listed in the folder's index?)")
    if not path.is_file():
        raise CheckpointError(f"{path}: a folder, not a safetensors file")
    with open(path, "rb") as f:
        header = _header(f, path)
        base = f.tell()
    header.pop("__metadata__", None)

    def reader(name, info):
        def read():
            start, end = info["data_offsets"]
            dt = np.uint16 if info["dtype"] == "BF16" else _DTYPES.get(info["dtype"])
            if dt is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            count = (end - start) // np.dtype(dt).itemsize
            arr = np.asarray(np.memmap(path, dt, "c", base + start, (count,))) if count else np.zeros(0, dt)
            if info["dtype"] == "BF16":
                arr = widen_bf16(arr)
            return arr.reshape(info["shape"])
        return read

    return {name: (tuple(info["shape"]), reader(name, info)) for name, info in header.items()}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Read a .safetensors file without torch: every tensor a copy-on-write map of the file (see
    `safetensors_entries`); bf16 tensors are widened to fp32 exactly."""
    return {name: read() for name, (_, read) in safetensors_entries(path).items()}


def write_safetensors(state: dict[str, np.ndarray], path, metadata: dict | None = None) -> None:
    """Write fp32/fp16/int tensors as .safetensors, atomically (temporary file, then rename)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, arr in state.items():
        arr = np.ascontiguousarray(arr)
        b = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
