"""Diffusion schedule and samplers.

Every sampler: `sampler.sample(model_fn, x_T, num_steps=None, progress=True, generator=None) -> x_0` and
`sampler.timesteps(num_steps=None)` (the model timesteps it will call, in order); `sample(..., callback=f)` calls
`f(k, t, x) -> (x, stop)` after each step k (see `common.after_step`), where
`model_fn(x, t) -> out`, x (B, C, H, W) float32, t (B,) float32 in 0..999 units, out (B, C, ...) eps or
(B, 2C, ...) [eps, v] (needed by "iddpm"; the others take the first C channels).

Beside that, `sampler.noise_levels(num_steps) -> (alpha, sigma)`: x before step k is alpha[k] x_0 + sigma[k] noise
(k = num_steps: after the last step, (1, 0)); `sample(..., start=k)` begins at step k (image-to-image); samplers
with `CUSTOM_TIMESTEPS` take `timesteps=[...]` (strictly decreasing, in 0..999) in their constructor.
"""
from .ddim import DDIMSampler
from .common import timesteps_list
from .dpm_solver import DPMSolver
from .iddpm import IDDPMSampler, space_timesteps
from .lcm import LCMSampler
from .sa_solver import SASolver
from .schedule import NoiseSchedule, default_schedule, linear_betas, q_sample

SAMPLERS = {"dpm": DPMSolver, "iddpm": IDDPMSampler, "ddim": DDIMSampler, "sa": SASolver, "lcm": LCMSampler}
DEFAULT_STEPS = {name: cls.DEFAULT_STEPS for name, cls in SAMPLERS.items()}


def make_sampler(name: str, **options):
    """A sampler by name ("dpm", "iddpm", "ddim", "sa", "lcm"); options go to its constructor. `timesteps` (a custom
    schedule) is refused, naming the sampler, by those that cannot take one."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if options.get("timesteps") is not None and not SAMPLERS[name].CUSTOM_TIMESTEPS:
        takers = ", ".join(n for n, cls in SAMPLERS.items() if cls.CUSTOM_TIMESTEPS)
        raise ValueError(f"sampler {name!r} cannot take custom timesteps; use one of {takers}")
    options = {k: v for k, v in options.items() if k != "timesteps" or v is not None}
    return SAMPLERS[name](**options)


__all__ = ["DDIMSampler", "DPMSolver", "IDDPMSampler", "LCMSampler", "SASolver", "NoiseSchedule", "default_schedule",
           "linear_betas", "q_sample", "space_timesteps", "timesteps_list", "SAMPLERS", "DEFAULT_STEPS", "make_sampler"]
