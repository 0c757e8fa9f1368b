"""Diffusion schedule and samplers.

Every sampler: `sampler.sample(model_fn, x_T, num_steps=None, progress=True, generator=None) -> x_0` and
`sampler.timesteps(num_steps=None)` (the model timesteps it will call, in order); `sample(..., callback=f)` calls
`f(k, t, x) -> (x, stop)` after each step k (see `common.after_step`), where
`model_fn(x, t) -> out`, x (B, C, H, W) float32, t (B,) float32 in 0..999 units, out (B, C, ...) eps or
(B, 2C, ...) [eps, v] (needed by "iddpm"; the others take the first C channels).
"""
from .ddim import DDIMSampler
from .dpm_solver import DPMSolver
from .iddpm import IDDPMSampler, space_timesteps
from .sa_solver import SASolver
from .schedule import NoiseSchedule, default_schedule, linear_betas, q_sample

SAMPLERS = {"dpm": DPMSolver, "iddpm": IDDPMSampler, "ddim": DDIMSampler, "sa": SASolver}
DEFAULT_STEPS = {name: cls.DEFAULT_STEPS for name, cls in SAMPLERS.items()}


def make_sampler(name: str, **options):
    """A sampler by name ("dpm", "iddpm", "ddim", "sa"); options go to its constructor."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**options)


__all__ = ["DDIMSampler", "DPMSolver", "IDDPMSampler", "SASolver", "NoiseSchedule", "default_schedule",
           "linear_betas", "q_sample", "space_timesteps", "SAMPLERS", "DEFAULT_STEPS", "make_sampler"]
