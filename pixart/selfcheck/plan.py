"""What the self-check will run on the device this process is set to, and with which kernels: read from
`pixart.backend`'s selection (device, flash attention, the dtypes the device computes) and `pixart.cpu`'s, the same
functions the layers and the training set-up consult when they are built. Nothing here touches the device, so the
plan of an Ascend run can be computed (and tested) anywhere by faking `backend.device_target`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import mindspore as ms

from pixart import backend, cpu
from pixart.cpu import kernels
from pixart.selfcheck.checks import CHECKS

_MINT = "mint (linear, layer_norm, conv2d, gelu, embedding)"


@dataclass(frozen=True)
class Step:
    """One row of the plan: a check in one dtype and mode, its kernels, or why it is skipped."""
    check: str
    dtype: str
    mode: str
    kernels: dict = field(default_factory=dict)
    skip: str | None = None


@contextmanager
def _execution_mode(mode: str):
    """The execution mode set for the body (what `pixart.cpu.host_driven_recompute` reads), then restored."""
    old = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=old)


def _weights_only(kind: str, name: str) -> bool:
    """Whether the check's model takes `dtype` for its transformer / T5 weights (the rest, the VAE and training's
    mixed precision, compute wholly in it)."""
    return kind in ("forward", "sampler") and not name.startswith("vae")


def dtype_refusal(dtype: str, weights_only: bool = False) -> str | None:
    """Why the device cannot run `dtype` (backend's refusal, e.g. bf16 on MindSpore's CPU backend), or None. For a
    transformer's or T5's weights, the backend's own query for weights where it has one (`weight_dtype`)."""
    query = getattr(backend, "weight_dtype", backend.dtype) if weights_only else backend.dtype
    try:
        query(dtype)
    except ValueError as e:
        return str(e)
    return None


def _kernels(kind: str, name: str, dtype: str, mode: str) -> dict:
    device = backend.device_target()
    on_cpu = device == "CPU"
    fused = on_cpu and dtype == "fp32" and kernels.available()
    layers = _MINT if backend.on_ascend() else "MindSpore ops" + (" + pixart.cpu fused fp32 kernels" if fused else "")
    out = {"layers": layers, "execution": "graph (jit O1)" if mode == "graph" else "PyNative"}
    if name != "t5":  # T5's attention adds its relative-position bias: its own batched matmuls
        out["attention"] = ("FlashAttentionScore (fp32 softmax inside)" if backend.use_flash_attention()
                            else "BatchMatMul + fp32 softmax")
    compute = getattr(backend, "compute_dtype", None)
    if dtype == "fp32":
        precision = "fp32"
    elif _weights_only(kind, name) and compute is not None and compute(dtype) == ms.float32:
        precision = f"{dtype} weights (storage), fp32 compute"
    else:
        precision = f"{dtype} weights; softmax, VAE GroupNorm, T5 residual stream / norms / wo in fp32"
    if kind in ("train", "parallel"):
        precision = "fp32" if dtype == "fp32" else f"auto_mixed_precision {dtype}, fp32 weights, dynamic loss scale"
    out["precision"] = precision
    if name == "train-recompute":
        with _execution_mode(mode):
            host = cpu.host_driven_recompute() and dtype == "fp32"  # as pixart.training.setup decides
        out["recompute"] = ("block by block from the host (pixart.cpu.blockwise)" if host
                            else "Cell.recompute() on every block")
    if kind == "parallel":
        out["parallel"] = "msrun --worker_num=2, DATA_PARALLEL, gradients all-reduced (mean)"
    return out


def _skip(kind: str, name: str, dtype: str) -> str | None:
    refusal = dtype_refusal(dtype, _weights_only(kind, name))
    if refusal:
        return f"{dtype} not supported on this backend ({backend.device_target()}): {refusal}"
    if kind in ("train", "parallel") and dtype != "fp32" and backend.device_target() == "CPU":
        return f"{dtype} training is for Ascend (train.py trains in fp32 on CPU)"
    return None


def plan(dtypes, modes, checks=None, msrun: bool = False) -> list[Step]:
    """Every (check, dtype, mode) the self-check runs on the current device, in order, with its kernels or skip
    reason. `checks`: names to keep (default all); the data-parallel check only with `msrun`."""
    steps = []
    for mode in modes:
        for dtype in dtypes:
            for name, check in CHECKS.items():
                if checks is not None and name not in checks:
                    continue
                if check.kind == "parallel" and not msrun:
                    continue
                steps.append(Step(name, dtype, mode, _kernels(check.kind, name, dtype, mode),
                                  _skip(check.kind, name, dtype)))
    return steps
