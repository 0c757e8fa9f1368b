"""What every weight-file reader shares: the error a user sees, and bf16 widening."""
from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is for the user."""


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32, exactly (a bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# by byte width: the exponent bits all ones, and every bit but the sign
_EXPONENT = {2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000)}
_MAGNITUDE = {2: np.uint16(0x7FFF), 4: np.uint32(0x7FFFFFFF), 8: np.uint64(0x7FFFFFFFFFFFFFFF)}


def first_non_finite(state: dict[str, np.ndarray], chunk: int = 1 << 24) -> str | None:
    """The name of the first float tensor of `state` holding a NaN or an infinity (None: all finite).

    Read as integers: a float is NaN or infinite exactly when its exponent bits are all ones, i.e. when its bits
    without the sign reach the exponent mask. Integer max is vectorised for every width (numpy reduces fp16
    element by element: a 24-layer T5-XXL took ~95 s to check that way), in chunks so that no temporary grows with
    the tensor."""
    for name, arr in state.items():
        arr = np.asarray(arr)
        if arr.dtype.kind != "f" or not arr.size:
            continue
        if arr.dtype.itemsize not in _EXPONENT:  # float128 and the like: the plain check
            if not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
                return name
            continue
        exponent, magnitude = _EXPONENT[arr.dtype.itemsize], _MAGNITUDE[arr.dtype.itemsize]
        bits = np.ascontiguousarray(arr).reshape(-1).view(exponent.dtype)
        for i in range(0, bits.size, chunk):
            if (bits[i:i + chunk] & magnitude).max() >= exponent:
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
