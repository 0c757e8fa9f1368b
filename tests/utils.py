"""Shared helpers for the tests."""
import numpy as np
def rel_err(ours, ref) -> float:
    """max |ours - ref| relative to the reference's scale (max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))
