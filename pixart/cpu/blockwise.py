"""Backpropagation one PixArt block at a time: activation checkpointing at block boundaries, driven from the host.

MindSpore's CPU backend keeps every intermediate of a compiled graph alive until the graph ends, and `recompute`
inside one graph does not lower that. One graph of the whole training step holds every block's activations and
gradients (measurements: docs/benchmarks.md, 'Design measurements'). Here a training step is a loop over small
compiled graphs instead (train.py --recompute on MindSpore CPU graph mode):

    head     noising, patch / timestep / caption embedders           -> x_t, tokens, t, t0, caption tokens
    blocks   block 1 .. D forward, each block's input kept            -> tokens
    tail     final layer and loss, and their vector-Jacobian product  -> loss, d tokens, d t
    blocks   block D .. 1 vjp, recomputing the block from its input   -> d tokens; d t0, d caption summed
    head     vjp                                                      -> the embedders' gradients

All blocks of one structure (Σ-KV models have two) share ONE forward graph and ONE vjp graph, compiled on a copy of
the block whose Parameters are pointed at block i's before each launch (`pixart.cpu.shared_graphs`: shared storage, no
copy), so compilation does not grow with depth. Each vjp writes (or, for later micro-batches, adds) its weights'
gradients into persistent buffers that the update graph reads in place, so no gradient-sized tensor is allocated
per step. Memory: parameters, gradient buffers, optimizer state, the D block inputs (N x T x D each) and one
block's working set (below PyTorch's peak at full depth). The forward pass runs an eval-mode
copy (no autodiff bookkeeping), the vjp recomputes with the same fused kernels and their gradients: gradients equal
the whole-graph ones up to float rounding (tests/test_blockwise.py). LoRA dropout would draw different masks in
the two passes: refused (train.py then recomputes inside one graph).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from pixart.models.pixart import caption_mask
from pixart.cpu.shared_graphs import aliasing_copy, point, structure
from pixart.training.step import add_into


class _Head(nn.Cell):
    def __init__(self, loss_fn):
        super().__init__(auto_prefix=False)  # the model's parameter names, as in the whole-graph step
        self.loss_fn = loss_fn

    def construct(self, x0, t, noise, y, drop, img_hw, aspect_ratio):
        model = self.loss_fn.model
        x_t = self.loss_fn.noised(x0, t, noise)
        x, temb, t0 = model.embed(x_t, t.astype(ms.float32), {"img_hw": img_hw, "aspect_ratio": aspect_ratio})
        return x_t, x, temb, t0, model.embed_caption(y, drop)


class _Block(nn.Cell):
    def __init__(self, block):
        super().__init__(auto_prefix=False)
        self.block = block

    def construct(self, x, y, t0, mask, hw):
        mask = caption_mask(mask, x.shape[0], y.shape[1])
        return self.block(x, self.block.cross_attn.caption_kv(y), t0, mask, hw)


class _Tail(nn.Cell):
    def __init__(self, loss_fn):
        super().__init__(auto_prefix=False)
        self.loss_fn = loss_fn

    def construct(self, x, temb, x0, x_t, t, noise, scale, hw):
        loss, terms = self.loss_fn.terms(self.loss_fn.model.final(x, temb, hw), x0, x_t, t, noise)
        return loss * scale, terms


_copy_into = ops.MultitypeFuncGraph("copy_into")


@_copy_into.register("Tensor", "Tensor")
def _copy_into_fn(buffer, g):
    return ops.assign(buffer, g)


class _Vjp(nn.Cell):
    """(add, stage inputs..., sens) -> gradients w.r.t. every input; the gradients w.r.t. `weights` are written into
    `buffers` (added to them when `add`: the later micro-batches of an accumulated step). Recomputes the stage."""

    def __init__(self, stage: nn.Cell, weights, buffers):
        super().__init__(auto_prefix=False)
        self.stage = stage
        self.weights = ParameterTuple(weights)
        self.buffers = ParameterTuple(buffers)
        self.has_weights = bool(weights)
        self.grad = ops.GradOperation(get_all=True, get_by_list=self.has_weights, sens_param=True)
        self.hyper_map = ops.HyperMap()

    def construct(self, add, *args):
        if not self.has_weights:
            return self.grad(self.stage)(*args)
        grads, weight_grads = self.grad(self.stage, self.weights)(*args)
        if add:
            return ops.depend(grads, self.hyper_map(add_into, self.buffers, weight_grads))
        return ops.depend(grads, self.hyper_map(_copy_into, self.buffers, weight_grads))


class _TailVjp(_Vjp):
    """The loss (times the loss scale), its per-sample terms, and its gradients (sens 1 on the loss, 0 on terms)."""

    def construct(self, add, *args):
        scaled, terms = self.stage(*args)
        return scaled, terms, super().construct(add, *args, (ops.ones_like(scaled), ops.zeros_like(terms)))


class _Update(nn.Cell):
    """`TrainStep.update` on the gradient buffers (Parameters of this graph: no gradient-sized inputs)."""

    def __init__(self, step, buffers):
        super().__init__(auto_prefix=False)
        self.step = step
        self.buffers = ParameterTuple(buffers)

    def construct(self, scaled, terms, scale, lr, apply):
        return self.step.update(scaled, terms, self.buffers, scale, lr, apply, True)


class _Template:
    """One structure of block: a forward graph (eval mode) and a vjp graph, pointed at any such block."""

    def __init__(self, block: nn.Cell, trainable: set):
        self.fwd_block = aliasing_copy(block, train=False)
        self.vjp_block = aliasing_copy(block, train=True)
        self.fwd_params = list(self.fwd_block.get_parameters())
        self.vjp_params = list(self.vjp_block.get_parameters())
        self.grad_slots = [i for i, p in enumerate(block.get_parameters()) if id(p) in trainable]
        weights = [self.vjp_params[i] for i in self.grad_slots]
        self.buffers = _buffers(weights, "template_grad")
        self.forward = _Block(self.fwd_block)
        self.vjp = _Vjp(_Block(self.vjp_block), weights, self.buffers)

    def point(self, params: list, buffers: list) -> None:
        """Make both graphs compute with a block's Parameters and write its gradient buffers (shared storage, no copy;
        every launch: the model's weights may have been replaced since)."""
        point(self.fwd_params, params)
        point(self.vjp_params, params)
        point(self.buffers, buffers)


def _buffers(params, prefix: str) -> list:
    return [Parameter(Tensor(np.zeros(tuple(p.shape), np.float32)), name=f"{prefix}.{p.name}", requires_grad=False)
            for p in params]


def refusal(model) -> str | None:
    """Why `model` can not be trained block by block, or None."""
    if any(isinstance(cell, nn.Dropout) for _, cell in model.cells_and_names()):
        return "dropout (LoRA dropout) would draw a different mask when a block is recomputed"
    return None


class BlockwiseGrad:
    """The gradients of a DiffusionLoss's `loss * scale` w.r.t. `weights`, computed block by block and written into
    `buffers` (float32 Parameters in `weights`' order; added to them with `add=True`):
    `(x0, t, noise, y, mask, img_hw, aspect_ratio, drop, scale, add)` -> (loss * scale, (3, N) terms)."""

    def __init__(self, loss_fn, weights, buffers=None):
        model = loss_fn.model
        self.model = model
        self.weights = list(weights)
        self.buffers = list(buffers) if buffers is not None else _buffers(self.weights, "grad")
        reason = refusal(model)
        if reason:
            raise ValueError(f"block-by-block backpropagation: {reason}")
        buffer_of = {id(p): b for p, b in zip(self.weights, self.buffers)}
        self.block_params = [list(b.get_parameters()) for b in model.blocks]
        tail_params = list(model.final_layer.get_parameters())
        in_blocks_or_tail = {id(p) for ps in self.block_params + [tail_params] for p in ps}
        head_params = [p for p in model.get_parameters() if id(p) not in in_blocks_or_tail]
        covered = {id(p) for p in model.get_parameters()}
        stray = [p.name for p in self.weights if id(p) not in covered]
        if stray:
            raise ValueError(f"parameters to train that are not the model's: {', '.join(stray[:5])}")

        def trained(params):
            return [p for p in params if id(p) in buffer_of]
        self.head = _Head(loss_fn)
        head_weights, tail_weights = trained(head_params), trained(tail_params)
        self.head_vjp = _Vjp(_Head(loss_fn), head_weights, [buffer_of[id(p)] for p in head_weights])
        self.tail_vjp = _TailVjp(_Tail(loss_fn), tail_weights, [buffer_of[id(p)] for p in tail_weights])
        self.templates, by_structure = [], {}
        for i, block in enumerate(model.blocks):
            key = structure(block, f"blocks.{i}.", buffer_of)
            if key not in by_structure:
                by_structure[key] = _Template(block, buffer_of)
            self.templates.append(by_structure[key])
        self.block_buffers = [[buffer_of[id(ps[k])] for k in t.grad_slots]
                              for ps, t in zip(self.block_params, self.templates)]

    def compiled_graphs(self) -> int:
        """Graphs compiled so far (per input shape: head, head vjp, tail vjp, and a forward + vjp per structure)."""
        cells = [self.head, self.head_vjp, self.tail_vjp]
        cells += [c for t in {id(t): t for t in self.templates}.values() for c in (t.forward, t.vjp)]
        return sum(len(c.compile_cache) for c in cells)

    def __call__(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop, scale, add=False):
        x0, t = x0.astype(ms.float32), t.astype(ms.int32)
        hw = self.model.token_grid(x0)
        head_inputs = (x0, t, noise, y, drop, img_hw, aspect_ratio)
        x_t, x, temb, t0, caption = self.head(*head_inputs)
        inputs = []
        for i, template in enumerate(self.templates):
            template.point(self.block_params[i], self.block_buffers[i])
            inputs.append(x)
            x = template.forward(x, caption, t0, mask, hw)
        scaled, terms, (dx, dtemb, *_) = self.tail_vjp(add, x, temb, x0, x_t, t, noise, scale, hw)
        dcaption, dt0 = None, None
        for i in reversed(range(len(self.templates))):
            template = self.templates[i]
            template.point(self.block_params[i], self.block_buffers[i])
            dx, dc, dt, *_ = template.vjp(add, inputs[i], caption, t0, mask, hw, dx)
            inputs[i] = None  # its activations are no longer needed
            dcaption = dc if dcaption is None else dcaption + dc
            dt0 = dt if dt0 is None else dt0 + dt
        self.head_vjp(add, *head_inputs, ms.mutable((ops.zeros_like(x_t), dx, dtemb, dt0, dcaption)))  # variable
        return scaled, terms


class BlockwiseTrainStep:
    """A `TrainStep` whose gradients come from `BlockwiseGrad` (into the step's accumulation buffers, or buffers of
    its own); everything after them (all-reduce, clipping, optimizer, EMA, loss scale) is the step's own `update`,
    compiled as one graph that reads the buffers in place. Same call and results as the step."""

    def __init__(self, step):
        self.step = step
        buffers = list(step.grad_buffers) if step.accumulate > 1 else None
        self.grad = BlockwiseGrad(step.loss_fn, list(step.weights), buffers)
        self.update = _Update(step, self.grad.buffers)
        self.micro = 0  # micro-batches summed into the buffers since the last update

    def __call__(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop, lr, apply=True):
        scale = Tensor(self.step.loss_scale.asnumpy())
        scaled, terms = self.grad(x0, t, noise, y, mask, img_hw, aspect_ratio, drop, scale, self.micro > 0)
        self.micro = 0 if apply else self.micro + 1
        return self.update(scaled, terms, scale, lr, apply)

    def set_train(self, mode: bool = True):
        self.step.set_train(mode)
        return self

    def state_parameters(self) -> list:
        return self.step.state_parameters()

    def compiled_graphs(self) -> int:
        return self.grad.compiled_graphs() + len(self.update.compile_cache)
