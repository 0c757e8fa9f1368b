"""Reading and writing weights: `.safetensors` (plain or sharded), `.ckpt`, HF folders, and (for conversion only)
PyTorch `.pth` / `.bin`. Everything is read into `{name: numpy array}` so that loading is one code path.

Torch is imported lazily and only by `read_torch`, which only `tools/convert.py` and tests reach.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import numpy as np

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32, exactly (a bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is for the user."""


def _safetensors_header(f, path) -> dict:
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))
    except (struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` strings of a .safetensors file (empty when it has none); reads only the header."""
    with open(path, "rb") as f:
        return dict(_safetensors_header(f, path).get("__metadata__") or {})


def safetensors_entries(path) -> dict:
    """{name: (shape, read)} for one .safetensors file, reading only the header: `read()` gives that one tensor (bf16
    widened to fp32 exactly) as a copy-on-write map of the file, as safetensors' own loader does: no copy is made
    and no fresh memory touched until something writes to it (on the 2-core VM reading 2.4 GB into new memory took
    7-13 s, mapping it 0.1 s)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: weight file missing (listed in the folder's index?)")
    with open(path, "rb") as f:
        header = _safetensors_header(f, path)
        base = f.tell()
    header.pop("__metadata__", None)

    def reader(name, info):
        def read():
            start, end = info["data_offsets"]
            dt = np.uint16 if info["dtype"] == "BF16" else _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            count = (end - start) // np.dtype(dt).itemsize
            arr = np.asarray(np.memmap(path, dt, "c", base + start, (count,))) if count else np.zeros(0, dt)
            if info["dtype"] == "BF16":
                arr = _widen_bf16(arr)
            return arr.reshape(info["shape"])
        return read

    return {name: (tuple(info["shape"]), reader(name, info)) for name, info in header.items()}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Read a .safetensors file without torch: every tensor a copy-on-write map of the file (see
    `safetensors_entries`); bf16 tensors are widened to fp32 exactly."""
    return {name: read() for name, (_, read) in safetensors_entries(path).items()}


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


_CKPT_DTYPES = {"Float64": np.float64, "Float32": np.float32, "Float16": np.float16, "BFloat16": np.uint16,
                "Int64": np.int64, "Int32": np.int32, "Int16": np.int16, "Int8": np.int8, "UInt8": np.uint8,
                "Bool": np.bool_}


def _varint(buf, pos: int) -> tuple[int, int]:
    """The protobuf varint at buf[pos] and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos, value, shift = pos + 1, value | (byte & 0x7F) << shift, shift + 7
        if byte < 0x80:
            return value, pos


def _protobuf_fields(buf, start: int, end: int):
    """(field number, wire type, value or offset, length) of each field of the protobuf message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, 0
        elif wire in (1, 2, 5):
            length, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            yield number, wire, pos, length
            pos += length
        else:
            raise ValueError(f"wire type {wire} at byte {pos}")


def _tensor_proto(raw, start: int, end: int) -> tuple[list[int], str | None, tuple[int, int] | None]:
    """TensorProto {repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3} -> (dims, type,
    (offset, length) of the content)."""
    dims, dtype, content = [], None, None
    for number, wire, a, length in _protobuf_fields(raw, start, end):
        if number == 1 and wire == 0:
            dims.append(a)
        elif number == 1 and wire == 2:  # packed
            pos = a
            while pos < a + length:
                value, pos = _varint(raw, pos)
                dims.append(value)
        elif number == 2:
            dtype = bytes(raw[a:a + length]).decode()
        elif number == 3:
            content = (a, length)
    return dims, dtype, content


def _read_ckpt_stream(path) -> dict[str, np.ndarray]:
    """A MindSpore .ckpt (protobuf `Checkpoint { repeated Value { string tag = 1; TensorProto tensor = 2 } }`) read
    from a map of the file, one tensor at a time: each tensor's bytes become one array, shared with the map where
    aligned to its item size, else read from the file into new memory once. The peak is one copy of the weights
    (`ms.load_checkpoint` peaked at two: 5.2 GB for a 2.4 GB PixArt-XL/2, in 15-17 s). Consecutive values with the
    same tag (a large tensor saved in slices) are joined. Raises ValueError on anything else (the caller falls back to
    MindSpore's reader, which also knows encrypted files)."""
    mm = np.memmap(path, np.uint8, "c")
    raw = mm.base  # the mmap object itself: byte access without numpy scalars
    state, last = {}, None
    with open(path, "rb") as file:  # unaligned tensors are read from it, not through the map (its pages count)
        for number, wire, start, length in _protobuf_fields(raw, 0, len(mm)):
            if (number, wire) != (1, 2):
                raise ValueError(f"unexpected top-level field {number}")
            tag, tensor = None, None
            for n, w, a, ln in _protobuf_fields(raw, start, start + length):
                if n == 1 and w == 2:
                    tag = bytes(raw[a:a + ln]).decode()
                elif n == 2 and w == 2:
                    tensor = _tensor_proto(raw, a, a + ln)
                else:
                    raise ValueError(f"value field {n} (a map tensor?) is not supported")
            if tag is None or tensor is None or tensor[1] not in _CKPT_DTYPES or tensor[2] is None:
                raise ValueError(f"value {tag!r}: no tensor of a known dtype")
            dims, dtype, (offset, size) = tensor
            item = np.dtype(_CKPT_DTYPES[dtype])
            if offset % item.itemsize == 0:
                arr = np.frombuffer(mm, item, size // item.itemsize, offset)
            else:
                file.seek(offset)
                arr = np.fromfile(file, item, size // item.itemsize)
            if tag == last:  # a slice of the previous tensor
                arr = np.concatenate([state[tag][0], arr])
            state[tag], last = (arr, dims, dtype), tag
    out = {}
    for tag, (arr, dims, dtype) in state.items():
        if int(np.prod(dims)) != arr.size:
            raise ValueError(f"{tag}: {arr.size} values for dims {dims}")
        if dtype == "BFloat16":
            arr = _widen_bf16(arr)
        out[tag] = arr.reshape(dims)
    return out


def read_ckpt(path) -> dict[str, np.ndarray]:
    """A MindSpore .ckpt as {name: array}: streamed from a map of the file (`_read_ckpt_stream`), or through
    `ms.load_checkpoint` where that reader does not understand the file."""
    try:
        return _read_ckpt_stream(path)
    except (ValueError, IndexError, UnicodeDecodeError, OSError):
        pass
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
    os.chmod(tmp, 0o644)  # MindSpore writes 0400
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
              ignore: tuple[str, ...] = (), share: bool = False) -> None:
    """Copy `state` into `cell`'s parameters by name, casting to each parameter's dtype.

    With `strict`, any missing or unexpected key or shape mismatch raises a CheckpointError listing them all.
    `share`: a parameter whose dtype the array already has takes the array's memory instead of a copy (loading a
    model for inference from a state dict read for it: one copy of the weights in memory, not two); the arrays must
    then not be written, nor given to a second model.
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
            arr = state[k]
            if share and arr.dtype == ms.dtype_to_nptype(p.dtype) and arr.flags.c_contiguous:
                p.set_data(ms.from_numpy(arr))
            else:
                p.set_data(ms.Tensor(arr).astype(p.dtype))


def describe_mismatch(what, missing, unexpected, mismatched, limit: int = 8) -> str:
    def part(title, items, group=True):
        if not items:
            return ""
        shown = _group_layers(items) if group else items
        more = f" ... (+{len(shown) - limit} more)" if len(shown) > limit else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(shown[:limit]) + more
    return (f"checkpoint does not fit the {what}" + part("missing keys", missing)
            + part("unexpected keys", unexpected) + part("shape mismatches", mismatched, group=False))


def _group_layers(keys: list[str]) -> list[str]:
    """'blocks.2.x', ..., 'blocks.27.x' -> 'blocks.{2..27}.x', so a depth mismatch reads at a glance."""
    import re
    groups: dict[str, list[int]] = {}
    order = []
    for k in keys:
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", k)
        pattern = f"{m.group(1)}#{m.group(3)}" if m else k
        if pattern not in groups:
            groups[pattern] = []
            order.append(pattern)
        if m:
            groups[pattern].append(int(m.group(2)))
    out = []
    for p in order:
        idx = sorted(groups[p])
        if not idx:
            out.append(p)
            continue
        ranged = str(idx[0]) if len(idx) == 1 else (f"{{{idx[0]}..{idx[-1]}}}" if idx == list(range(idx[0], idx[-1] + 1))
                                                    else "{" + ",".join(map(str, idx)) + "}")
        out.append(p.replace("#", ranged))
    return out


# ----------------------------------------------------------------------------------------------------------------
# PixArt transformer: diffusers names -> original names (the names our model uses)
# ----------------------------------------------------------------------------------------------------------------
_DIFFUSERS_RENAMES = [  # (diffusers prefix, original prefix); block index N is carried over
    ("pos_embed.proj.", "x_embedder.proj."),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    ("caption_projection.y_embedding", "y_embedder.y_embedding"),
    ("adaln_single.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("adaln_single.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("adaln_single.emb.resolution_embedder.linear_1.", "csize_embedder.mlp.0."),
    ("adaln_single.emb.resolution_embedder.linear_2.", "csize_embedder.mlp.2."),
    ("adaln_single.emb.aspect_ratio_embedder.linear_1.", "ar_embedder.mlp.0."),
    ("adaln_single.emb.aspect_ratio_embedder.linear_2.", "ar_embedder.mlp.2."),
    ("adaln_single.linear.", "t_block.1."),
    ("proj_out.", "final_layer.linear."),
    ("scale_shift_table", "final_layer.scale_shift_table"),
]
_DIFFUSERS_BLOCK_RENAMES = [  # inside transformer_blocks.N -> blocks.N
    ("scale_shift_table", "scale_shift_table"),
    ("attn1.to_out.0.", "attn.proj."),
    ("attn1.q_norm.", "attn.q_norm."),
    ("attn1.k_norm.", "attn.k_norm."),
    ("ff.net.0.proj.", "mlp.fc1."),
    ("ff.net.2.", "mlp.fc2."),
    ("attn2.to_q.", "cross_attn.q_linear."),
    ("attn2.to_out.0.", "cross_attn.proj."),
]
_FUSED = [("attn1.", ("to_q", "to_k", "to_v"), "attn.qkv"), ("attn2.", ("to_k", "to_v"), "cross_attn.kv_linear")]
RECOMPUTED_BUFFERS = ("pos_embed", "pos_embed.pos_embed")  # sin-cos tables the model computes per input size


def is_diffusers_transformer(state: dict) -> bool:
    return any(k.startswith("transformer_blocks.") for k in state)


def diffusers_to_original(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rename a diffusers `PixArtTransformer2DModel` state dict to the original PixArt names, fusing the split
    q/k/v projections back into `attn.qkv` and `cross_attn.kv_linear`. Returns (state, keys it could not map)."""
    out, unmapped = {}, []
    src = dict(state)
    for key in [k for k in src if k.startswith("transformer_blocks.")]:
        if key not in src:
            continue
        _, n, rest = key.split(".", 2)
        for prefix, parts, target in _FUSED:
            if rest.startswith(prefix) and rest[len(prefix):].split(".")[0] in parts:
                suffix = rest.split(".")[-1]  # weight / bias
                names = [f"transformer_blocks.{n}.{prefix}{p}.{suffix}" for p in parts]
                if all(nm in src for nm in names):
                    out[f"blocks.{n}.{target}.{suffix}"] = np.concatenate([src.pop(nm) for nm in names], 0)
                break
        else:
            for a, b in _DIFFUSERS_BLOCK_RENAMES:
                if rest.startswith(a):
                    out[f"blocks.{n}.{b}{rest[len(a):]}"] = src.pop(key)
                    break
    for key in list(src):
        if key.startswith("transformer_blocks."):
            unmapped.append(key)
            continue
        if key in RECOMPUTED_BUFFERS:
            src.pop(key)
            continue
        for a, b in _DIFFUSERS_RENAMES:
            if key.startswith(a):
                out[b + key[len(a):]] = src.pop(key)
                break
        else:
            unmapped.append(key)
    return out, unmapped


def diffusers_module_to_original(name: str) -> tuple[str, int | None, int] | None:
    """A diffusers `PixArtTransformer2DModel` module name -> (our module, index of its slice in a fused layer or
    None, number of slices), e.g. `transformer_blocks.3.attn1.to_k` -> (`blocks.3.attn.qkv`, 1, 3); None when
    the name has no counterpart. Read off the same tables as `diffusers_to_original` (LoRA files name modules)."""
    if name.startswith("transformer_blocks."):
        parts = name.split(".", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        _, n, rest = parts
        for prefix, fused, target in _FUSED:
            if rest.startswith(prefix) and rest[len(prefix):] in fused:
                return f"blocks.{n}.{target}", fused.index(rest[len(prefix):]), len(fused)
        for a, b in _DIFFUSERS_BLOCK_RENAMES:
            if a.endswith(".") and rest + "." == a:
                return f"blocks.{n}.{b[:-1]}", None, 1
        return None
    for a, b in _DIFFUSERS_RENAMES:
        if a.endswith(".") and name + "." == a:
            return b[:-1], None, 1
    return None


def original_module_to_diffusers(name: str) -> list[str] | None:
    """Our module name -> its diffusers module name(s): one per slice of a fused layer (`blocks.3.attn.qkv` ->
    `transformer_blocks.3.attn1.to_q`, `.to_k`, `.to_v`), else one; None when diffusers has no such module."""
    if name.startswith("blocks."):
        parts = name.split(".", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        _, n, rest = parts
        for prefix, fused, target in _FUSED:
            if rest == target:
                return [f"transformer_blocks.{n}.{prefix}{p}" for p in fused]
        for a, b in _DIFFUSERS_BLOCK_RENAMES:
            if a.endswith(".") and rest + "." == b:
                return [f"transformer_blocks.{n}.{a[:-1]}"]
        return None
    for a, b in _DIFFUSERS_RENAMES:
        if a.endswith(".") and name + "." == b:
            return [a[:-1]]
    return None


def fused_slices(name: str) -> tuple[str, ...]:
    """Names of the slices of our fused layer `name` along its output (`attn.qkv` -> q, k, v), else ()."""
    rest = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    for _, fused, target in _FUSED:
        if rest == target:
            return tuple(p.removeprefix("to_") for p in fused)
    return ()


def infer_pixart_config(state: dict[str, np.ndarray], diffusers_config: dict | None = None):
    """Read a PixArtConfig off original-named weights (and a diffusers config.json, when there is one)."""
    from pixart.models.pixart import PixArtConfig
    if "x_embedder.proj.weight" not in state:
        raise CheckpointError("not a PixArt transformer checkpoint: no x_embedder.proj.weight "
                              f"(found keys like {', '.join(list(state)[:5])})")
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden, patch = proj.shape[0], proj.shape[-1]
    kv_layers = sorted(int(k.split(".")[1]) for k in state if k.endswith("attn.sr.weight"))
    sr = state[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1] if kv_layers else 1
    fields = dict(
        patch_size=patch, in_channels=proj.shape[1], hidden_size=hidden, depth=depth,
        num_heads=max(1, hidden // 72),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if depth else 4.0,
        pred_sigma=state["final_layer.linear.weight"].shape[0] == patch * patch * proj.shape[1] * 2,
        caption_channels=state["y_embedder.y_proj.fc1.weight"].shape[1],
        micro_condition="csize_embedder.mlp.0.weight" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        kv_compress_config={"sampling": "conv" if kv_layers else None, "scale_factor": sr,
                            "kv_compress_layer": kv_layers})
    # unknown until the weights say: the caption length (y_embedding) and the training size (pos_embed / config)
    fields["model_max_length"] = state["y_embedder.y_embedding"].shape[0] if "y_embedder.y_embedding" in state else None
    fields["input_size"] = None
    if diffusers_config:
        c = diffusers_config
        fields["num_heads"] = c.get("num_attention_heads", fields["num_heads"])
        fields["input_size"] = c.get("sample_size", 128)
        fields["pe_interpolation"] = float(c.get("interpolation_scale") or max(fields["input_size"] // 64, 1))
    elif "pos_embed" in state:  # the original's fixed buffer (1, T, D) tells the training resolution
        fields["input_size"] = int(round(state["pos_embed"].shape[1] ** 0.5)) * patch
    return PixArtConfig(**fields)


def match_preset(cfg, known=("model_max_length", "input_size")) -> tuple[str | None, list[str]]:
    """The public checkpoint whose architecture `cfg` has (None if none does), and otherwise the differences from
    the closest one. Fields in `known` are compared only when the weights said them (see infer_pixart_config)."""
    from pixart.models.pixart import PRESETS, preset_config
    fields = ["hidden_size", "depth", "patch_size", "caption_channels", "micro_condition", "qk_norm",
              "kv_layers"] + [f for f in known if getattr(cfg, f) is not None]
    best, best_diff = None, None
    for name in PRESETS:
        ref = preset_config(name)
        diff = [f"{f}={_field(cfg, f)!r} (preset {_field(ref, f)!r})" for f in fields
                if _field(cfg, f) != _field(ref, f)]
        if best_diff is None or len(diff) < len(best_diff):
            best, best_diff = name, diff
    return (best if not best_diff else None), ([] if not best_diff else [f"closest: {best}"] + best_diff)


def _field(cfg, name):
    if name == "kv_layers":
        kv = cfg.kv_compress_config
        return kv.layers, kv.sampling if kv.layers else None
    return getattr(cfg, name)


def convert_pixart(source, input_size: int | None = None):
    """Load any PixArt transformer checkpoint (original .pth / .safetensors / .ckpt, or a diffusers folder or
    file) as (original-named state, PixArtConfig). Buffers the model recomputes (`pos_embed`) are dropped."""
    source = Path(source)
    dconfig = None
    if source.is_dir() and (source / "config.json").exists():
        dconfig = read_config(source)
    elif source.is_dir() and (source / "transformer" / "config.json").exists():  # a whole pipeline folder
        source = source / "transformer"
        dconfig = read_config(source)
    state = read_state_dict(source)
    if is_diffusers_transformer(state):
        state, unmapped = diffusers_to_original(state)
        if unmapped:
            raise CheckpointError(describe_mismatch("PixArt transformer (diffusers names)", [], unmapped, []))
    cfg = infer_pixart_config(state, dconfig)
    if input_size:
        cfg.input_size = input_size
    for key in RECOMPUTED_BUFFERS:
        state.pop(key, None)
    return state, cfg


def fill_null_caption(state, cfg, model_max_length: int | None = None, log=print):
    """diffusers checkpoints do not carry the null caption `y_embedding` (only training's caption dropout and the
    optional `uncond=y_embedding` sampling use it). Fill it as training from scratch initialises it, seeded."""
    if "y_embedder.y_embedding" in state:
        return
    cfg.model_max_length = model_max_length or cfg.model_max_length or 120
    rng = np.random.default_rng(0)
    c = cfg.caption_channels
    state["y_embedder.y_embedding"] = (rng.standard_normal((cfg.model_max_length, c)) / c ** 0.5).astype(np.float32)
    log(f"note: the source has no y_embedder.y_embedding (diffusers drops it); initialised a fresh one with "
        f"{cfg.model_max_length} tokens")


def convert_pixart_file(source, target, preset: str | None = None, input_size: int | None = None,
                        model_max_length: int | None = None, log=print):
    """`tools/convert.py`: convert, check against the model the weights describe, write `target` atomically."""
    from pixart.models.pixart import PixArt, preset_config
    state, cfg = convert_pixart(source, input_size)
    name, diff = match_preset(cfg)
    if model_max_length is None and (preset or name):
        model_max_length = preset_config(preset or name).model_max_length
    fill_null_caption(state, cfg, model_max_length, log)
    if preset is not None:
        ref = preset_config(preset)
        model = PixArt(ref)
        load_into(model, state, what=f"preset {preset}" + (f" (the file looks like {name})" if name else
                                                            f" ({'; '.join(diff)})"))
    else:
        model = PixArt(dataclasses.replace(cfg, input_size=cfg.input_size or 32))
        load_into(model, state, what="PixArt model inferred from the file")
    log(f"matches preset: {name}" if name else "no public preset matches exactly; " + "; ".join(diff))
    log(f"config: depth={cfg.depth} hidden={cfg.hidden_size} heads={cfg.num_heads} input_size={cfg.input_size} "
        f"micro_condition={cfg.micro_condition} kv_compress={list(cfg.kv_compress_config.layers) or 'no'} "
        f"qk_norm={cfg.qk_norm} tokens={cfg.model_max_length}")
    if not str(target).endswith(".ckpt"):
        raise CheckpointError(f"target must end in .ckpt, got {target}")
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    write_ckpt(state, target)
    log(f"wrote {len(state)} tensors to {target}")
    return name, cfg
