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
