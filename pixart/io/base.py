"""What every weight-file reader shares: the error a user sees, and bf16 widening."""
from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is for the user."""


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32, exactly (a bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
