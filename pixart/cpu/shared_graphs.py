"""One compiled graph for every PixArt block of the same structure (MindSpore's CPU graph mode).

MindSpore compiles a graph per Cell, and its CPU runtime keeps every intermediate of a graph alive until the graph
ends: a graph of all 28 blocks takes long to compile and holds every block's intermediates (measurements:
docs/benchmarks.md, 'Design measurements'). Here a copy of a block, or of a run of consecutive blocks, whose
Parameters alias the storage of any structurally equal blocks (`Parameter.set_data(param)` shares it: no copy)
compiles once and serves them all; pointing it at other blocks before a launch costs microseconds per Parameter.

- `GroupedDenoiser`: sampling's denoiser as embedders -> runs of `size` blocks -> final layer, one graph each
  (`blocks_per_graph()` picks the size); `GroupedCaptionEncoder`: the caption MLP, then the caption's keys/values,
  one graph for all blocks (or the caption tokens alone where the blocks project them in the step);
  `grouped_sampler_parts`: both, as `PixArt.sampler_parts` takes them (`pixart.cpu.accelerate` sets it).
- `trim_after_compile`: compilation's freed heap memory handed back to the OS.
- `pixart.cpu.blockwise`: training's backward pass one block at a time.
"""
from __future__ import annotations

import copy
import ctypes
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from pixart import backend
from pixart.models.pixart import caption_mask
from pixart.nn import Method


def blocks_per_graph(depth: int) -> int | None:
    """How many PixArt blocks sampling compiles into one graph, or None: the whole denoiser as one graph. On
    MindSpore's CPU backend in graph mode, 1 (`PIXART_BLOCKS_PER_GRAPH` overrides, 0 = all): its runtime keeps a
    graph's intermediates until the graph ends and compiles each block of a graph anew, so one block per graph holds
    the least memory and compiles fastest, at the same step time as longer runs (measurements: docs/benchmarks.md,
    'Graph grouping of blocks'). Elsewhere (PyNative, other devices) None."""
    if backend.device_target() != "CPU" or ms.get_context("mode") != ms.GRAPH_MODE:
        return None
    value = os.environ.get("PIXART_BLOCKS_PER_GRAPH", "1")
    if not value.isdigit():
        raise ValueError(f"PIXART_BLOCKS_PER_GRAPH must be a whole number of blocks (0: all), got {value!r}")
    size = int(value)
    return None if size == 0 or size >= depth else size


def grouped_sampler_parts(model) -> dict | None:
    """`PixArt.sampler_parts`' compiled parts as graphs shared by runs of blocks ({"encode_caption": ...,
    "denoise": ...}), or None where `blocks_per_graph` says one graph (the model then compiles its own)."""
    size = blocks_per_graph(len(model.blocks))
    if size is None:
        return None
    return {"encode_caption": GroupedCaptionEncoder(model), "denoise": GroupedDenoiser(model, size)}


def trim_after_compile(before: int, graphs) -> None:
    """After a call that compiled a graph (`graphs.compile_cache` grew past `before`), hand the pages of the heap
    memory that compilation freed back to the OS (glibc's `malloc_trim`): glibc keeps freed memory inside its heap
    for reuse, and the next graph's compilation and the steps allocate elsewhere as often as not, so that memory
    would stay in the process's RSS through all of sampling. Only at compilation: a step allocates as it freed."""
    if len(graphs.compile_cache) > before:
        _malloc_trim()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        pass


def aliasing_copy(cell: nn.Cell, train: bool) -> nn.Cell:
    """A copy of `cell` (in training mode or not) that shares its primitives (Custom kernels can not be copied) and
    whose Parameters alias `cell`'s storage until `point` moves them: no weight is copied, even for a moment."""
    memo = {}

    def share(value):
        if isinstance(value, ops.Primitive):
            memo[id(value)] = value
        elif isinstance(value, (list, tuple)):
            for v in value:
                share(v)
        elif isinstance(value, dict):
            for v in value.values():
                share(v)
    for _, sub in cell.cells_and_names():
        for value in vars(sub).values():
            share(value)
    for p in cell.get_parameters():
        alias = Parameter(Tensor(np.zeros((1,)), p.dtype), name=p.name, requires_grad=p.requires_grad)  # set_data casts
        alias.set_data(p)
        memo[id(p)] = alias
    twin = copy.deepcopy(cell, memo)
    twin.set_train(train)
    return twin


def point(aliases, params) -> None:
    """Make each of `aliases` (a copy's Parameters) compute with the storage of the matching one of `params`."""
    for alias, param in zip(aliases, params):
        alias.set_data(param)


def structure(cell: nn.Cell, prefix: str, trainable=frozenset()) -> tuple:
    """What a compiled graph of `cell` depends on: its Parameters' names (without `prefix`), shapes, dtypes and
    whether they are trained (ids in `trainable`); for a PixArt block also the self-attention's KV compression and
    qk-norm (the KV compression "ave" / "uniform" has no Parameters)."""
    params = tuple((p.name[len(prefix):] if p.name.startswith(prefix) else p.name, tuple(p.shape), str(p.dtype),
                    id(p) in trainable) for p in cell.get_parameters())
    attn = getattr(cell, "attn", None)
    return params, getattr(attn, "sampling", None), getattr(attn, "sr_ratio", None), getattr(attn, "qk_norm", None)


class SharedGraphs:
    """Groups of Cells run through one compiled graph per structure: `wrap(copies)` is built once per distinct
    `keys` entry, on aliasing copies of the first such group; `pointed(i)` is group i's graph, pointed at group i's
    Parameters (every time: the model's weights may have been replaced since)."""

    def __init__(self, groups: list, keys: list, wrap, train: bool):
        shared, self.plan = {}, []
        for cells, key in zip(groups, keys):
            if key not in shared:
                graph = wrap([aliasing_copy(cell, train) for cell in cells])
                shared[key] = graph, list(graph.get_parameters())
            self.plan.append((*shared[key], [p for cell in cells for p in cell.get_parameters()]))
        self.graphs = [graph for graph, _ in shared.values()]

    def pointed(self, i: int, train: bool) -> nn.Cell:
        graph, aliases, params = self.plan[i]
        if graph.training != train:
            graph.set_train(train)
        point(aliases, params)
        return graph


class _Run(nn.Cell):
    """Consecutive PixArt blocks as one graph: (tokens, their caption keys/values, t0, mask, hw) -> tokens."""

    def __init__(self, blocks):
        super().__init__(auto_prefix=False)
        self.blocks = nn.CellList(blocks)

    def construct(self, x, caption_kv, t0, mask, hw):
        for block, kv in zip(self.blocks, caption_kv):
            x = block(x, kv, t0, mask, hw)  # (N, T, D)
        return x


class _CaptionKV(nn.Cell):
    """A block's cross-attention keys/values projection of the caption as a graph."""

    def __init__(self, layers):
        super().__init__(auto_prefix=False)
        self.cross_attn = layers[0]

    def construct(self, caption):
        return self.cross_attn.caption_kv(caption)


class _Graphs:
    graphs: list

    @property
    def compile_cache(self) -> list:
        """Every graph compiled so far (one entry each), as a Cell's `compile_cache` counts them."""
        return [key for graph in self.graphs for key in graph.compile_cache]

    def launch(self, graph, *args):
        """graph(*args), returning to the OS what a compilation on that call freed (`trim_after_compile`)."""
        before = len(self.compile_cache)
        out = graph(*args)
        trim_after_compile(before, self)
        return out


class GroupedCaptionEncoder(_Graphs):
    """`PixArt.encode_caption` as the caption MLP's graph and one graph for every block's keys/values projection
    (28 launches of one compiled (N, L, D) x (D, 2D) product instead of a graph of 28); where every block projects
    them in the step (`CPUCrossAttention.defers_kv`), the caption tokens once, for all blocks."""

    def __init__(self, model):
        self.model = model
        self.embed = Method(model, "embed_caption")
        layers = [block.cross_attn for block in model.blocks]
        keys = [structure(layer, f"blocks.{i}.cross_attn.") for i, layer in enumerate(layers)]
        self.kv = SharedGraphs([[layer] for layer in layers], keys, _CaptionKV, model.training)
        self.graphs = [self.embed, *self.kv.graphs]

    def __call__(self, y, force_drop_ids=None):
        caption = self.launch(self.embed, y, force_drop_ids)  # (N, L, D)
        layers = [block.cross_attn for block in self.model.blocks]
        if all(getattr(layer, "defers_kv", lambda: False)() for layer in layers):  # the blocks project it each step
            return (caption,) * len(layers)
        return tuple(self.kv.pointed(i, self.model.training)(caption) for i in range(len(layers)))


class GroupedDenoiser(_Graphs):
    """`PixArt.denoise` as a few compiled graphs: the embedders, runs of `size` consecutive blocks, the final layer.
    Runs of equal structure (all of them but Σ-KV's, which has two kinds) share one graph, so compilation does not
    grow with depth, and each launch frees its intermediates for the next. Same results as the one-graph `denoise`
    (the same kernels in the same order)."""

    def __init__(self, model, size: int):
        self.model = model
        self.embed, self.final = Method(model, "embed"), Method(model, "final")
        depth = len(model.blocks)
        self.runs = [range(start, min(start + size, depth)) for start in range(0, depth, size)]
        keys = [tuple(structure(model.blocks[i], f"blocks.{i}.") for i in run) for run in self.runs]
        self.blocks = SharedGraphs([[model.blocks[i] for i in run] for run in self.runs], keys, _Run, model.training)
        self.graphs = [self.embed, self.final, *self.blocks.graphs]

    def __call__(self, x, timestep, caption_kv, mask=None, data_info=None):
        hw = self.model.token_grid(x)
        mask = caption_mask(mask, x.shape[0], caption_kv[0].shape[1])
        x, t, t0 = self.launch(self.embed, x, timestep, data_info)
        for k, run in enumerate(self.runs):
            x = self.launch(self.blocks.pointed(k, self.model.training), x,
                            ms.mutable(tuple(caption_kv[i] for i in run)), t0, mask, hw)
        return self.launch(self.final, x, t, hw)
