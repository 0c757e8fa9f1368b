"""Any weight file or HuggingFace model folder -> `{name: numpy array}` (plus the file's metadata strings), so that
loading is one code path whatever the format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import CheckpointError, refuse_non_finite
from .ckpt import read_ckpt_with_metadata
from .pth import read_torch
from .safetensors import read_safetensors, read_safetensors_metadata

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")


def read_weights(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata strings) of a file (.safetensors / .ckpt / .pth / .bin / .pt) or an HF model folder
    (sharded too); a float tensor holding NaN / inf is refused (`refuse_non_finite`). Metadata: a .safetensors
    header's `__metadata__`, a .ckpt's `append_dict` strings; none for PyTorch files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in WEIGHT_FILES:
            index = path / f"{name}.index.json"
            if index.exists():
                shards = index_shards(index)
                state, metadata = {}, {}
                for shard in shards:
                    s, m = read_weights(path / shard)
                    state.update(s)
                    metadata.update(m)
                return state, metadata
            if (path / name).exists():
                return read_weights(path / name)
        raise CheckpointError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)} and their "
                              ".index.json shards)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, metadata = read_safetensors(path), read_safetensors_metadata(path)
    elif suffix == ".ckpt":
        state, metadata = read_ckpt_with_metadata(path)
    elif suffix in (".pth", ".pt", ".bin"):
        state, metadata = read_torch(path), {}
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected .safetensors, .ckpt, .pth, "
                              ".bin)")
    return refuse_non_finite(state, path), metadata


def index_shards(index: Path) -> list[str]:
    """The shard files a `*.index.json` names (sorted, each once); CheckpointError for a malformed index."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
                                                   for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a weight index (expected {{\"weight_map\": {{name: shard file}}}})")
    return sorted(set(weight_map.values()))


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a weight file or HF model folder (see `read_weights`)."""
    return read_weights(path)[0]


def read_config(folder) -> dict:
    """The `config.json` of an HF model folder."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a HuggingFace model folder)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:80]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got a {type(config).__name__}")
    return config
