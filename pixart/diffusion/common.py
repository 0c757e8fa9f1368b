"""What every sampler shares: calling the model, drawing host noise, the progress bar."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor
from tqdm.auto import tqdm


def call_model(model_fn, x: Tensor, t: float) -> Tensor:
    """model_fn(x, t) with t as a (B,) float32 tensor in model-timestep units (0..999)."""
    return model_fn(x, Tensor(np.full((x.shape[0],), t, np.float32)))


def call_eps(model_fn, x: Tensor, t: float) -> Tensor:
    """The predicted noise: the first C channels, so a learned-sigma (2C) model serves every sampler."""
    out = call_model(model_fn, x, t)
    c = x.shape[1]
    return out[:, :c] if out.shape[1] == 2 * c else out


def randn_like(x: Tensor, generator: np.random.Generator | None) -> Tensor:
    """Standard normal noise drawn on the host (MindSpore CPU lacks mint.randn) from a seeded NumPy Generator."""
    g = generator if generator is not None else np.random.default_rng()
    return Tensor(g.standard_normal(tuple(x.shape), dtype=np.float32)).astype(x.dtype)


def steps_iter(steps, progress: bool, desc: str):
    """A tqdm bar over `steps` (an int n means range(n)), silent unless progress."""
    return tqdm(range(steps) if isinstance(steps, int) else steps, desc=desc, disable=not progress, leave=False)


def after_step(callback, k: int, t, x: Tensor) -> tuple[Tensor, bool]:
    """(latents, stop) after step k at model timestep t: `callback(k, t, x) -> (x, stop)` may replace the latents
    and end the loop early (the pipeline's `callback_on_step_end`); without one, (x, False)."""
    if callback is None:
        return x, False
    x, stop = callback(k, float(t), x)
    return as_float32(x), bool(stop)


def as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def check_timesteps(timesteps, num_train_timesteps: int, sampler: str) -> np.ndarray:
    """A custom schedule as int64: whole numbers in [0, num_train_timesteps - 1], strictly decreasing (so none
    repeats); ValueError naming the sampler and the first bad value."""
    values = list(np.asarray(timesteps, dtype=object).reshape(-1))
    if not values:
        raise ValueError(f"{sampler}: timesteps is empty; give at least one, e.g. [400]")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{sampler}: timesteps must be whole numbers, got {v!r}") from None
        if not np.isfinite(f) or f != int(f):
            raise ValueError(f"{sampler}: timesteps must be whole numbers, got {v!r}")
        if not 0 <= f <= num_train_timesteps - 1:
            raise ValueError(f"{sampler}: timestep {int(f)} is out of range; each must be in 0..{num_train_timesteps - 1}")
        out.append(int(f))
    for a, b in zip(out, out[1:]):
        if b >= a:
            raise ValueError(f"{sampler}: timesteps must be strictly decreasing (no repeats), got {a} then {b}")
    return np.asarray(out, np.int64)


def check_distinct(ts, sampler: str, num_steps: int, most: int) -> None:
    """Refuse a schedule whose timesteps repeat (too many steps for the grid): the repeated step would divide by a
    zero step size and turn the image black."""
    if len(ts) > 1 and (np.diff(np.asarray(ts, np.float64)) >= 0).any():
        raise ValueError(f"{sampler}: {num_steps} steps repeat timesteps; use at most {most} steps")


def timesteps_list(value) -> list[int] | None:
    """A custom schedule as written in a flag or config ("999,500", 400, or a list) -> [999, 500]; None when empty.
    Range and order are the sampler's to check (`check_timesteps`)."""
    if value is None or value == "" or value == []:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        return [int(str(v)) for v in items]
    except ValueError:
        raise ValueError(f"timesteps must be comma-separated whole numbers, e.g. 999,500 or 400; got {value!r}") \
            from None
