"""Everything that exists only for speed and memory on MindSpore's CPU backend, applied to built models:

    accelerate(model)       the layers of `pixart.nn` -> their fused-kernel subclasses (`pixart.cpu.layers`), and for
                            PixArt sampling in graph mode graphs shared by runs of blocks (`pixart.cpu.shared_graphs`)
    accelerate_step(step)   a `TrainStep`'s gradient norm, AdamW and EMA as in-place kernels
    blockwise               training's backward pass one block at a time (`host_driven_recompute()`)

The kernels (`pixart.cpu.kernels`) are C++ built on first use; where they cannot be built, or with
PIXART_FUSED_KERNELS=0, the layers keep the portable ops, which compute the same functions. Off MindSpore's CPU
backend every function here leaves its argument as it is. `pixart.models` and `pixart.nn` never import this package.
"""
from __future__ import annotations

import mindspore as ms

from pixart import backend
from pixart.cpu import kernels
from pixart.cpu.layers import CPU_CLASSES
from pixart.cpu.shared_graphs import grouped_sampler_parts
from pixart.models.pixart import PixArt

_MIXED: dict = {}  # subclass of a portable layer (LoRALinear) -> that subclass on top of the CPU layer


def _cpu_class(cls):
    """The class a layer of class `cls` becomes, or None (no CPU kernels for it, or it has them already)."""
    if any(issubclass(cls, fast) for fast in CPU_CLASSES.values()):
        return None
    for portable, fast in CPU_CLASSES.items():
        if cls is portable:
            return fast
        if issubclass(cls, portable):  # e.g. LoRALinear: its own methods first, then the CPU layer's, then Linear's
            if cls not in _MIXED:
                _MIXED[cls] = type(f"CPU{cls.__name__}", (cls, fast), {"__module__": __name__})
            return _MIXED[cls]
    return None


def accelerate(model):
    """`model` computing with MindSpore CPU's fused kernels, in place (Parameters and their names untouched);
    returns it. Call once the model's layers are final (after LoRA is injected or loaded); calling again converts
    only layers added since. No-op off MindSpore's CPU backend."""
    if backend.device_target() != "CPU":
        return model
    if kernels.available():
        for _, cell in model.cells_and_names():
            cls = _cpu_class(type(cell))
            if cls is not None:
                cell.__class__ = cls
                cell.attach()
    if isinstance(model, PixArt):
        model.sampler_graphs = grouped_sampler_parts
    return model


def in_place_kernel(name: str, params):
    """The fused CPU training kernel `name` (SquareSum, AdamWUpdate, EmaUpdate: one dummy (1,) output, the real results
    written in place) where it applies: MindSpore CPU with the kernels built and every one of `params` float32; else
    None (the caller keeps MindSpore ops)."""
    if backend.device_target() == "CPU" and kernels.available() and all(p.dtype == ms.float32 for p in params):
        return kernels.op(name, out_shape=lambda *_: (1,))
    return None


def accelerate_step(step):
    """A `pixart.training.step.TrainStep` whose gradient norm, AdamW update and EMA run as in-place kernels (no
    gradient-sized temporaries: MindSpore CPU keeps every temporary of a graph alive) where the optimizer and the
    EMA have them (AdamW, fp32 parameters); else as it is (CAME, fp16 parameters, off CPU). Call before its first
    step; returns it."""
    optimizer, ema = step.optimizer, step.ema
    if hasattr(optimizer, "kernel"):
        optimizer.kernel = in_place_kernel("AdamWUpdate", optimizer.parameters)
    if ema is not None:
        ema.kernel = in_place_kernel("EmaUpdate", ema.params)
    step.in_place = getattr(optimizer, "kernel", None) is not None and (ema is None or ema.kernel is not None)
    step.square_sum = in_place_kernel("SquareSum", step.weights) if step.in_place else None
    return step


def host_driven_recompute() -> bool:
    """Whether training's per-block recompute runs block by block from the host (`pixart.cpu.blockwise`) rather than
    as `Cell.recompute()` inside one graph: on MindSpore's CPU backend in graph mode, whose runtime keeps every
    activation of a graph alive (recompute inside the graph lowers nothing there)."""
    return backend.device_target() == "CPU" and ms.get_context("mode") == ms.GRAPH_MODE
