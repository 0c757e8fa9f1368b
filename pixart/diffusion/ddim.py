"""DDIM (Song et al. 2021), matching diffusers' DDIMScheduler with linear betas, clip_sample=False,
set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading".

Timesteps are 0, k, 2k, ... (k = 1000 // N) visited high to low; from t to t - k (abar_prev = 1 past 0):

    x_0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - s^2) eps + s z,
    s = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))

eta = 0 is the deterministic ODE sampler; eta = 1 has DDPM's posterior variance.
"""
from __future__ import annotations

import numpy as np

from .common import after_step, as_float32, call_eps, randn_like, steps_iter
from .schedule import NoiseSchedule, default_schedule

DEFAULT_STEPS = 20  # PixArt's inference script has no DDIM; 20 matches the DPM-Solver budget


class DDIMSampler:
    name = "ddim"
    DEFAULT_STEPS = DEFAULT_STEPS
    CUSTOM_TIMESTEPS = False  # diffusers' DDIMScheduler takes none either: its stride is fixed by the step count

    def __init__(self, eta: float = 0.0, noise_schedule: NoiseSchedule | None = None):
        self.eta = float(eta)
        self.ns = noise_schedule or default_schedule()

    def timesteps(self, num_steps: int | None = None) -> np.ndarray:
        n = num_steps or DEFAULT_STEPS
        if n > self.ns.num_timesteps:  # a stride of 0: every step at t = 0
            raise ValueError(f"ddim: {n} steps repeat timesteps; use at most {self.ns.num_timesteps} steps")
        return (np.arange(n) * (self.ns.num_timesteps // n))[::-1].astype(np.int64)

    def noise_levels(self, num_steps: int | None = None):
        """(alpha, sigma) of x before each step and, last, after the final one (1, 0)."""
        ac = self.ns.alphas_cumprod[self.timesteps(num_steps)]
        return np.append(np.sqrt(ac), 1.0), np.append(np.sqrt(1.0 - ac), 0.0)

    def sample(self, model_fn, x_T, num_steps: int | None = None, progress: bool = True, generator=None,
               callback=None, start: int = 0):
        """`generator` (a NumPy Generator) supplies the noise when eta > 0: one draw of x's shape per step.
        `start` skips the first steps (x_T is then x at timesteps()[start])."""
        n = num_steps or DEFAULT_STEPS
        ts = self.timesteps(n)
        ac = self.ns.alphas_cumprod
        stride = self.ns.num_timesteps // n
        x = as_float32(x_T)
        for i in steps_iter(range(start, n), progress, "DDIM"):
            t = int(ts[i])
            a_t = ac[t]
            a_prev = ac[t - stride] if t - stride >= 0 else 1.0
            s = self.eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            eps = call_eps(model_fn, x, t)
            # x_prev written directly in x and eps: sqrt(abar_prev) x_0 expanded
            c_x = np.sqrt(a_prev / a_t)
            c_eps = np.sqrt(1 - a_prev - s * s) - np.sqrt(a_prev * (1 - a_t) / a_t)
            x = x * float(c_x) + eps * float(c_eps)
            if s > 0:
                x = x + randn_like(x, generator) * float(s)
            x, stop = after_step(callback, i, t, x)
            if stop:
                break
        return x
