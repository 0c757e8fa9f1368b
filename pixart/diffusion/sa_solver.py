"""SA-Solver (Xue et al. 2023), stochastic Adams predictor-corrector in data prediction, as PixArt-Sigma samples:
SASolverSampler -> SASolver.sample(mode="few_steps", steps=25, skip_type="time", skip_order=1,
predictor_order=2, corrector_order=2, pc_mode="PEC"), tau(t) = eta (= 1) for 0.2 <= t <= 0.8 else 0.

Nodes are uniform in continuous time t from 1 to 1/N. From node s to node t, with lambda = log(alpha / sigma),
h = lambda_t - lambda_s, a = 1 + tau^2 and Lagrange basis polynomials l_j through the stored x_0 predictions D_j:

    x_t = exp(-tau^2 h) (sigma_t / sigma_s) x_s + sum_j c_j D_j + sigma_t sqrt(1 - exp(-2 tau^2 h)) z,
    c_j = a alpha_t * integral_0^h exp(-a u) l_j(lambda_t - u) du           (u = lambda_t - lambda)

(paper eq. 15/18, written relative to lambda_t so no large exponentials cancel). Predictor: nodes s and the one
before (order 1 on the first and the last step). Corrector: nodes t (the model at the predictor's x_t) and s,
with the same noise z. "few_steps" adds an O(h^3) term to order-2 coefficients (paper appendix D), does not
correct after the last step, and takes the last step with tau = 0. PEC: one model call per step (n in all).
"""
from __future__ import annotations

import numpy as np

from .common import after_step, as_float32, call_eps, randn_like, steps_iter
from .schedule import NoiseSchedule, default_schedule

DEFAULT_STEPS = 25


def sa_coefficients(lam_t: float, h: float, tau: float, lam_nodes, alpha_t: float, few_steps: bool = True):
    """Weights c_j of the stored predictions D_j (newest first) for an order-1 or order-2 step."""
    a = 1.0 + tau * tau
    e0 = -np.expm1(-a * h)  # a * integral_0^h exp(-a u) du
    e1 = (1.0 - np.exp(-a * h) * (1.0 + a * h)) / a  # a * integral_0^h u exp(-a u) du
    if len(lam_nodes) == 1:
        return [alpha_t * e0]
    la, lb = lam_nodes  # l_a(lambda) = (lambda - lb) / (la - lb), and symmetrically l_b
    ca = alpha_t * ((lam_t - lb) * e0 - e1) / (la - lb)
    cb = alpha_t * ((lam_t - la) * e0 - e1) / (lb - la)
    if few_steps:  # appendix D "rescaling": moves weight between the two nodes, O(h^3)
        m = a * alpha_t * (h * h / 2 - (a * h - 1 + np.exp(-a * h)) / (a * a)) / (la - lb)
        ca, cb = ca + m, cb - m
    return [ca, cb]


class SASolver:
    name = "sa"
    DEFAULT_STEPS = DEFAULT_STEPS
    CUSTOM_TIMESTEPS = False  # diffusers' SASolverScheduler takes none either

    def __init__(self, eta: float = 1.0, tau_interval=(0.2, 0.8), noise_schedule: NoiseSchedule | None = None):
        self.eta, self.tau_interval = float(eta), tuple(tau_interval)
        self.ns = noise_schedule or default_schedule()

    def _nodes(self, n: int):
        t = np.linspace(1.0, 1.0 / self.ns.num_timesteps, n + 1)
        lo, hi = self.tau_interval
        tau = np.where((t >= lo) & (t <= hi), self.eta, 0.0)
        tau[-1] = 0.0  # the last step is deterministic
        ns = self.ns
        return ns.model_time(t[:-1]), ns.marginal_alpha(t), ns.marginal_std(t), ns.marginal_lambda(t), tau

    def timesteps(self, num_steps: int | None = None) -> np.ndarray:
        return self._nodes(num_steps or DEFAULT_STEPS)[0]

    def noise_levels(self, num_steps: int | None = None):
        """(alpha, sigma) of x before each step and, last, after the final one (1, 0)."""
        _, alpha, sigma, _, _ = self._nodes(num_steps or DEFAULT_STEPS)
        return np.append(alpha[:-1], 1.0), np.append(sigma[:-1], 0.0)

    def sample(self, model_fn, x_T, num_steps: int | None = None, progress: bool = True, generator=None,
               callback=None, start: int = 0):
        """`generator` (a NumPy Generator) gives one draw of x's shape for each step k = 1..n with tau_k > 0.
        `start` skips the first steps (x_T is then x at node `start`; the first step taken is of order 1)."""
        n = num_steps or DEFAULT_STEPS
        if n < 2:
            raise ValueError("SA-Solver (predictor order 2) needs at least 2 steps")
        model_t, alpha, sigma, lam, tau = self._nodes(n)

        def predict_x0(x, k):
            eps = call_eps(model_fn, x, model_t[k])
            return x * float(1.0 / alpha[k]) - eps * float(sigma[k] / alpha[k])

        def step(x, k, nodes, z):  # from node k-1 to node k; nodes = [(D, node index), ...] newest first
            h, tk = lam[k] - lam[k - 1], tau[k]
            cs = sa_coefficients(lam[k], h, tk, [lam[j] for _, j in nodes], alpha[k])
            out = x * float(np.exp(-tk * tk * h) * sigma[k] / sigma[k - 1])
            for (d, _), c in zip(nodes, cs):
                out = out + d * float(c)
            if z is not None:
                out = out + z * float(sigma[k] * np.sqrt(-np.expm1(-2.0 * tk * tk * h)))
            return out

        x = as_float32(x_T)
        if start >= n:
            return x
        hist = [(predict_x0(x, start), start)]  # newest first
        for k in steps_iter(range(start + 1, n + 1), progress, "SA-Solver"):
            z = randn_like(x, generator) if tau[k] > 0 else None
            order = 1 if k in (start + 1, n) else 2
            x_p = step(x, k, hist[:order], z)  # predictor
            if k == n:
                x, _ = after_step(callback, k - 1, model_t[k - 1], x_p)
                break
            d = predict_x0(x_p, k)  # evaluate
            x = step(x, k, [(d, k), hist[0]], z)  # corrector
            hist = [(d, k), hist[0]]
            x, stop = after_step(callback, k - 1, model_t[k - 1], x)
            if stop:
                break
        return x
