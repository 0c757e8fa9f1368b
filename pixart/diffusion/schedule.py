"""The one noise schedule every sampler and the training loss share.

PixArt trains with DDPM's linear betas (1e-4 .. 0.02 over 1000 steps). Everything here is float64 NumPy on the
host; tensor-facing helpers turn a per-step value into a Python float (sampling: one step for the whole batch) or
gather it per sample (training: a (B,) tensor of timesteps), so the device only sees elementwise ops.

Two views of the same schedule:
- discrete (DDPM / IDDPM / DDIM / the training loss): per-step arrays indexed by t in 0..N-1;
- continuous VP time (DPM-Solver, SA-Solver, as the official NoiseScheduleVP('discrete')): step n sits at
  t = (n + 1) / N, and log(alpha_t) is piecewise linear in t between those points.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM's linear schedule; IDDPM's "linear" scales the ends by 1000/N so other step counts stay comparable."""
    scale = 1000 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def _interp(x, xp, fp):
    """Piecewise-linear f(x) through (xp, fp), xp increasing, extended linearly beyond both ends
    (as the official interpolate_fn; np.interp would clamp instead)."""
    x = np.asarray(x, np.float64)
    i = np.clip(np.searchsorted(xp, x), 1, len(xp) - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseSchedule:
    """Per-step quantities of a DDPM forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""

    def __init__(self, betas):
        b = np.asarray(betas, np.float64)
        assert b.ndim == 1 and (b > 0).all() and (b <= 1).all()
        self.num_timesteps = len(b)
        self.betas = b
        self.alphas_cumprod = ac = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.log_snr = 0.5 * np.log(ac / (1.0 - ac))  # lambda_t = log(alpha_t / sigma_t), DPM-Solver's notation
        # posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t=0, so the log is clipped to the t=1 value there
        self.posterior_variance = pv = b * (1.0 - acp) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(b) > 1 else np.zeros(0)
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)
        # continuous time: step n at t = (n + 1) / N, with log(alpha) = 0.5 * log(abar)
        self.t_array = np.linspace(0.0, 1.0, len(b) + 1)[1:]
        self.log_alpha_array = 0.5 * np.cumsum(np.log(1.0 - b))
        # The official solver drops the tail where lambda < -5.1 (matters for cosine schedules); with the linear
        # schedule the smallest lambda is about -5.06, so nothing is dropped and we do not implement it.

    # ---- continuous-time VP helpers (DPM-Solver / SA-Solver); t in [1/N, 1], float or array -------------------
    def marginal_log_mean_coeff(self, t):
        return _interp(t, self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t):
        return np.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return np.sqrt(-np.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lamb):
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lamb, np.float64))
        return _interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

    def model_time(self, t):
        """Continuous t in [1/N, 1] -> the discrete model timestep in [0, N-1] units of 1000 (official wrapper)."""
        return (np.asarray(t, np.float64) - 1.0 / self.num_timesteps) * 1000.0

    # ---- tensor side (sampling: int t; training: (B,) integer Tensor t) ---------------------------------------
    def at(self, arr: np.ndarray, t, ndim: int = 4):
        """arr[t] as a Python float (int t) or as a (B, 1, ..., 1) float32 Tensor (Tensor t)."""
        if isinstance(t, (int, np.integer)):
            return float(arr[int(t)])
        vals = ops.gather(Tensor(arr.astype(np.float32)), t.astype(ms.int32), 0)
        return vals.reshape((-1,) + (1,) * (ndim - 1))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        nd = x0.ndim
        return (self.at(self.sqrt_alphas_cumprod, t, nd) * x0
                + self.at(self.sqrt_one_minus_alphas_cumprod, t, nd) * noise)

    def predict_x0_from_eps(self, x_t, t, eps):
        nd = x_t.ndim
        return (self.at(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
                - self.at(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (the VB target)."""
        nd = x_t.ndim
        mean = self.at(self.posterior_mean_coef1, t, nd) * x0 + self.at(self.posterior_mean_coef2, t, nd) * x_t
        return mean, self.at(self.posterior_log_variance_clipped, t, nd)

    def learned_range_log_variance(self, v, t):
        """IDDPM's learned range: v in [-1, 1] interpolates log-variance between the posterior's and log(beta_t)."""
        nd = v.ndim
        frac = (v + 1.0) * 0.5
        max_log, min_log = self.at(self.log_betas, t, nd), self.at(self.posterior_log_variance_clipped, t, nd)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model_out, x_t, t):
        """p(x_{t-1} | x_t) from a (B, 2C) [eps, v] output: (mean, log_variance, pred_x0); no clipping of x_0
        (PixArt samples latents with clip_denoised=False)."""
        c = x_t.shape[1]
        eps, v = model_out[:, :c], model_out[:, c:]
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        mean, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return mean, self.learned_range_log_variance(v, t), pred_x0


@lru_cache(maxsize=None)
def default_schedule() -> NoiseSchedule:
    """PixArt's training schedule: 1000 linear betas 1e-4 .. 0.02."""
    return NoiseSchedule(linear_betas(NUM_TRAIN_TIMESTEPS))


def q_sample(x0, t, noise, schedule: NoiseSchedule | None = None):
    """Diffuse x0 to timestep t (int or (B,) integer Tensor) with the given noise."""
    return (schedule or default_schedule()).q_sample(x0, t, noise)
