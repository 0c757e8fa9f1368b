"""diffusers scheduler configs <-> our samplers: a pipeline folder's `scheduler/scheduler_config.json` picks the
sampler as diffusers' pipeline would, and `save_pretrained` writes the config that makes diffusers sample alike.

Only what our samplers compute exactly is accepted: a setting that would change the result (Karras sigmas, another
beta schedule, v-prediction, clipping) is refused by name with the value that is supported.
"""
from __future__ import annotations

import json
from pathlib import Path

from pixart.diffusion import SAMPLERS

SCHEDULER_CONFIG = "scheduler_config.json"
# the training noise schedule every PixArt checkpoint uses, and settings our samplers share with diffusers'
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "prediction_type": "epsilon", "trained_betas": None, "thresholding": False}
# diffusers class -> (our sampler, settings it must have, where a setting's absence means diffusers' default)
_CLASSES = {
    "DPMSolverMultistepScheduler": ("dpm", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                            "timestep_spacing": "linspace", "use_karras_sigmas": False,
                                            "lower_order_final": True, "final_sigmas_type": "zero",
                                            "steps_offset": 0, "euler_at_final": False,
                                            "use_lu_lambdas": False, "use_exponential_sigmas": False,
                                            "use_beta_sigmas": False, "use_flow_sigmas": False}),
    "DDIMScheduler": ("ddim", {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
                               "clip_sample": False, "rescale_betas_zero_snr": False}),
    "LCMScheduler": ("lcm", {"original_inference_steps": 50, "timestep_scaling": 10.0, "set_alpha_to_one": True,
                             "clip_sample": False, "steps_offset": 0, "rescale_betas_zero_snr": False}),
    "SASolverScheduler": ("sa", {"predictor_order": 2, "corrector_order": 2, "algorithm_type": "data_prediction",
                                 "timestep_spacing": "linspace", "use_karras_sigmas": False}),
}
# diffusers' defaults for the settings above where they differ from what we need to see written
_DIFFUSERS_DEFAULTS = {"DDIMScheduler": {"clip_sample": True},
                       "LCMScheduler": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}}
_SAMPLER_CLASS = {sampler: cls for cls, (sampler, _) in _CLASSES.items()}


def sampler_from_config(config: dict, where="scheduler config") -> str:
    """The sampler name ("dpm", "ddim", "sa", "lcm") a diffusers scheduler config asks for; ValueError naming the class
    or setting we cannot reproduce exactly."""
    cls = config.get("_class_name")
    if cls not in _CLASSES:
        raise ValueError(f"{where}: scheduler {cls!r} is not supported; use one of {', '.join(_CLASSES)}")
    sampler, required = _CLASSES[cls]
    defaults = _DIFFUSERS_DEFAULTS.get(cls, {})
    wrong = []
    for key, want in {**_COMMON, **required}.items():
        value = config.get(key, defaults.get(key, want))
        if key == "prediction_type" and value is None:
            value = "epsilon"
        if value != want and not (isinstance(want, float) and isinstance(value, (int, float))
                                  and abs(value - want) < 1e-12):
            wrong.append(f"{key}={value!r} (supported: {want!r})")
    variance = config.get("variance_type")
    if variance not in (None, "learned_range", "fixed_small"):
        wrong.append(f"variance_type={variance!r} (supported: None, 'learned_range')")
    if wrong:
        raise ValueError(f"{where}: {cls} with " + "; ".join(wrong) + " cannot be reproduced by our samplers")
    return sampler


def read_scheduler(folder) -> str | None:
    """The sampler a pipeline folder's scheduler/ asks for, None without a scheduler config."""
    path = Path(folder) / "scheduler" / SCHEDULER_CONFIG
    if not path.exists():
        return None
    return sampler_from_config(json.loads(path.read_text()), str(path))


def scheduler_config(sampler: str) -> dict:
    """The diffusers scheduler config that samples as our `sampler` does (iddpm has no diffusers twin: its
    pipelines are saved with DPM-Solver, PixArt's default)."""
    cls = _SAMPLER_CLASS.get(sampler, "DPMSolverMultistepScheduler")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return {"_class_name": cls, **_COMMON, **_CLASSES[cls][1], "variance_type": None}


def write_scheduler(folder, sampler: str) -> None:
    path = Path(folder) / "scheduler"
    path.mkdir(parents=True, exist_ok=True)
    (path / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config(sampler), indent=2, sort_keys=True) + "\n")
