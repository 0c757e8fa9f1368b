"""The one place that selects per device: device and execution mode, flash attention, and the dtypes a device can
compute.

MindSpore's CPU backend lacks many `mint` kernels (LayerNorm, Conv2d, GELU, Embedding, flash attention) and any
bf16 compute; Ascend has all of them and is fastest with them. On CPU a half precision ('bf16', 'fp16') of the
transformer or T5 is a storage format of their Linear weights and embedding tables (`cast_parameters`): those
products and lookups run through `pixart.cpu`'s kernels (bf16: vdpbf16ps, where the CPU has AVX512_BF16, `cpu_supports_bf16()`), everything else
(norms, softmax, the residual stream) in fp32, as a PyTorch bf16 model computes each of those ops internally. The layers of `pixart.nn` ask this module at
construction which kernels to use, so model code never branches on the device and a graph-mode compile sees a single
path; `pixart.cpu` adds MindSpore CPU's own kernels to a built model.

Call `setup()` (scripts do) before building models; tests may call it again to switch modes.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

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
    """The MindSpore dtype for 'fp32' / 'fp16' / 'bf16' for a model computed wholly in it (the VAE, training's
    mixed precision), refusing what the device cannot compute. The transformer and T5: `weight_dtype`."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "bf16" and device_target() == "CPU":
        raise ValueError("bf16 is not supported on MindSpore's CPU backend here (training, the VAE: no bf16 kernels); "
                         "use fp32 or fp16")
    return DTYPES[name]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bf16 (AVX512_BF16's vdpbf16ps, which every CPU with AMX-BF16 has too): where
    it does, the transformer and T5 may store their Linear weights (and tables) in bf16 on MindSpore's CPU backend."""
    return "avx512_bf16" in _cpu_flags()


def default_dtype() -> str:
    """The transformer's precision when none is asked for: fp16 on Ascend (the reference port's), on CPU bf16 where
    the CPU has it (faster than fp32 from half its memory; measurements: docs/benchmarks.md, 'bf16 on CPU'), else
    fp32."""
    if on_ascend():
        return "fp16"
    return "bf16" if device_target() == "CPU" and cpu_supports_bf16() else "fp32"


def default_text_encoder_dtype() -> str:
    """T5's precision when the configuration says 'auto': fp16 on Ascend (the reference port's), on CPU bf16 where
    the CPU has it, else fp16 storage (T5-XXL is ~19 GB in fp32, ~9.5 GB in fp16; the products run in fp32)."""
    if on_ascend():
        return "fp16"
    return "bf16" if device_target() == "CPU" and cpu_supports_bf16() else "fp16"


def weight_dtype(name: str):
    """The MindSpore dtype the transformer's and T5's Linear weights and tables are stored in for 'fp32' / 'fp16' / 'bf16'. On
    MindSpore's CPU backend half precisions are storage only (see the module docstring); bf16 needs a CPU that
    multiplies it (`cpu_supports_bf16`), else it is refused."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "bf16" and device_target() == "CPU" and not cpu_supports_bf16():
        raise ValueError("bf16 on CPU needs a CPU with AVX512_BF16 (or AMX-BF16), which this one lacks; "
                         "use fp32, or fp16 (weights stored in half precision, computed in fp32)")
    return DTYPES[name]


def compute_dtype(name: str):
    """The dtype the activations of a model with weights in `name` flow in: fp32 on MindSpore's CPU backend (half
    weights are storage there), else the weights' own."""
    return ms.float32 if device_target() == "CPU" else weight_dtype(name)


def linear_weights(net) -> set:
    """ids of the `weight` Parameters of `net`'s Linear layers (cells with `in_features`, `out_features` and a 2-D
    weight) and embedding tables (cells with `num_embeddings` and `embedding_dim`): what a half precision stores in
    half on CPU."""
    out = set()
    for _, cell in net.cells_and_names():
        w = getattr(cell, "weight", None)
        linear = hasattr(cell, "in_features") and hasattr(cell, "out_features")
        table = hasattr(cell, "num_embeddings") and hasattr(cell, "embedding_dim")
        if (linear or table) and isinstance(w, ms.Parameter) and len(w.shape) == 2:
            out.add(id(w))
    return out


def parameter_dtypes(net, name: str) -> dict:
    """{Parameter name: the MindSpore dtype it is stored in} for the transformer or T5 in precision `name`: all of
    them in `name`'s dtype, but on MindSpore's CPU backend only the Linear weights and embedding tables (the rest
    fp32)."""
    target = weight_dtype(name)
    cpu_half = device_target() == "CPU" and target != ms.float32
    linear = linear_weights(net) if cpu_half else set()
    return {p.name: target if not cpu_half or id(p) in linear else ms.float32 for p in net.get_parameters()}


def cast_parameters(net, name: str):
    """Store the parameters of the transformer `net` in precision `name` ('fp32' / 'fp16' / 'bf16') as
    `parameter_dtypes` says; returns `net`."""
    dtypes = parameter_dtypes(net, name)
    for p in net.get_parameters():
        if p.dtype != dtypes[p.name]:
            p.set_dtype(dtypes[p.name])  # set_data would cast the new data back to the old dtype
    return net
