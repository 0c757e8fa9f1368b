"""PyTorch `.pth` / `.bin` / `.pt`, for conversion only: torch is imported here alone, and only when such a file is
read (tools/convert.py and the tests reach it; sampling and training never need torch)."""
from __future__ import annotations

import numpy as np

from .atomic import atomic_path
from .base import CheckpointError


def read_torch(path) -> dict[str, np.ndarray]:
    """Read a PyTorch .pth/.bin; unwraps `state_dict_ema` / `state_dict` / `model` wrappers (EMA preferred)."""
    try:
        import torch  # optional: only conversion from PyTorch files needs it
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


def write_torch(state: dict[str, np.ndarray], path) -> None:
    """Write `state` as the original PixArt release files are: a PyTorch file holding {"state_dict": tensors}."""
    try:
        import torch  # optional: only conversion to PyTorch files needs it
    except ImportError:
        raise CheckpointError(f"{path}: writing PyTorch files needs torch (pip install torch==2.13.0)") from None
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, tmp)
