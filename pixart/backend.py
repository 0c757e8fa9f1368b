"""The one place that selects per device: device and execution mode, flash attention, and the dtypes a device can
compute.

MindSpore's CPU backend lacks many `mint` kernels (LayerNorm, Conv2d, GELU, Embedding, flash attention) and any
bf16 compute; Ascend has all of them and is fastest with them. The layers of `pixart.nn` ask this module at
construction which kernels to use, so model code never branches on the device and a graph-mode compile sees a single
path; `pixart.cpu` adds MindSpore CPU's own kernels to a built model.

Call `setup()` (scripts do) before building models; tests may call it again to switch modes.
"""
from __future__ import annotations

from contextlib import contextmanager

import mindspore as ms

_STATE = {"flash_attention": None}  # None: on where the device has it (Ascend)

DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def device_target() -> str:
    return ms.get_context("device_target")


def on_ascend() -> bool:
    return device_target() == "Ascend"


def setup(device_target: str = "CPU", mode: str = "pynative", jit_level: str = "O1",
          flash_attention: bool | None = None, threads: int | None = None) -> None:
    """Select device and execution mode once per process. `mode` is "pynative" or "graph"."""
    if mode not in ("pynative", "graph"):
        raise ValueError(f"mode must be 'pynative' or 'graph', got {mode!r}")
    if device_target not in ("CPU", "GPU", "Ascend"):
        raise ValueError(f"device_target must be CPU, GPU or Ascend, got {device_target!r}")
    ms.set_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if device_target == "CPU":
        # PyNative's asynchronous launch pipeline keeps a thread busy beside the kernels' own threads, which on few
        # cores roughly halves the speed of a forward pass (graph mode: no difference; measurements:
        # docs/benchmarks.md, 'Design measurements')
        ms.runtime.launch_blocking()
    if mode == "graph":
        ms.set_context(jit_config={"jit_level": jit_level})
    if threads:
        ms.set_context(runtime_num_threads=threads)
    configure(flash_attention=flash_attention)


@contextmanager
def eager():
    """Run the body in PyNative mode, then restore the mode. For a model run once per input and freed afterwards
    (T5 in `sample.py`): a Cell run in graph mode keeps its Parameters alive after the Cell is deleted (MindSpore
    2.7.1: its compiled graph holds them, even after `del`, `gc.collect()` and `ms.ms_memory_recycle()`), so
    releasing it would free nothing; eager, T5 runs about as fast per prompt and compiles nothing (measurements:
    docs/benchmarks.md, 'Design measurements')."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


def configure(flash_attention: bool | None = None) -> None:
    """Ask for flash attention (only Ascend has the kernel; asking for it elsewhere is an error)."""
    if flash_attention and not on_ascend():
        raise ValueError(f"flash attention needs an Ascend device; this process runs on {device_target()}")
    _STATE["flash_attention"] = flash_attention


def use_flash_attention() -> bool:
    flag = _STATE["flash_attention"]
    return on_ascend() if flag is None else bool(flag)


def dtype(name: str):
    """The MindSpore dtype for 'fp32' / 'fp16' / 'bf16', refusing what the device cannot compute."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "bf16" and device_target() == "CPU":
        raise ValueError("bf16 is not supported on MindSpore's CPU backend (no bf16 matmul); use fp32 or fp16")
    return DTYPES[name]


def cast_parameters(net, name: str):
    """Store every parameter of `net` in dtype `name` ('fp32' / 'fp16' / 'bf16'); returns `net`."""
    target = dtype(name)
    for p in net.get_parameters():
        if p.dtype != target:
            p.set_dtype(target)  # set_data would cast the new data back to the old dtype
    return net
