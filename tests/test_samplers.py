"""Samplers against diffusers' schedulers (same fake model on both sides) and against NumPy float64 write-ups of
the papers' update formulas. The fake "model" is a fixed random smooth function of (x, t), written once in NumPy."""
import numpy as np
import pytest
import mindspore as ms
import torch

from pixart.diffusion import (DEFAULT_STEPS, SAMPLERS, DDIMSampler, DPMSolver, IDDPMSampler, LCMSampler, SASolver,
                              default_schedule, make_sampler, q_sample, space_timesteps)
from tests.utils import rel_err

C, SHAPE = 4, (2, 4, 8, 8)
_w = np.random.default_rng(1234)
W = _w.standard_normal((2 * C, C)) / np.sqrt(C)  # channel mixing for [eps, v]
BIAS = _w.standard_normal((2 * C, 8, 8))


def fake_out(x, t):
    """(B, 2C) [eps, v] in (-1, 1), smooth in x and t; float64 in, float64 out."""
    t = np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
    return np.tanh(np.einsum("oc,bchw->bohw", W, x) + BIAS[None] * np.sin(t / 100.0))


def ms_model(x, t):  # the convention every sampler takes; returns 2C channels
    return ms.Tensor(fake_out(x.asnumpy().astype(np.float64), t.asnumpy()).astype(np.float32))


def torch_eps(x, t):  # diffusers side: eps only, float32
    return torch.from_numpy(fake_out(x.numpy().astype(np.float64), [float(t)] * x.shape[0])[:, :C].astype(np.float32))


def np_eps(x, t):
    return fake_out(x, [t] * x.shape[0])[:, :C]


@pytest.fixture
def x_T():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def run(sampler, x_T, **kw):
    return sampler.sample(ms_model, ms.Tensor(x_T), progress=False, **kw).asnumpy()


# ---- independent float64 schedule for the reference write-ups ---------------------------------------------------
BETAS = np.linspace(1e-4, 0.02, 1000)
ABAR = np.cumprod(1 - BETAS)


def vp(t):
    """Continuous-time alpha, sigma, lambda of the discrete schedule (log alpha piecewise linear at t=(n+1)/N)."""
    log_a = np.interp(t, np.arange(1, 1001) / 1000, 0.5 * np.log(ABAR))
    a, s = np.exp(log_a), np.sqrt(1 - np.exp(2 * log_a))
    return a, s, np.log(a / s)


# ---- diffusers parity -----------------------------------------------------------------------------------------
@pytest.mark.parity
def test_dpm_solver_matches_diffusers(x_T):
    from diffusers import DPMSolverMultistepScheduler
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                      solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True,
                                      timestep_spacing="linspace", final_sigmas_type="zero", use_karras_sigmas=False,
                                      prediction_type="epsilon")
    sch.set_timesteps(20)
    x = torch.from_numpy(x_T)
    for t in sch.timesteps:
        x = sch.step(torch_eps(x, t), t, x).prev_sample
    solver = DPMSolver()
    np.testing.assert_array_equal(solver.timesteps(20), sch.timesteps.numpy())
    err = rel_err(run(solver, x_T, num_steps=20), x.numpy())
    print(f"dpm vs diffusers rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parity
def test_ddim_matches_diffusers(x_T, eta):
    from diffusers import DDIMScheduler
    sch = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sch.set_timesteps(20)
    g = np.random.default_rng(7)  # our sampler draws one noise of x's shape per step from it, in order
    x = torch.from_numpy(x_T)
    for t in sch.timesteps:
        noise = torch.from_numpy(g.standard_normal(SHAPE, dtype=np.float32)) if eta > 0 else None
        x = sch.step(torch_eps(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    sampler = DDIMSampler(eta=eta)
    np.testing.assert_array_equal(sampler.timesteps(20), sch.timesteps.numpy())
    err = rel_err(run(sampler, x_T, num_steps=20, generator=np.random.default_rng(7)), x.numpy())
    print(f"ddim(eta={eta}) vs diffusers rel err {err:.2e}")
    assert err <= 1e-5


# ---- paper formulas in NumPy float64 ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 9, 10, 20])
def test_dpm_solver_time_uniform_matches_official_algorithm(x_T, n):
    """The official repos' multistep DPM-Solver++ (order 2, skip_type "time_uniform", lower_order_final), written
    out in float64 in its own structure: a history of (model output, time) pairs, a first-order start, and the last
    step at first order only when fewer than 10 steps are taken."""
    order = 2
    ts = np.linspace(1.0, 1e-3, n + 1)

    def data_pred(x, t):  # the noise-prediction model wrapped as the official model_fn does for dpmsolver++
        a, s, _ = vp(t)
        return (x - s * np_eps(x, (t - 1e-3) * 1000)) / a

    def first_update(x, s, t, m_s):
        (a_s, s_s, l_s), (a_t, s_t, l_t) = vp(s), vp(t)
        return s_t / s_s * x - a_t * np.expm1(-(l_t - l_s)) * m_s

    def second_update(x, models, times, t):
        (m1, m0), (t1, t0) = models, times
        l1, l0, lt = vp(t1)[2], vp(t0)[2], vp(t)[2]
        h, h0 = lt - l0, l0 - l1
        a_t, s_t, _ = vp(t)
        phi = np.expm1(-h)
        return s_t / vp(t0)[1] * x - a_t * phi * m0 - 0.5 * a_t * phi * (m0 - m1) / (h0 / h)

    x = x_T.astype(np.float64)
    times, models = [ts[0]], [data_pred(x, ts[0])]
    x = first_update(x, ts[0], ts[1], models[-1])
    times.append(ts[1])
    models.append(data_pred(x, ts[1]))
    for step in range(order, n + 1):
        step_order = min(order, n + 1 - step) if n < 10 else order
        t = ts[step]
        x = first_update(x, times[-1], t, models[-1]) if step_order == 1 else second_update(x, models, times, t)
        times, models = times[1:] + [t], models[1:] + [models[-1]]
        if step < n:
            models[-1] = data_pred(x, t)
    solver = DPMSolver("time_uniform")
    np.testing.assert_allclose(solver.timesteps(n), (ts[:-1] - 1e-3) * 1000, rtol=0, atol=1e-9)
    err = rel_err(run(solver, x_T, num_steps=n), x)
    print(f"dpm time_uniform ({n} steps) vs the official algorithm rel err {err:.2e}")
    assert err <= 1e-5


def _sa_update(x, s, t, nodes, tau, z, few_steps):
    """SA-Solver data-prediction step (Xue et al. 2023, eq. 18): Lagrange interpolation of D through `nodes`
    [(D, lambda)] (newest first), integrals of exp((1+tau^2) lambda) lambda^k in closed form; plus the few-step
    order-2 term of their appendix D."""
    (a_s, s_s, l_s), (a_t, s_t, l_t) = vp(s), vp(t)
    a, h = 1 + tau ** 2, l_t - l_s
    prim = [lambda l: np.exp(a * l) / a, lambda l: np.exp(a * l) * (a * l - 1) / a ** 2]  # antiderivatives
    integral = [f(l_t) - f(l_s) for f in prim]  # of e^{a l} l^k, k = 0, 1
    if len(nodes) == 1:
        coef = [integral[0]]
    else:
        (_, l0), (_, l1) = nodes
        coef = [(integral[1] - l1 * integral[0]) / (l0 - l1), (integral[1] - l0 * integral[0]) / (l1 - l0)]
        if few_steps:
            extra = np.exp(a * l_t) * (h ** 2 / 2 - (h * a - 1 + np.exp(-a * h)) / a ** 2) / (l0 - l1)
            coef = [coef[0] + extra, coef[1] - extra]
    grad = sum(c * d for c, (d, _) in zip(coef, nodes))
    out = np.exp(-tau ** 2 * h) * s_t / s_s * x + a * s_t * np.exp(-tau ** 2 * l_t) * grad
    return out + (s_t * np.sqrt(1 - np.exp(-2 * tau ** 2 * h)) * z if z is not None else 0)


def test_sa_solver_matches_formula(x_T):
    """PEC predictor (order 2, 1 at both ends) / corrector (order 2), tau = 1 on t in [0.2, 0.8], 25 steps."""
    n, seed = 25, 11
    ts = np.linspace(1.0, 1e-3, n + 1)
    g = np.random.default_rng(seed)

    def data_pred(x, t):
        a, s, _ = vp(t)
        return (x - s * np_eps(x, (t - 1e-3) * 1000)) / a

    x = x_T.astype(np.float64)
    hist = [(data_pred(x, ts[0]), vp(ts[0])[2])]
    for i in range(1, n + 1):
        tau = 1.0 if (0.2 <= ts[i] <= 0.8 and i < n) else 0.0
        z = g.standard_normal(SHAPE, dtype=np.float32).astype(np.float64) if tau > 0 else None
        order = 1 if i in (1, n) else 2
        x_p = _sa_update(x, ts[i - 1], ts[i], hist[:order], tau, z, few_steps=True)
        if i == n:
            x = x_p
            break
        node = (data_pred(x_p, ts[i]), vp(ts[i])[2])
        x = _sa_update(x, ts[i - 1], ts[i], [node, hist[0]], tau, z, few_steps=True)
        hist = [node, hist[0]]
    err = rel_err(run(SASolver(), x_T, num_steps=n, generator=np.random.default_rng(seed)), x)
    print(f"sa-solver vs formula rel err {err:.2e}")
    assert err <= 1e-5


# ---- IDDPM --------------------------------------------------------------------------------------------------
def test_iddpm_respacing():
    kept = np.round(np.arange(100) * 999 / 99).astype(int)  # even stride over [0, 999]
    assert space_timesteps(1000, "100") == list(kept)
    np.testing.assert_array_equal(IDDPMSampler().timesteps(100), kept[::-1])
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,15,20")) == 45


def test_iddpm_p_mean_variance_matches_formula(x_T):
    sampler = IDDPMSampler()
    kept, ns = sampler.respace(100)
    ac = ABAR[kept]
    betas = 1 - ac / np.append(1.0, ac[:-1])
    ac_prev = np.append(1.0, ac[:-1])
    x = x_T.astype(np.float64)
    for i in (0, 1, 37, 99):
        out = fake_out(x, [kept[i]] * SHAPE[0])
        eps, v = out[:, :C], out[:, C:]
        x0 = (x - np.sqrt(1 - ac[i]) * eps) / np.sqrt(ac[i])
        mean = (np.sqrt(ac_prev[i]) * betas[i] * x0 + np.sqrt(1 - betas[i]) * (1 - ac_prev[i]) * x) / (1 - ac[i])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        min_log = np.log(post_var[max(i, 1)])  # posterior variance is 0 at i=0: clipped to i=1's
        log_var = (v + 1) / 2 * np.log(betas[i]) + (1 - v) / 2 * min_log
        m, lv, _ = ns.p_mean_variance(ms.Tensor(out.astype(np.float32)), ms.Tensor(x_T), i)
        assert rel_err(m.asnumpy(), mean) <= 1e-5 and rel_err(lv.asnumpy(), log_var) <= 1e-5, i
        # the training path: per-sample (B,) Tensor timesteps give the same values
        m2, lv2, _ = ns.p_mean_variance(ms.Tensor(out.astype(np.float32)), ms.Tensor(x_T), ms.Tensor([i, i], ms.int32))
        assert rel_err(m2.asnumpy(), mean) <= 1e-5 and rel_err(lv2.asnumpy(), log_var) <= 1e-5, i


def test_iddpm_full_run_finite_and_seeded(x_T):
    sampler = make_sampler("iddpm")
    a = run(sampler, x_T, generator=np.random.default_rng(3))
    b = run(sampler, x_T, generator=np.random.default_rng(3))
    assert np.isfinite(a).all() and np.array_equal(a, b)


# ---- schedule / factory ---------------------------------------------------------------------------------------
def test_q_sample_per_sample_timesteps(x_T):
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999])
    got = q_sample(ms.Tensor(x_T), ms.Tensor(t, ms.int32), ms.Tensor(noise)).asnumpy()
    ref = np.sqrt(ABAR[t])[:, None, None, None] * x_T + np.sqrt(1 - ABAR[t])[:, None, None, None] * noise
    assert rel_err(got, ref) <= 1e-6
    assert rel_err(default_schedule().alphas_cumprod, ABAR) <= 1e-12


def test_make_sampler():
    assert DEFAULT_STEPS == {"dpm": 20, "iddpm": 100, "ddim": 20, "sa": 25, "lcm": 4}
    assert isinstance(make_sampler("dpm", schedule="time_uniform"), DPMSolver)
    assert isinstance(make_sampler("sa"), SASolver)
    with pytest.raises(ValueError, match="dpm, iddpm, ddim, sa, lcm"):
        make_sampler("bogus")


# ---- LCM, custom timesteps, partial runs (image-to-image) ---------------------------------------------------------
def _lcm_scheduler(**kw):
    from diffusers import LCMScheduler
    return LCMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True, clip_sample=False,
                        prediction_type="epsilon", **kw)


def _run_diffusers(sch, x_T, seed=None):
    """diffusers' scheduler loop on the fake model; noise (LCM) from NumPy, one draw of x's shape per step."""
    g = np.random.default_rng(seed)
    x = torch.from_numpy(x_T)
    for t in sch.timesteps:
        kw = {}
        if type(sch).__name__ == "LCMScheduler":
            import diffusers.schedulers.scheduling_lcm as lcm_module
            lcm_module.randn_tensor = lambda shape, **_: torch.from_numpy(g.standard_normal(shape, dtype=np.float32))
        x = sch.step(torch_eps(x, t), t, x, **kw).prev_sample
    return x.numpy()


@pytest.mark.parametrize("steps, timesteps", [(4, None), (8, None), (1, None), (None, [999, 759, 499, 259])])
@pytest.mark.parity
def test_lcm_matches_diffusers(x_T, steps, timesteps, monkeypatch):
    import diffusers.schedulers.scheduling_lcm as lcm_module
    monkeypatch.setattr(lcm_module, "randn_tensor", lcm_module.randn_tensor)  # restored after the test
    sch = _lcm_scheduler()
    sch.set_timesteps(steps, timesteps=timesteps)
    ref = _run_diffusers(sch, x_T, seed=5)
    sampler = make_sampler("lcm", timesteps=timesteps)
    np.testing.assert_array_equal(sampler.timesteps(steps), sch.timesteps.numpy())
    err = rel_err(run(sampler, x_T, num_steps=steps, generator=np.random.default_rng(5)), ref)
    print(f"lcm ({steps or timesteps}) vs diffusers rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("timesteps", [[400], [999, 500, 200], [981, 700, 321, 80, 3]])
@pytest.mark.parity
def test_dpm_custom_timesteps_match_diffusers(x_T, timesteps):
    """DPM-Solver++(2M) on a custom schedule as diffusers' set_timesteps(timesteps=...); one step at 400 is the
    DMD one-step generator x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar)."""
    from diffusers import DPMSolverMultistepScheduler
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                      solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sch.set_timesteps(timesteps=timesteps)
    ref = _run_diffusers(sch, x_T)
    out = run(make_sampler("dpm", timesteps=timesteps), x_T)
    assert rel_err(out, ref) <= 1e-5
    if timesteps == [400]:
        a = ABAR[400]
        assert rel_err(out, (x_T - np.sqrt(1 - a) * np_eps(x_T.astype(np.float64), 400)) / np.sqrt(a)) <= 1e-5


def test_custom_timesteps_refused_with_the_sampler_named():
    for name in ("ddim", "sa", "iddpm"):
        with pytest.raises(ValueError, match=f"sampler '{name}' cannot take custom timesteps; use one of dpm, lcm"):
            make_sampler(name, timesteps=[400])
    for bad, message in [([1000], "timestep 1000 is out of range"), ([-1], "timestep -1 is out of range"),
                         ([400, 500], "strictly decreasing"), ([500, 500], "strictly decreasing"),
                         ([400.5], "whole numbers"), ([], "empty")]:
        with pytest.raises(ValueError, match=message):
            make_sampler("lcm", timesteps=bad)
    with pytest.raises(ValueError, match="linspace"):
        make_sampler("dpm", schedule="time_uniform", timesteps=[400])


def test_degenerate_schedules_are_refused():
    """Too many steps for the 1000-step grid would repeat a timestep (a zero step: a black image)."""
    assert len(set(DPMSolver().timesteps(999))) == 999
    with pytest.raises(ValueError, match="dpm: 1000 steps repeat timesteps; use at most 999 steps"):
        DPMSolver().timesteps(1000)
    with pytest.raises(ValueError, match="ddim: 1001 steps repeat timesteps; use at most 1000"):
        DDIMSampler().timesteps(1001)
    with pytest.raises(ValueError, match="more than original_inference_steps"):
        LCMSampler().timesteps(51)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_partial_runs_start_where_the_noise_level_says(x_T, name):
    """sample(start=k) runs exactly n - k model calls at timesteps()[k:], and noise_levels() are the sampler's own
    (alpha, sigma) there; start=0 is the whole run."""
    n = 6
    sampler = make_sampler(name)
    calls = []

    def counting(x, t):
        calls.append(float(t.asnumpy()[0]))
        return ms_model(x, t)

    ts = sampler.timesteps(n)
    alpha, sigma = sampler.noise_levels(n)
    assert alpha.shape == sigma.shape == (n + 1,) and (alpha[-1], sigma[-1]) == (1.0, 0.0)
    np.testing.assert_allclose(alpha[:-1] ** 2 + sigma[:-1] ** 2, 1.0, atol=1e-9)
    assert (np.diff(sigma) < 0).all()
    full = sampler.sample(counting, ms.Tensor(x_T), num_steps=n, progress=False, generator=np.random.default_rng(1))
    np.testing.assert_allclose(calls, ts, atol=1e-9)
    calls.clear()
    again = sampler.sample(counting, ms.Tensor(x_T), num_steps=n, progress=False, generator=np.random.default_rng(1),
                           start=0)
    np.testing.assert_array_equal(full.asnumpy(), again.asnumpy())
    calls.clear()
    sampler.sample(counting, ms.Tensor(x_T), num_steps=n, progress=False, generator=np.random.default_rng(1), start=4)
    np.testing.assert_allclose(calls, ts[4:], atol=1e-9)
