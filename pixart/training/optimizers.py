"""Optimizers as MindSpore Cells, the learning-rate schedule, and the `auto_lr` rule.

PixArt trains with PyTorch's AdamW (α, eps 1e-10, weight decay 0.03) and CAME (Σ; Luo et al. 2023, the
`came_pytorch` package). MindSpore's `nn.AdamWeightDecay` has no bias correction and couples the decay into the
update, and `mint.optim.AdamW` has no CPU kernel, so both are written here with PyTorch's update rules:

    AdamW: p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
           p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)
    CAME:  Adafactor's factored second moment (row / column means of g^2 + eps1 for matrices), the update clipped
           to RMS <= 1, its momentum m, and a factored "instability" (update - m)^2 + eps2 that scales m.

The learning rate is an input of every call (a float32 scalar Tensor, so graph mode never recompiles for it; a
Parameter changed with `set_data` after compilation would not reach the compiled graph) and is recorded in the
`learning_rate` Parameter. All state is float32 and named `<optimizer>.<slot>.<parameter>` for the checkpoint.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_adamw = ops.MultitypeFuncGraph("adamw")
_came_matrix = ops.MultitypeFuncGraph("came_matrix")
_came_vector = ops.MultitypeFuncGraph("came_vector")
_adamw_in_place = ops.MultitypeFuncGraph("adamw_in_place")


@_adamw.register("Tensor", "Tensor", "Number", "Number", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_update(lr, step, beta1, beta2, eps, weight_decay, param, m, v, grad):
    bc1 = 1.0 - ops.pow(beta1, step)
    bc2_sqrt = ops.sqrt(1.0 - ops.pow(beta2, step))
    new_m = m + (grad - m) * (1.0 - beta1)  # PyTorch's lerp
    new_v = v * beta2 + grad * grad * (1.0 - beta2)
    decayed = param * (1.0 - lr * weight_decay)
    new_p = decayed - (lr / bc1) * new_m / (ops.sqrt(new_v) / bc2_sqrt + eps)
    ops.assign(m, new_m)
    ops.assign(v, new_v)
    ops.assign(param, new_p)
    return True


@_adamw_in_place.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_in_place_update(kernel, hyper, param, m, v, grad):
    return kernel(param, m, v, grad.astype(ms.float32), hyper)  # the kernel reads float32 (a no-op cast when it is)


def _rms(x):
    return ops.sqrt((x * x).mean())


def _approx_sq(row, col):
    """Rank-1 reconstruction of rsqrt(E[x]) from its row and column means (Adafactor)."""
    r = ops.rsqrt(row / row.mean(-1, keep_dims=True)).expand_dims(-1)
    c = ops.rsqrt(col).expand_dims(-2)
    return r * c


@_came_matrix.register("Tensor", "Number", "Number", "Number", "Number", "Number", "Number", "Number",
                       "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _came_matrix_update(lr, beta1, beta2, beta3, eps1, eps2, clip, weight_decay, param, grad, exp_avg,
                        sq_row, sq_col, res_row, res_col):
    sq = grad * grad + eps1
    new_sq_row = sq_row * beta2 + sq.mean(-1) * (1.0 - beta2)
    new_sq_col = col_mean = sq_col * beta2 + sq.mean(-2) * (1.0 - beta2)
    update = _approx_sq(new_sq_row, col_mean) * grad
    update = update / ops.maximum(_rms(update) / clip, 1.0)
    new_avg = exp_avg * beta1 + update * (1.0 - beta1)
    res = (update - new_avg) ** 2 + eps2
    new_res_row = res_row * beta3 + res.mean(-1) * (1.0 - beta3)
    new_res_col = res_col * beta3 + res.mean(-2) * (1.0 - beta3)
    step = _approx_sq(new_res_row, new_res_col) * new_avg
    new_p = param * (1.0 - weight_decay * lr) - lr * step
    ops.assign(sq_row, new_sq_row)
    ops.assign(sq_col, new_sq_col)
    ops.assign(exp_avg, new_avg)
    ops.assign(res_row, new_res_row)
    ops.assign(res_col, new_res_col)
    ops.assign(param, new_p)
    return True


@_came_vector.register("Tensor", "Number", "Number", "Number", "Number", "Number", "Tensor", "Tensor", "Tensor",
                       "Tensor")
def _came_vector_update(lr, beta1, beta2, eps1, clip, weight_decay, param, grad, exp_avg, exp_avg_sq):
    new_sq = exp_avg_sq * beta2 + (grad * grad + eps1) * (1.0 - beta2)
    update = ops.rsqrt(new_sq) * grad
    update = update / ops.maximum(_rms(update) / clip, 1.0)
    new_avg = exp_avg * beta1 + update * (1.0 - beta1)
    new_p = param * (1.0 - weight_decay * lr) - lr * new_avg
    ops.assign(exp_avg_sq, new_sq)
    ops.assign(exp_avg, new_avg)
    ops.assign(param, new_p)
    return True


def _zeros_like(params, prefix: str, shape_of=lambda s: s) -> ParameterTuple:
    return ParameterTuple([Parameter(Tensor(np.zeros(shape_of(tuple(p.shape)), np.float32)),
                                     name=f"{prefix}.{p.name}", requires_grad=False) for p in params])


class Optimizer(nn.Cell):
    """Base: `parameters` (in the order gradients come), the last `learning_rate`, a step counter, state I/O."""

    name = "optimizer"

    def __init__(self, params, lr: float):
        super().__init__(auto_prefix=False)
        self.parameters = ParameterTuple(list(params))
        if not len(self.parameters):
            raise ValueError("the optimizer got no trainable parameters")
        self.learning_rate = Parameter(Tensor(float(lr), ms.float32), name=f"{self.name}.learning_rate",
                                       requires_grad=False)
        self.step = Parameter(Tensor(0.0, ms.float32), name=f"{self.name}.step", requires_grad=False)
        self.hyper_map = ops.HyperMap()

    def state_parameters(self) -> list:
        """Every Parameter of the optimizer's state (not the model's)."""
        own = {id(p) for p in self.parameters}
        return [p for p in self.get_parameters() if id(p) not in own]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {p.name: p.asnumpy() for p in self.state_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        params = {p.name: p for p in self.state_parameters()}
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} entries, e.g. {missing[0]} (a different "
                             f"optimizer or model?)")
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"optimizer state {name} has shape {state[name].shape}, expected {tuple(p.shape)}")
            p.set_data(Tensor(state[name], dtype=p.dtype))


class AdamW(Optimizer):
    """PyTorch's AdamW (decoupled weight decay, bias-corrected moments)."""

    name = "adamw"

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-10, weight_decay: float = 0.03):
        super().__init__(params, lr)
        if len(betas) != 2:
            raise ValueError(f"AdamW takes 2 betas, got {list(betas)}")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.exp_avg = _zeros_like(self.parameters, "adamw.exp_avg")
        self.exp_avg_sq = _zeros_like(self.parameters, "adamw.exp_avg_sq")
        # the update as one in-place kernel per parameter (`update_in_place`), set by `pixart.cpu.accelerate_step`
        self.kernel = None

    def construct(self, grads, lr):
        step = self.step + 1.0
        ops.assign(self.step, step)
        ops.assign(self.learning_rate, lr)
        return self.hyper_map(ops.partial(_adamw, lr, step, self.beta1, self.beta2, self.eps,
                                          self.weight_decay),
                              self.parameters, self.exp_avg, self.exp_avg_sq, grads)

    def update_in_place(self, grads, lr, scale, coef, after):
        """The same update with g = grads * coef / scale, each parameter and its moments rewritten in place by one
        kernel (no gradient-sized temporaries). `after` (a scalar every gradient flows into, e.g. their norm)
        orders the writes after every read of the old weights. Returns a scalar that depends on every write."""
        step = self.step + 1.0
        ops.assign(self.step, step)
        ops.assign(self.learning_rate, lr)
        hyper = ops.stack([lr.astype(ms.float32), Tensor(self.beta1, ms.float32), Tensor(self.beta2, ms.float32),
                           Tensor(self.eps, ms.float32), Tensor(self.weight_decay, ms.float32), step,
                           scale.astype(ms.float32), coef.astype(ms.float32), after.reshape(()).astype(ms.float32)])
        done = self.hyper_map(ops.partial(_adamw_in_place, self.kernel, hyper),
                              self.parameters, self.exp_avg, self.exp_avg_sq, grads)
        return ops.addn(done)


class CAME(Optimizer):
    """CAME (came_pytorch semantics). Matrices (ndim >= 2) are factored over their last two axes.

    Gradients must come in `parameters` order, which puts matrices first: the hyper-maps take contiguous slices.
    """

    name = "came"

    def __init__(self, params, lr: float, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay: float = 0.0,
                 clip_threshold: float = 1.0):
        params = list(params)
        matrices = [p for p in params if len(p.shape) >= 2]
        vectors = [p for p in params if len(p.shape) < 2]
        super().__init__(matrices + vectors, lr)
        if len(betas) != 3 or len(eps) != 2:
            raise ValueError(f"CAME takes 3 betas and 2 eps, got betas={list(betas)} eps={list(eps)}")
        self.beta1, self.beta2, self.beta3 = (float(b) for b in betas)
        self.eps1, self.eps2 = float(eps[0]), float(eps[1])
        self.weight_decay, self.clip = float(weight_decay), float(clip_threshold)
        self.num_matrices = len(matrices)
        self.matrices, self.vectors = ParameterTuple(matrices), ParameterTuple(vectors)
        self.exp_avg = _zeros_like(matrices, "came.exp_avg")
        self.sq_row = _zeros_like(matrices, "came.exp_avg_sq_row", lambda s: s[:-1])
        self.sq_col = _zeros_like(matrices, "came.exp_avg_sq_col", lambda s: s[:-2] + s[-1:])
        self.res_row = _zeros_like(matrices, "came.exp_avg_res_row", lambda s: s[:-1])
        self.res_col = _zeros_like(matrices, "came.exp_avg_res_col", lambda s: s[:-2] + s[-1:])
        self.vec_avg = _zeros_like(vectors, "came.exp_avg")
        self.vec_sq = _zeros_like(vectors, "came.exp_avg_sq")

    def construct(self, grads, lr):
        ops.assign(self.step, self.step + 1.0)
        ops.assign(self.learning_rate, lr)
        ok_m = self.hyper_map(ops.partial(_came_matrix, lr, self.beta1, self.beta2, self.beta3, self.eps1, self.eps2,
                                          self.clip, self.weight_decay),
                              self.matrices, grads[:self.num_matrices], self.exp_avg, self.sq_row, self.sq_col,
                              self.res_row, self.res_col)
        ok_v = self.hyper_map(ops.partial(_came_vector, lr, self.beta1, self.beta2, self.eps1, self.clip,
                                          self.weight_decay),
                              self.vectors, grads[self.num_matrices:], self.vec_avg, self.vec_sq)
        return ok_m, ok_v


OPTIMIZERS = {"adamw": AdamW, "came": CAME}
DEFAULTS = {  # the published PixArt settings
    "adamw": dict(betas=(0.9, 0.999), eps=(1e-10,), weight_decay=0.03),
    "came": dict(betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=0.0),
}


def build_optimizer(name: str, params, lr: float, betas=None, eps=None, weight_decay=None) -> Optimizer:
    """An optimizer by name, with PixArt's defaults for whatever is None."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    d = DEFAULTS[name]
    betas = tuple(betas) if betas else d["betas"]
    eps = tuple(eps) if eps else d["eps"]
    wd = d["weight_decay"] if weight_decay is None else weight_decay
    if name == "adamw":
        if len(eps) != 1:
            raise ValueError(f"AdamW takes one eps, got {list(eps)}")
        return AdamW(params, lr, betas, eps[0], wd)
    return CAME(params, lr, betas, eps, wd)


def constant_with_warmup(step: int, base_lr: float, warmup_steps: int) -> float:
    """diffusers' get_constant_schedule_with_warmup as PixArt steps it: optimizer step k (from 0) uses
    base_lr * k / warmup while k < warmup (so the very first step has lr 0), then base_lr."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    return base_lr


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler decays "polynomial" to this learning rate


def learning_rate_at(schedule: str, step: int, base_lr: float, warmup_steps: int, total_steps: int,
                     num_cycles: int = 1, power: float = 1.0) -> float:
    """diffusers' `get_scheduler` schedules at optimizer step `step` (from 0) of `total_steps`, with its formulas:
    constant; or a linear warm-up over `warmup_steps` then constant, a linear decay to 0, a half cosine to 0
    ("cosine", num_cycles 0.5), `num_cycles` cosines to 0 with hard restarts ("cosine_with_restarts"), or a
    polynomial decay of power `power` to 1e-7 ("polynomial")."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return base_lr
    if schedule == "constant_with_warmup" or step < warmup_steps:
        return constant_with_warmup(step, base_lr, warmup_steps)
    if schedule == "linear":
        return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
    if step > total_steps:  # polynomial
        return base_lr * (POLYNOMIAL_LR_END / base_lr)
    remaining = 1 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (((base_lr - POLYNOMIAL_LR_END) * remaining ** power + POLYNOMIAL_LR_END) / base_lr)


def add_lr_schedule_options(group, default: str) -> None:
    """--lr_scheduler, --lr_num_cycles, --lr_power as diffusers' training scripts name them."""
    group.add_argument("--lr_scheduler", default=default, choices=LR_SCHEDULES,
                       help=f"learning-rate schedule, diffusers' get_scheduler (default {default}): constant ignores "
                            "the warm-up; the others warm up linearly, then stay constant, decay linearly to 0, "
                            "follow a half cosine to 0, --lr_num_cycles cosines with hard restarts, or decay as a "
                            f"polynomial of power --lr_power to {POLYNOMIAL_LR_END:g}")
    group.add_argument("--lr_num_cycles", type=int, default=1,
                       help="cosine_with_restarts: the number of cosine cycles (hard restarts)")
    group.add_argument("--lr_power", type=float, default=1.0, help="polynomial: the power of the decay")


def check_lr_schedule(args, flag) -> None:
    """One-line ValueError for schedule settings diffusers would reject or that make no schedule."""
    schedule = getattr(args, "lr_scheduler", "constant_with_warmup")
    if schedule == "cosine_with_restarts" and args.lr_num_cycles < 1:
        raise ValueError(f"{flag('lr_num_cycles')} must be >= 1, got {args.lr_num_cycles}")
    if schedule == "polynomial" and not args.learning_rate > POLYNOMIAL_LR_END:
        raise ValueError(f"{flag('lr_scheduler')} polynomial decays to {POLYNOMIAL_LR_END:g}, so "
                         f"{flag('learning_rate')} must be larger; got {args.learning_rate}")


def auto_scale_lr(lr: float, effective_batch: int, rule: str | None, base_batch: int = 256) -> tuple[float, float]:
    """PixArt's auto_lr: scale lr by effective_batch / 256 ("linear") or its square root ("sqrt")."""
    if rule in (None, "none"):
        return lr, 1.0
    if rule not in ("sqrt", "linear"):
        raise ValueError(f"auto_lr must be none, sqrt or linear, got {rule!r}")
    ratio = math.sqrt(effective_batch / base_batch) if rule == "sqrt" else effective_batch / base_batch
    return lr * ratio, ratio
