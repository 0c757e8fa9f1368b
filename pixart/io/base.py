"""What every weight-file reader shares: the error a user sees, and bf16 widening."""
from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is for the user."""


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32, exactly (a bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def first_non_finite(state: dict[str, np.ndarray]) -> str | None:
    """The name of the first float tensor of `state` holding a NaN or an infinity (None: all finite). Two passes of
    min / max per tensor (NaN propagates through both), no temporary the size of the tensor."""
    for name, arr in state.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
            return name
    return None


def refuse_non_finite(state: dict[str, np.ndarray], what) -> dict[str, np.ndarray]:
    """`state` if every float tensor is finite, else CheckpointError naming the first tensor that is not: weights
    holding NaN / inf produce black or garbage images without an error, so they are refused where they are read."""
    name = first_non_finite(state)
    if name is not None:
        raise CheckpointError(f"{what}: tensor {name} holds non-finite values (NaN or inf); the file is corrupt or "
                              "comes from a diverged run")
    return state
