"""One training step as a Cell, the same graph in PyNative and graph mode:

    loss * scale -> gradients -> [accumulate] -> all-reduce mean over ranks -> unscale -> finite? -> clip
    -> optimizer -> EMA -> loss-scale update

A step whose gradients are not finite (fp16 overflow) changes nothing but the loss scale: no optimizer or EMA
update, no optimizer step count. With gradient accumulation the host calls `construct(..., apply=False)` for the
first A-1 micro-batches (gradients are summed into buffers) and `apply=True` for the last; the applied gradient
is the mean over the A micro-batches, so A micro-batches of b equal one batch of A*b.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_square_sum = ops.MultitypeFuncGraph("square_sum")
_square_sum_kernel = ops.MultitypeFuncGraph("square_sum_kernel")
_scale = ops.MultitypeFuncGraph("scale")
_unscale = ops.MultitypeFuncGraph("unscale")
add_into = ops.MultitypeFuncGraph("add_into")  # gradients summed into buffers (also `pixart.cpu.blockwise`)
_sum_and_clear = ops.MultitypeFuncGraph("sum_and_clear")


@_square_sum.register("Tensor")
def _square_sum_fn(g):
    g = g.astype(ms.float32)
    return (g * g).sum()


@_square_sum_kernel.register("Function", "Tensor", "Tensor")
def _square_sum_kernel_fn(kernel, divisor, g):
    return kernel(g.astype(ms.float32), divisor.astype(ms.float32).reshape(1)).reshape(())  # the kernel reads float32


@_scale.register("Tensor", "Tensor")
def _scale_fn(factor, g):
    return g * factor.astype(g.dtype)


@_unscale.register("Tensor", "Tensor")
def _unscale_fn(scale, g):
    return g / scale.astype(g.dtype)  # a division: 1 / scale is subnormal (flushed to 0) for scales near fp32's max


@add_into.register("Tensor", "Tensor")
def _add_into_fn(buffer, g):
    ops.assign_add(buffer, g.astype(buffer.dtype))
    return True


@_sum_and_clear.register("Tensor", "Tensor")
def _sum_and_clear_fn(buffer, g):
    total = buffer + g.astype(buffer.dtype)
    ops.assign(buffer, ops.zeros_like(buffer))
    return total


class _ScaledLoss(nn.Cell):
    """The loss times the loss scale (what is differentiated); the per-sample terms ride along unscaled."""

    def __init__(self, loss_fn: nn.Cell):
        super().__init__(auto_prefix=False)
        self.loss_fn = loss_fn

    def construct(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop, scale):
        loss, terms = self.loss_fn(x0, t, noise, y, mask, img_hw, aspect_ratio, drop)
        return loss * scale, terms


class TrainStep(nn.Cell):
    """Owns the optimizer, EMA, gradient buffers and loss scale.

    `construct(*batch, lr, apply)`, lr a float32 scalar Tensor, returns (loss, [loss, mse, vb] batch means averaged
    over ranks, gradient norm before clipping, finite, loss scale used)."""

    def __init__(self, loss_fn: nn.Cell, optimizer, ema=None, clip_grad: float = 0.0, accumulate: int = 1,
                 world_size: int = 1, loss_scale: float = 1.0, dynamic_loss_scale: bool = False,
                 scale_factor: float = 2.0, scale_window: int = 1000):
        super().__init__(auto_prefix=False)
        if accumulate < 1:
            raise ValueError(f"gradient accumulation must be >= 1, got {accumulate}")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.ema = ema
        self.use_ema = ema is not None
        self.weights = optimizer.parameters
        self.grad_fn = ms.value_and_grad(_ScaledLoss(loss_fn), None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        self.clip_grad = float(clip_grad or 0.0)
        self.accumulate = int(accumulate)
        if self.accumulate > 1:
            self.grad_buffers = ParameterTuple([Parameter(Tensor(np.zeros(tuple(p.shape), np.float32)),
                                                          name=f"grad_accum.{p.name}", requires_grad=False)
                                                for p in self.weights])
        self.world_size = int(world_size)
        self.distributed = self.world_size > 1
        if self.distributed:
            self.grad_reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=self.world_size)
            self.all_reduce = ops.AllReduce()
        self.dynamic = bool(dynamic_loss_scale)
        self.loss_scale = Parameter(Tensor(float(loss_scale), ms.float32), name="loss_scale.value",
                                    requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.good_steps", requires_grad=False)
        self.scale_factor, self.scale_window = float(scale_factor), int(scale_window)
        # the norm and the update as in-place kernels (`square_sum`, the optimizer's and EMA's `update_in_place`):
        # `pixart.cpu.accelerate_step` turns them on where MindSpore CPU has them; else MindSpore ops
        self.in_place = False
        self.square_sum = None

    def state_parameters(self) -> list:
        """The step's own state: loss scale and its counter (gradient buffers are empty between steps)."""
        return [self.loss_scale, self.good_steps]

    def _mean_over_ranks(self, x):
        if self.distributed:
            return self.all_reduce(x) / self.world_size
        return x

    def construct(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop, lr, apply=True):
        scale = self.loss_scale * 1.0
        (scaled, terms), grads = self.grad_fn(x0, t, noise, y, mask, img_hw, aspect_ratio, drop, scale)
        return self.update(scaled, terms, grads, scale, lr, apply)

    def update(self, scaled, terms, grads, scale, lr, apply=True, summed=False):
        """Everything after the gradients (`grads` of `loss * scale` w.r.t. `self.weights`, in their order; with
        `summed`, already the sum over the step's micro-batches, as block-by-block backpropagation leaves them)."""
        loss = scaled / scale
        terms = self._mean_over_ranks(terms.mean(1))  # (3,): loss, mse, vb
        divisor = scale  # the gradients are those of loss * scale, summed over the micro-batches when accumulating
        if self.accumulate > 1:
            if not apply:
                if not summed:
                    loss = ops.depend(loss, self.hyper_map(add_into, self.grad_buffers, grads))
                return loss, terms, ops.zeros((), ms.float32), ops.ones((), ms.bool_), scale
            if not summed:
                grads = self.hyper_map(_sum_and_clear, self.grad_buffers, grads)
            divisor = scale * self.accumulate
        if self.distributed:
            grads = self.grad_reducer(grads)
        if self.in_place:  # no gradient-sized temporaries: the kernels read the raw gradients
            norm = ops.sqrt(ops.addn(self.hyper_map(ops.partial(_square_sum_kernel, self.square_sum, divisor),
                                                    grads)))
        else:
            grads = self.hyper_map(ops.partial(_unscale, divisor), grads)
            norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        finite = ops.isfinite(norm)
        coef = ops.ones((), ms.float32)
        if self.clip_grad > 0:
            coef = ops.minimum(self.clip_grad / (norm + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_
        if finite:
            if self.in_place:
                done = self.optimizer.update_in_place(grads, lr, divisor, coef, norm)
                if self.use_ema:
                    done = self.ema(done)
                loss = ops.depend(loss, done)
            else:
                if self.clip_grad > 0:
                    grads = self.hyper_map(ops.partial(_scale, coef), grads)
                loss = ops.depend(loss, self.optimizer(grads, lr))
                if self.use_ema:
                    loss = ops.depend(loss, self.ema())
        if self.dynamic:
            loss = ops.depend(loss, self._update_scale(finite))
        return loss, terms, norm, finite, scale

    def _update_scale(self, finite):
        """Dynamic loss scaling: x factor after `window` finite steps in a row, / factor (not below 1) on overflow."""
        good = ops.select(finite, self.good_steps + 1, ops.zeros((), ms.int32))
        grow = good >= self.scale_window
        scale = self.loss_scale * 1.0
        new_scale = ops.select(finite, ops.select(grow, scale * self.scale_factor, scale),
                               ops.maximum(scale / self.scale_factor, 1.0))
        ops.assign(self.good_steps, ops.select(grow, ops.zeros((), ms.int32), good))
        return ops.assign(self.loss_scale, new_scale)
