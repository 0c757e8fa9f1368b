"""IDDPM ancestral sampling (Nichol & Dhariwal 2021) with timestep respacing and learned-range variance,
as PixArt's IDDPM(str(steps)).p_sample_loop(..., clip_denoised=False) runs it.

Respacing keeps a subset of the 1000 training steps and rebuilds betas from the kept alphas_cumprod
(beta'_i = 1 - abar[k_i] / abar[k_{i-1}]), so the short chain has the same marginals. The model outputs
[eps, v] (2C channels); v in [-1, 1] picks the log-variance between the respaced posterior's and log beta'_i.
The model is called with the ORIGINAL timestep k_i (the official _WrappedModel, rescale_timesteps=False).
"""
from __future__ import annotations

import numpy as np
from mindspore import ops

from .common import after_step, as_float32, call_model, randn_like, steps_iter
from .schedule import NoiseSchedule, default_schedule

DEFAULT_STEPS = 100


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Sorted original steps to keep: `section_counts` ("100", "10,15,20", [10, 15, 20] or "ddimN") gives the
    step count for each equal portion of the chain, evenly strided (rounded) within it."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):  # DDIM's fixed integer stride, one section
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):  # accumulate like the reference so .5 ties round identically
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respaced_schedule(base: NoiseSchedule, kept: list[int]) -> NoiseSchedule:
    ac = base.alphas_cumprod[np.asarray(kept)]
    return NoiseSchedule(1.0 - ac / np.append(1.0, ac[:-1]))


class IDDPMSampler:
    name = "iddpm"
    DEFAULT_STEPS = DEFAULT_STEPS
    CUSTOM_TIMESTEPS = False  # the respacing is set by section counts, as the official IDDPM(str(steps))

    def __init__(self, noise_schedule: NoiseSchedule | None = None):
        self.base = noise_schedule or default_schedule()

    def respace(self, num_steps: int | None = None):
        """(kept original timesteps ascending, the respaced NoiseSchedule)."""
        kept = space_timesteps(self.base.num_timesteps, str(num_steps or DEFAULT_STEPS))
        return kept, respaced_schedule(self.base, kept)

    def timesteps(self, num_steps: int | None = None) -> np.ndarray:
        """Original model timesteps in call order (high to low)."""
        return np.asarray(self.respace(num_steps)[0][::-1], np.int64)

    def noise_levels(self, num_steps: int | None = None):
        """(alpha, sigma) of x before each step and, last, after the final one (1, 0)."""
        ac = self.base.alphas_cumprod[self.timesteps(num_steps)]
        return np.append(np.sqrt(ac), 1.0), np.append(np.sqrt(1.0 - ac), 0.0)

    def sample(self, model_fn, x_T, num_steps: int | None = None, progress: bool = True, generator=None,
               callback=None, start: int = 0):
        """x_{i-1} = mean + exp(0.5 log_var) z for respaced i > 0, the mean alone at i = 0. `generator` (a NumPy
        Generator) gives one draw of x's shape per step except the last. `start` skips the first steps (x_T is
        then x at timesteps()[start])."""
        kept, ns = self.respace(num_steps)
        x = as_float32(x_T)
        for i in steps_iter(range(len(kept) - 1 - start, -1, -1), progress, "IDDPM"):  # respaced index, high to low
            out = call_model(model_fn, x, kept[i])  # the ORIGINAL timestep, as _WrappedModel maps it
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"IDDPM needs a learned-sigma model output of {2 * x.shape[1]} channels, "
                                 f"got {out.shape[1]}")
            mean, log_var, _ = ns.p_mean_variance(out, x, i)
            x = mean + ops.exp(0.5 * log_var) * randn_like(x, generator) if i > 0 else mean
            x, stop = after_step(callback, len(kept) - 1 - i, kept[i], x)
            if stop:
                break
        return x
