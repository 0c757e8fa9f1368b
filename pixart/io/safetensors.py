"""`.safetensors` without torch: the header read alone, tensors as copy-on-write maps of the file, atomic writes."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .base import CheckpointError, widen_bf16

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _header(f, path) -> dict:
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))
    except (struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` strings of a .safetensors file (empty when it has none); reads only the header."""
    with open(path, "rb") as f:
        return dict(_header(f, path).get("__metadata__") or {})


def safetensors_entries(path) -> dict:
    """{name: (shape, read)} for one .safetensors file, reading only the header: `read()` gives that one tensor (bf16
    widened to fp32 exactly) as a copy-on-write map of the file, as safetensors' own loader does: no copy is made
    and no fresh memory touched until something writes to it, which makes loading a large file far faster than
    reading it into new memory (measurements: docs/benchmarks.md, 'Design measurements')."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: weight file missing (listed in the folder's index?)")
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
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
