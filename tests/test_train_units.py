"""Training pieces against PyTorch references: the IDDPM loss (values and gradients), AdamW, CAME, the lr schedule,
loss scaling with overflow skipping, gradient accumulation, EMA, and the data plan (buckets, sharding, draws)."""

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from pixart import cpu
from pixart.diffusion.loss import DiffusionLoss
from pixart.diffusion.schedule import default_schedule
from pixart.training.ema import EMA
from pixart.training.optimizers import AdamW, CAME, auto_scale_lr, constant_with_warmup, learning_rate_at
from pixart.training.step import TrainStep
from tests.utils import rel_err


# ----------------------------------------------------------------------------------------------------------------
# The loss: a stub "model" whose output is a Parameter, so values and gradients can be compared with the official
# formulas written in torch (gaussian_diffusion.training_losses with LEARNED_RANGE variance and the MSE loss type).
# ----------------------------------------------------------------------------------------------------------------
class _Config:
    in_channels = 4


class StubModel(nn.Cell):
    def __init__(self, out: np.ndarray):
        super().__init__()
        self.config, self.out_channels = _Config(), out.shape[1]
        self.out = Parameter(Tensor(out), name="out")

    def construct(self, x, t, y, mask=None, data_info=None, force_drop_ids=None):
        return self.out * 1.0


def torch_reference(out, x0, t, noise):
    """The official training_losses, transcribed: returns per-sample loss, mse, vb and d(mean loss)/d(out)."""
    s = default_schedule()
    f = lambda arr: torch.tensor(arr[t], dtype=torch.float32).reshape(-1, 1, 1, 1)  # _extract_into_tensor
    out = torch.tensor(out, requires_grad=True)
    x0, noise = torch.tensor(x0), torch.tensor(noise)
    tt = torch.tensor(t)
    x_t = f(s.sqrt_alphas_cumprod) * x0 + f(s.sqrt_one_minus_alphas_cumprod) * noise
    c = x0.shape[1]
    eps, var = torch.split(out, c, dim=1)
    frozen = torch.cat([eps.detach(), var], 1)
    true_mean = f(s.posterior_mean_coef1) * x0 + f(s.posterior_mean_coef2) * x_t
    true_logvar = f(s.posterior_log_variance_clipped)
    e, v = torch.split(frozen, c, dim=1)
    frac = (v + 1) / 2
    logvar = frac * f(s.log_betas) + (1 - frac) * true_logvar
    pred_x0 = f(s.sqrt_recip_alphas_cumprod) * x_t - f(s.sqrt_recipm1_alphas_cumprod) * e
    mean = f(s.posterior_mean_coef1) * pred_x0 + f(s.posterior_mean_coef2) * x_t
    kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                + (true_mean - mean) ** 2 * torch.exp(-logvar))
    kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)
    cdf = lambda z: 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * torch.pow(z, 3))))
    inv = torch.exp(-0.5 * logvar)
    cdf_plus, cdf_min = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    lp = torch.where(x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                     torch.where(x0 > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                 torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    nll = -lp.mean(dim=(1, 2, 3)) / np.log(2.0)
    vb = torch.where(tt == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    loss = mse + vb
    loss.mean().backward()
    return loss.detach().numpy(), mse.detach().numpy(), vb.detach().numpy(), out.grad.numpy()


@pytest.mark.parity
def test_loss_matches_official_formulas_values_and_gradients(rng):
    b, c = 6, 4
    x0 = rng.standard_normal((b, c, 4, 6)).astype(np.float32)
    x0[0, 0, 0, :2] = [-1.5, 1.5]  # the decoder's open outer bins
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    out = (rng.standard_normal((b, 2 * c, 4, 6)) * 0.5).astype(np.float32)
    t = np.array([0, 1, 10, 250, 700, 999], np.int32)
    ref_loss, ref_mse, ref_vb, ref_grad = torch_reference(out, x0, t, noise)

    stub = StubModel(out)
    loss_fn = DiffusionLoss(stub)
    args = (Tensor(x0), Tensor(t), Tensor(noise), Tensor(np.zeros((b, 1, 3, 8), np.float32)),
            Tensor(np.ones((b, 3), np.int32)), Tensor(np.ones((b, 2), np.float32)),
            Tensor(np.ones((b, 1), np.float32)), Tensor(np.zeros(b, np.int32)))
    mean, terms = loss_fn(*args)
    terms = terms.asnumpy()
    # t = 0's decoder NLL is a difference of two nearby CDFs: fp32 keeps ~5 digits of it
    assert rel_err(terms[0], ref_loss) < 5e-5 and rel_err(terms[1], ref_mse) < 1e-6 and rel_err(terms[2], ref_vb) < 5e-5
    assert rel_err(terms[2][1:], ref_vb[1:]) < 1e-5
    assert abs(float(mean.asnumpy()) - ref_loss.mean()) < 1e-5
    grad = ms.grad(lambda *a: loss_fn(*a)[0], grad_position=None, weights=[stub.out])(*args)[0].asnumpy()
    assert rel_err(grad[1:], ref_grad[1:]) < 1e-5
    assert rel_err(grad[0], ref_grad[0]) < 5e-3  # the t = 0 NLL's cancellation again
    # the variational bound does not train the mean: the eps channels get exactly the MSE gradient
    mse_grad = -2 * (noise - out[:, :c]) / (c * 4 * 6) / b
    assert rel_err(grad[:, :c], mse_grad) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Optimizers against PyTorch
# ----------------------------------------------------------------------------------------------------------------
SHAPES = [(6, 5), (3, 2, 2, 2), (7,)]


def _run_mindspore(opt_cls, params0, grads, lrs, in_place=False, **kw):
    params = [Parameter(Tensor(p.copy()), name=f"p{i}") for i, p in enumerate(params0)]
    opt = opt_cls(params, lrs[0], **kw)
    if in_place:
        opt.kernel = cpu.in_place_kernel("AdamWUpdate", opt.parameters)
    order = [int(p.name[1:]) for p in opt.parameters]  # CAME puts matrices first
    for g, lr in zip(grads, lrs):
        if in_place:  # the kernel gets the gradients times loss scale 8 and divides by 8 * coef 0.5 = 4
            opt.update_in_place(tuple(Tensor(g[i] * 4) for i in order), Tensor(lr, ms.float32), Tensor(8.0),
                                Tensor(0.5), Tensor(0.0))
        else:
            opt(tuple(Tensor(g[i]) for i in order), Tensor(lr, ms.float32))
    return [p.asnumpy() for p in params]


def torch_came_step(p, g, state, lr, betas, eps, wd, clip=1.0):
    """came_pytorch's CAME.step for one parameter."""
    factored = g.dim() >= 2
    if not state:
        state["exp_avg"] = torch.zeros_like(g)
        if factored:
            state["r"], state["c"] = torch.zeros(g.shape[:-1]), torch.zeros(g.shape[:-2] + g.shape[-1:])
            state["rr"], state["rc"] = torch.zeros(g.shape[:-1]), torch.zeros(g.shape[:-2] + g.shape[-1:])
        else:
            state["sq"] = torch.zeros_like(g)
    rms = lambda x: x.norm(2) / (x.numel() ** 0.5)
    approx = lambda r, c: (r / r.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * c.unsqueeze(-2).rsqrt()
    update = g ** 2 + eps[0]
    if factored:
        state["r"].mul_(betas[1]).add_(update.mean(dim=-1), alpha=1 - betas[1])
        state["c"].mul_(betas[1]).add_(update.mean(dim=-2), alpha=1 - betas[1])
        update = approx(state["r"], state["c"]) * g
    else:
        state["sq"].mul_(betas[1]).add_(update, alpha=1 - betas[1])
        update = state["sq"].rsqrt() * g
    update = update / (rms(update) / clip).clamp(min=1.0)
    state["exp_avg"].mul_(betas[0]).add_(update, alpha=1 - betas[0])
    if factored:
        res = (update - state["exp_avg"]) ** 2 + eps[1]
        state["rr"].mul_(betas[2]).add_(res.mean(dim=-1), alpha=1 - betas[2])
        state["rc"].mul_(betas[2]).add_(res.mean(dim=-2), alpha=1 - betas[2])
        update = approx(state["rr"], state["rc"]) * state["exp_avg"]
    else:
        update = state["exp_avg"].clone()
    p.add_(p, alpha=-wd * lr)
    p.add_(-update * lr)


@pytest.mark.parametrize("name", ["adamw", "adamw_in_place", "came"])
@pytest.mark.parity
def test_optimizers_match_pytorch(rng, name):
    """adamw_in_place: the fused CPU kernel (`AdamW.update_in_place`) that the train step uses on CPU."""
    if name == "adamw_in_place" and cpu.in_place_kernel("AdamWUpdate", [Parameter(Tensor(np.zeros(2, np.float32)),
                                                                                  name="x")]) is None:
        pytest.skip("no fused CPU kernels in this process (no compiler, or PIXART_FUSED_KERNELS=0)")
    params0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) * 10 ** rng.uniform(-3, 0) for s in SHAPES]
             for _ in range(5)]
    lrs = [0.0, 1e-2, 2e-2, 2e-2, 5e-3]  # warm-up starts at 0
    tp = [torch.tensor(p.copy()) for p in params0]
    if name.startswith("adamw"):
        ours = _run_mindspore(AdamW, params0, grads, lrs, name == "adamw_in_place", eps=1e-10, weight_decay=0.03)
        opt = torch.optim.AdamW(tp, lr=lrs[0], eps=1e-10, weight_decay=0.03)
        for g, lr in zip(grads, lrs):
            for p, gi in zip(tp, g):
                p.grad = torch.tensor(gi)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
    else:
        betas, eps, wd = (0.9, 0.999, 0.9999), (1e-30, 1e-16), 0.01
        ours = _run_mindspore(CAME, params0, grads, lrs, betas=betas, eps=eps, weight_decay=wd)
        states = [{} for _ in tp]
        for g, lr in zip(grads, lrs):
            for p, gi, st in zip(tp, g, states):
                torch_came_step(p, torch.tensor(gi), st, lr, betas, eps, wd)
    for a, b in zip(ours, tp):
        assert rel_err(a, b.numpy()) < 2e-6


def test_lr_schedule_and_auto_lr():
    assert [constant_with_warmup(k, 1.0, 4) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert constant_with_warmup(0, 2e-5, 0) == 2e-5
    assert auto_scale_lr(2e-5, 64, "sqrt")[0] == pytest.approx(1e-5)
    assert auto_scale_lr(2e-5, 64, "linear")[0] == pytest.approx(5e-6)
    assert auto_scale_lr(2e-5, 64, "none")[0] == 2e-5


# ----------------------------------------------------------------------------------------------------------------
# The train step: clipping, accumulation == one big batch, overflow skipping, EMA
# ----------------------------------------------------------------------------------------------------------------
class Quadratic(nn.Cell):
    """loss = mean over samples of |w * x - y|^2 with a (3,) weight: a model small enough to check by hand."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.array([1.0, -2.0, 0.5], np.float32)), name="w")

    def construct(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop):
        per = ((self.w * x0 - noise) ** 2).mean(1)
        return per.mean(), ms.ops.stack([per, per, per * 0])


def _quad_batch(rng, b):
    x = rng.standard_normal((b, 3)).astype(np.float32)
    n = rng.standard_normal((b, 3)).astype(np.float32)
    z = np.zeros((b, 1), np.float32)
    return [Tensor(x), Tensor(np.zeros(b, np.int32)), Tensor(n), Tensor(z), Tensor(z), Tensor(z), Tensor(z),
            Tensor(np.zeros(b, np.int32))]


LR = Tensor(0.1, ms.float32)


def _quad_step(accumulate=1, clip=0.0, scale=1.0, dynamic=False, ema=None, in_place=None):
    net = Quadratic()
    opt = AdamW([net.w], 0.0, weight_decay=0.0)  # the lr comes with every step
    e = EMA(opt.parameters, ema) if ema is not None else None
    step = TrainStep(net, opt, e, clip, accumulate, 1, scale, dynamic, scale_window=2)
    if in_place is not False:  # the in-place kernels where MindSpore CPU has them, as training uses them
        cpu.accelerate_step(step)
    return net, opt, e, step


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_in_place_update_equals_the_op_by_op_update(rng, mode, request):
    """On CPU the step's norm, AdamW and EMA run as in-place kernels (no gradient-sized temporaries); they give the
    op-by-op results, in both modes, with clipping, accumulation, loss scaling and EMA."""
    if mode == "graph":
        request.getfixturevalue("graph_mode")
    runs = []
    for in_place in (True, False):
        net, opt, ema, step = _quad_step(accumulate=2, clip=0.05, scale=8.0, ema=0.5, in_place=in_place)
        if in_place and not step.in_place:
            pytest.skip("no fused CPU kernels in this process (no compiler, or PIXART_FUSED_KERNELS=0)")
        data = _quad_batch(np.random.default_rng(1), 4)
        norms = []
        for _ in range(3):
            step(*[d[:2] for d in data], LR, False)
            norms.append(float(step(*[d[2:] for d in data], LR, True)[2].asnumpy()))
        runs.append((net.w.asnumpy(), ema.state_dict()["w"], norms))
    (w1, e1, n1), (w2, e2, n2) = runs
    assert not np.allclose(w1, [1.0, -2.0, 0.5])  # the weights moved
    assert np.allclose(w1, w2, atol=1e-6) and np.allclose(e1, e2, atol=1e-6) and np.allclose(n1, n2, rtol=1e-5)


def test_accumulation_equals_one_big_batch_and_clipping(rng):
    data = _quad_batch(rng, 4)
    halves = [[d[:2] for d in data], [d[2:] for d in data]]
    net1, _, _, big = _quad_step(clip=0.05)
    out_big = big(*data, LR, True)
    net2, opt2, _, acc = _quad_step(accumulate=2, clip=0.05)
    acc(*halves[0], LR, False)
    assert float(opt2.step.asnumpy()) == 0  # nothing applied after the first micro-batch
    out_acc = acc(*halves[1], LR, True)
    assert np.allclose(net1.w.asnumpy(), net2.w.asnumpy(), atol=1e-6)
    assert abs(float(out_big[2].asnumpy()) - float(out_acc[2].asnumpy())) < 1e-5  # same pre-clip norm
    assert float(out_big[2].asnumpy()) > 0.05  # so the clip was active


def test_overflow_skips_the_update_and_backs_off_the_scale(rng):
    data = _quad_batch(rng, 2)
    big = [Tensor(data[0].asnumpy() * 1e6)] + data[1:]  # loss ~ 1e12: x 1e30 overflows fp32 (3.4e38)
    net, opt, ema, step = _quad_step(scale=1e30, dynamic=True, ema=0.5)
    w0 = net.w.asnumpy().copy()
    loss, _, norm, finite, scale = step(*big, LR, True)
    assert not bool(finite.asnumpy()) and float(scale.asnumpy()) == pytest.approx(1e30)
    assert np.array_equal(net.w.asnumpy(), w0) and float(opt.step.asnumpy()) == 0
    assert float(step.loss_scale.asnumpy()) == pytest.approx(5e29, rel=1e-6)  # halved
    # a normal scale: the update happens, the EMA moves half way, the scale grows after `window` good steps
    step.loss_scale.set_data(Tensor(4.0, ms.float32))
    for _ in range(2):
        step(*data, LR, True)
    assert float(opt.step.asnumpy()) == 2 and float(step.loss_scale.asnumpy()) == 8.0
    w = net.w.asnumpy()
    assert not np.array_equal(w, w0)
    avg = ema.state_dict()["w"]
    assert np.all(np.abs(avg - w) > 0) and np.all(np.abs(avg - w0) > 0)


def test_lr_schedules_follow_diffusers():
    """--lr_scheduler of the LoRA script: warm-up, then constant, a linear decay to 0, or a half cosine to 0."""
    assert [learning_rate_at("constant_with_warmup", k, 1.0, 2, 6) for k in range(4)] == [0.0, 0.5, 1.0, 1.0]
    assert [learning_rate_at("linear", k, 1.0, 2, 6) for k in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = [learning_rate_at("cosine", k, 1.0, 0, 4) for k in range(5)]
    assert np.allclose(cosine, [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.5 - 0.5 * np.cos(np.pi / 4), 0.0])
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        learning_rate_at("cosine_decay", 3, 1.0, 0, 4)
