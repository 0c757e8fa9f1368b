"""Weights into a model: strict name and shape checks that list every problem at once, then one copy (or none)."""
from __future__ import annotations

import re

import numpy as np
import mindspore as ms

from .base import CheckpointError


def load_into(cell, state: dict[str, np.ndarray], what: str = "model", strict: bool = True,
              ignore: tuple[str, ...] = (), share: bool = False) -> None:
    """Copy `state` into `cell`'s parameters by name, casting to each parameter's dtype.

    With `strict`, any missing or unexpected key or shape mismatch raises a CheckpointError listing them all.
    `share`: a parameter whose dtype the array already has takes the array's memory instead of a copy (loading a
    model for inference from a state dict read for it: one copy of the weights in memory, not two); the arrays must
    then not be written, nor given to a second model.
    """
    params = {p.name: p for p in cell.get_parameters()}
    problems = check_state({k: tuple(p.shape) for k, p in params.items()}, state, ignore)
    if strict and any(problems):
        raise CheckpointError(describe_mismatch(what, *problems))
    for k, p in params.items():
        if k in state and tuple(state[k].shape) == tuple(p.shape):
            arr = state[k]
            if p.dtype == ms.bfloat16:
                arr = _as_bf16(arr)
            shared = ms.from_numpy(arr) if share and arr.flags.c_contiguous else None
            p.set_data(shared if shared is not None and shared.dtype == p.dtype else ms.Tensor(arr, dtype=p.dtype))


def _as_bf16(arr: np.ndarray) -> np.ndarray:
    """fp16 / fp32 weights for a bf16 parameter, converted by the CPU kernels' threaded converter where it is built
    on CPU (the bf16 array is then taken without a copy); else `arr` as is, for MindSpore's own cast."""
    from pixart import backend
    if backend.device_target() != "CPU" or arr.dtype not in (np.float16, np.float32):
        return arr
    from pixart.cpu import kernels
    fast = kernels.to_bf16(arr)
    return arr if fast is None else fast


def check_state(shapes: dict[str, tuple], state: dict, ignore: tuple[str, ...] = ()) -> tuple[list, list, list]:
    """(missing, unexpected, mismatched) keys of `state` against a model's {parameter name: shape}; keys starting
    with one of `ignore` are never unexpected."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes and not any(k.startswith(i) for i in ignore)]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(s)}"
                  for k, s in shapes.items() if k in state and tuple(state[k].shape) != tuple(s)]
    return missing, unexpected, mismatched


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
