"""Latent Consistency Model sampling (Luo et al. 2023), as diffusers' LCMScheduler runs PixArt-LCM (linear betas,
epsilon prediction, set_alpha_to_one=True, no clipping).

Timesteps: the distillation schedule is t_j = j * (1000 // K) - 1 for j = 1..K (K = `original_inference_steps`,
50); N steps take it from the top at evenly spaced indices floor(linspace(0, K, N, endpoint=False)). Each step maps
x at t to the consistency function's estimate of x_0 with the boundary-condition scalings (sigma_data = 0.5,
s = t * `timestep_scaling`):

    c_skip = sigma_data^2 / (s^2 + sigma_data^2),   c_out = s / sqrt(s^2 + sigma_data^2)
    denoised = c_out * (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) + c_skip * x

then re-injects fresh noise to the next timestep, x = sqrt(abar_next) denoised + sqrt(1 - abar_next) z, except
after the last step, which returns `denoised`.
"""
from __future__ import annotations

import numpy as np

from .common import after_step, as_float32, call_eps, check_timesteps, randn_like, steps_iter
from .schedule import NoiseSchedule, default_schedule

DEFAULT_STEPS = 4  # PixArt-LCM's model card: 4 steps, no guidance
SIGMA_DATA = 0.5


class LCMSampler:
    name = "lcm"
    DEFAULT_STEPS = DEFAULT_STEPS
    CUSTOM_TIMESTEPS = True

    def __init__(self, original_inference_steps: int = 50, timestep_scaling: float = 10.0, timesteps=None,
                 noise_schedule: NoiseSchedule | None = None):
        self.ns = noise_schedule or default_schedule()
        if not 1 <= int(original_inference_steps) <= self.ns.num_timesteps:
            raise ValueError(f"lcm: original_inference_steps must be between 1 and {self.ns.num_timesteps}, got "
                             f"{original_inference_steps}")
        self.original_steps = int(original_inference_steps)
        self.timestep_scaling = float(timestep_scaling)
        self.custom = None if timesteps is None else check_timesteps(timesteps, self.ns.num_timesteps, self.name)

    def timesteps(self, num_steps: int | None = None) -> np.ndarray:
        if self.custom is not None:
            return self.custom.copy()
        n = num_steps or DEFAULT_STEPS
        if n > self.original_steps:
            raise ValueError(f"lcm: {n} steps is more than original_inference_steps ({self.original_steps}), the "
                             f"distillation schedule they are taken from; use at most {self.original_steps}")
        k = self.ns.num_timesteps // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]
        return origin[np.floor(np.linspace(0, self.original_steps, n, endpoint=False)).astype(np.int64)]

    def noise_levels(self, num_steps: int | None = None):
        """(alpha, sigma) of x before each step and, last, after the final one (1, 0)."""
        ac = self.ns.alphas_cumprod[self.timesteps(num_steps)]
        return np.append(np.sqrt(ac), 1.0), np.append(np.sqrt(1.0 - ac), 0.0)

    def scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep t."""
        s = t * self.timestep_scaling
        return SIGMA_DATA ** 2 / (s * s + SIGMA_DATA ** 2), s / np.sqrt(s * s + SIGMA_DATA ** 2)

    def sample(self, model_fn, x_T, num_steps: int | None = None, progress: bool = True, generator=None,
               callback=None, start: int = 0):
        """`generator` (a NumPy Generator) gives one draw of x's shape after every step but the last; `start`
        skips the first steps (x_T is then x at timesteps()[start])."""
        ts = self.timesteps(num_steps)
        n, ac = len(ts), self.ns.alphas_cumprod
        x = as_float32(x_T)
        for k in steps_iter(range(start, n), progress, "LCM"):
            t = int(ts[k])
            c_skip, c_out = self.scalings(t)
            eps = call_eps(model_fn, x, t)
            x = x * float(c_out / np.sqrt(ac[t]) + c_skip) - eps * float(c_out * np.sqrt((1 - ac[t]) / ac[t]))
            if k < n - 1:
                a_next = ac[int(ts[k + 1])]
                x = x * float(np.sqrt(a_next)) + randn_like(x, generator) * float(np.sqrt(1 - a_next))
            x, stop = after_step(callback, k, t, x)
            if stop:
                break
        return x
