"""Any weight file or HuggingFace model folder -> `{name: numpy array}` (plus the file's metadata strings), so that
loading is one code path whatever the format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import CheckpointError
from .ckpt import read_ckpt_with_metadata
from .pth import read_torch
from .safetensors import read_safetensors, read_safetensors_metadata

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")


def read_weights(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata strings) of a file (.safetensors / .ckpt / .pth / .bin / .pt) or an HF model folder
    (sharded too). Metadata: a .safetensors header's `__metadata__`, a .ckpt's `append_dict` strings; none for
    PyTorch files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in WEIGHT_FILES:
            index = path / f"{name}.index.json"
            if index.exists():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
        return read_safetensors(path), read_safetensors_metadata(path)
    if suffix == ".ckpt":
        return read_ckpt_with_metadata(path)
    if suffix in (".pth", ".pt", ".bin"):
        return read_torch(path), {}
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected .safetensors, .ckpt, .pth, .bin)")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a weight file or HF model folder (see `read_weights`)."""
    return read_weights(path)[0]


def read_config(folder) -> dict:
    """The `config.json` of an HF model folder."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a HuggingFace model folder)")
    return json.loads(path.read_text())
