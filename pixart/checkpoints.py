"""Reading and writing weights: `.safetensors` (plain or sharded), `.ckpt`, HF folders, and (for conversion only)
PyTorch `.pth` / `.bin`. Everything is read into `{name: numpy array}` so that loading is one code path.

Torch is imported lazily and only by `read_torch`, which only `tools/convert.py` and tests reach.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is for the user."""


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Read a .safetensors file without torch; bf16 tensors are widened to fp32 exactly."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = np.frombuffer(raw, _ST_DTYPES[info["dtype"]])
        else:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(state: dict[str, np.ndarray], path, metadata: dict | None = None) -> None:
    """Write fp32/fp16/int tensors as .safetensors, atomically (temporary file, then rename)."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
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


def read_ckpt(path) -> dict[str, np.ndarray]:
    import mindspore as ms
    try:
        params = ms.load_checkpoint(str(path))
    except Exception as e:  # MindSpore raises bare ValueError/RuntimeError with long traces
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({str(e).splitlines()[0]})") from None
    return {k: v.asnumpy() for k, v in params.items()}


def write_ckpt(state: dict[str, np.ndarray], path) -> None:
    """Save `{name: array}` as a MindSpore .ckpt atomically."""
    import mindspore as ms
    tmp = f"{path}.tmp.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], tmp)
    os.replace(tmp, path)


def read_torch(path) -> dict[str, np.ndarray]:
    """Read a PyTorch .pth/.bin; unwraps `state_dict_ema` / `state_dict` / `model` wrappers (EMA preferred)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch files needs torch (pip install torch==2.13.0)") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in obj.items() if hasattr(v, "detach")}


_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Read weights from a file (.safetensors / .ckpt / .pth / .bin / .pt) or an HF model folder (sharded too)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in _WEIGHT_FILES:
            index = path / f"{name}.index.json"
            if index.exists():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                state = {}
                for shard in shards:
                    state.update(read_state_dict(path / shard))
                return state
            if (path / name).exists():
                return read_state_dict(path / name)
        raise CheckpointError(f"{path}: no weights found (looked for {', '.join(_WEIGHT_FILES)} and their "
                              ".index.json shards)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".ckpt":
        return read_ckpt(path)
    if suffix in (".pth", ".pt", ".bin"):
        return read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected .safetensors, .ckpt, .pth, .bin)")


def read_config(folder) -> dict:
    """The `config.json` of an HF model folder."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a HuggingFace model folder)")
    return json.loads(path.read_text())


def load_into(cell, state: dict[str, np.ndarray], what: str = "model", strict: bool = True,
              ignore: tuple[str, ...] = ()) -> None:
    """Copy `state` into `cell`'s parameters by name, casting to each parameter's dtype.

    With `strict`, any missing or unexpected key or shape mismatch raises a CheckpointError listing them all.
    """
    import mindspore as ms
    params = {p.name: p for p in cell.get_parameters()}
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params and not any(k.startswith(i) for i in ignore)]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
                  for k, p in params.items() if k in state and tuple(state[k].shape) != tuple(p.shape)]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(describe_mismatch(what, missing, unexpected, mismatched))
    for k, p in params.items():
        if k in state and tuple(state[k].shape) == tuple(p.shape):
            p.set_data(ms.Tensor(state[k]).astype(p.dtype))


def describe_mismatch(what, missing, unexpected, mismatched, limit: int = 8) -> str:
    def part(title, items):
        if not items:
            return ""
        more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more
    return (f"checkpoint does not fit the {what}" + part("missing keys", missing)
            + part("unexpected keys", unexpected) + part("shape mismatches", mismatched))
