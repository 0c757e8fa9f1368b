"""DPM-Solver++(2M): multistep, second order, data prediction from an epsilon model (Lu et al. 2022).

In half-log-SNR lambda = log(alpha / sigma), with D = (x - sigma * eps) / alpha the predicted x_0, one step from
node s to node t (h = lambda_t - lambda_s, r = h_prev / h) is

    x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) [D_s + (D_s - D_prev) / (2 r)]

with the bracket's second term dropped (first order) on the first step (no history yet) and, below
`LOWER_ORDER_FINAL_BELOW` steps, on the last step too (the official solver's lower_order_final rule, which keeps
few-step sampling stable). Two node placements:

- schedule="linspace" (default): diffusers' DPMSolverMultistepScheduler (linear betas, timestep_spacing="linspace",
  final_sigmas_type="zero"): integer timesteps round(linspace(999, 0, N + 1))[:-1]; the last step goes to sigma = 0,
  where the update reduces to x_0 = D.
- schedule="time_uniform": the official repos' continuous DPM_Solver(algorithm_type="dpmsolver++") with
  skip_type="time_uniform", method="multistep", order 2 (PixArt's scripts/inference.py): t uniform from 1 to 1/N,
  alpha/sigma from the continuous-time VP schedule, the model called at (t - 1/N) * 1000, and the result is x at
  t = 1/N (the official sampler does not denoise to zero).

Custom timesteps (`timesteps=[...]`, linspace only, as diffusers' `set_timesteps(timesteps=...)`): the nodes are
those integer timesteps, then sigma = 0. One step at t is then x_0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),
the one-step generator of PixArt-Alpha-DMD at t = 400.
"""
from __future__ import annotations

import numpy as np

from .common import after_step, as_float32, call_eps, check_distinct, check_timesteps, steps_iter
from .schedule import NoiseSchedule, default_schedule

DEFAULT_STEPS = 20
SCHEDULES = ("linspace", "time_uniform")
LOWER_ORDER_FINAL_BELOW = 10  # the official DPM_Solver.sample: `lower_order_final and steps < 10`


class DPMSolver:
    name = "dpm"
    DEFAULT_STEPS = DEFAULT_STEPS
    CUSTOM_TIMESTEPS = True

    def __init__(self, schedule: str = "linspace", timesteps=None, noise_schedule: NoiseSchedule | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"DPM-Solver schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.ns = noise_schedule or default_schedule()
        if timesteps is not None and schedule != "linspace":
            raise ValueError(f"dpm: custom timesteps need the linspace schedule, not {schedule!r}")
        self.custom = None if timesteps is None else check_timesteps(timesteps, self.ns.num_timesteps, self.name)

    def _nodes(self, n: int):
        """Model timesteps (n,) and alpha, sigma, lambda at the n + 1 solver nodes, float64."""
        ns = self.ns
        if self.custom is not None:
            ts = self.custom
        elif self.schedule == "linspace":
            ts = np.linspace(0, ns.num_timesteps - 1, n + 1).round()[::-1][:-1].astype(np.int64)
            check_distinct(ts, self.name, n, ns.num_timesteps - 1)
        if self.schedule == "linspace":
            ac = ns.alphas_cumprod[ts]
            alpha = np.append(np.sqrt(ac), 1.0)  # final node: sigma = 0 (clean data)
            sigma = np.append(np.sqrt(1.0 - ac), 0.0)
            with np.errstate(divide="ignore"):
                lam = np.log(alpha) - np.log(sigma)  # +inf at the final node
            return ts.astype(np.float64), alpha, sigma, lam
        t = np.linspace(1.0, 1.0 / ns.num_timesteps, n + 1)
        return ns.model_time(t[:-1]), ns.marginal_alpha(t), ns.marginal_std(t), ns.marginal_lambda(t)

    def timesteps(self, num_steps: int | None = None) -> np.ndarray:
        """The model timesteps (0..999 units) that sample() calls the model at, in order."""
        return self._nodes(self._count(num_steps))[0]

    def noise_levels(self, num_steps: int | None = None):
        """(alpha, sigma) of x before each step and, last, after the final one (1, 0)."""
        _, alpha, sigma, _ = self._nodes(self._count(num_steps))
        return np.append(alpha[:-1], 1.0), np.append(sigma[:-1], 0.0)

    def _count(self, num_steps):
        return len(self.custom) if self.custom is not None else num_steps or DEFAULT_STEPS

    def sample(self, model_fn, x_T, num_steps: int | None = None, progress: bool = True, generator=None,
               callback=None, start: int = 0):
        """Deterministic; `generator` is accepted for a uniform signature and unused. `start` skips the first steps
        (x_T is then x at node `start`); the multistep history starts afresh there, at first order."""
        n = self._count(num_steps)
        model_t, alpha, sigma, lam = self._nodes(n)
        x, d_prev = as_float32(x_T), None
        for k in steps_iter(range(start, n), progress, "DPM-Solver++"):
            eps = call_eps(model_fn, x, model_t[k])
            d = x * float(1.0 / alpha[k]) - eps * float(sigma[k] / alpha[k])  # predicted x_0
            if sigma[k + 1] == 0.0:  # diffusers' final_sigmas_type="zero": the step lands on x_0 itself
                x = d
            else:
                h = lam[k + 1] - lam[k]
                phi = np.expm1(-h)
                x = x * float(sigma[k + 1] / sigma[k]) - d * float(alpha[k + 1] * phi)
                if k > start and not (k == n - 1 and n < LOWER_ORDER_FINAL_BELOW):  # second order
                    r = (lam[k] - lam[k - 1]) / h
                    x = x - (d - d_prev) * float(0.5 * alpha[k + 1] * phi / r)
            d_prev = d
            x, stop = after_step(callback, k, model_t[k], x)
            if stop:
                break
        return x
