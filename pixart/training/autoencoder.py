"""Training an `AutoencoderKL` from scratch: reconstruction (mean absolute plus mean squared error) plus a small KL
term towards the standard normal, Adam on random crops. Small enough for the demo's tiny VAE on a CPU; the
architecture is the full SD / SDXL one, so the trained weights load wherever a real VAE does.

Training is resumable in chunks: every step's crops and noise are drawn from (seed, step) alone and the learning
rate is constant, so a run stopped after `stop_after` seconds and continued from its state file (the weights,
Adam's moments and step count, the step reached) repeats an uninterrupted run bit for bit. The rate stays constant
because a PyNative `TrainOneStepCell` keeps the optimizer's rate from its first call: setting it between steps
changes nothing in an uninterrupted run, and in a resumed one freezes a different value.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
from mindspore import Tensor, nn, ops

from pixart.io import read_safetensors, write_safetensors
from pixart.models.vae import AutoencoderKL


class _Loss(nn.Cell):
    """Image x in [-1, 1] and noise -> L1 + MSE(decode(sample), x) + kl_weight * KL(q(z|x) || N(0, 1)) per latent
    element. The L1 term keeps flat colours flat and edges sharp, where MSE alone settles for a blur."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def construct(self, x, noise):
        vae = self.vae  # the fp32 graph of encode / decode, spelled out (graph mode calls no properties)
        m = vae.quant_conv(vae.encoder(x))
        mean, logvar = m[:, :vae.latent_channels], ops.clamp(m[:, vae.latent_channels:], -30.0, 20.0)
        rec = vae.decoder(vae.post_quant_conv(mean + ops.exp(0.5 * logvar) * noise))
        err = rec - x
        kl = 0.5 * (mean ** 2 + ops.exp(logvar) - 1.0 - logvar).mean()
        return ops.abs(err).mean() + (err ** 2).mean() + self.kl_weight * kl


def to_model(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def psnr(vae: AutoencoderKL, images: list[np.ndarray]) -> float:
    """Mean PSNR (dB, 8-bit scale) of encode-mean -> decode over uint8 (H, W, 3) images, each alone."""
    values = []
    for im in images:
        x = Tensor(to_model(im[None]))
        mean, _ = vae.encode(x)
        rec = np.clip(vae.decode(mean).asnumpy(), -1, 1)
        mse = float(((np.round((rec + 1) * 127.5) - to_model(im[None]) * 127.5 - 127.5) ** 2).mean())
        values.append(10 * math.log10(255 ** 2 / max(mse, 1e-10)))
    return float(np.mean(values))


def _batch(images: list[np.ndarray], seed: int, step: int, batch_size: int, crop: int, latent_shape):
    """The crops and posterior noise of one step: a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    crops = []
    for k in rng.integers(len(images), size=batch_size):
        im = images[k]
        y, x = rng.integers(im.shape[0] - crop + 1), rng.integers(im.shape[1] - crop + 1)
        crops.append(im[y:y + crop, x:x + crop])
    noise = rng.standard_normal((batch_size, *latent_shape)).astype(np.float32)
    return to_model(np.stack(crops)), noise


def train_autoencoder(vae: AutoencoderKL, images: list[np.ndarray], steps: int, batch_size: int = 8, crop: int = 64,
                      learning_rate: float = 2e-3, kl_weight: float = 1e-5, seed: int = 0,
                      log: Callable[[str], None] = print, log_every: int = 50, decoder_only: bool = False,
                      state_file=None, stop_after: float | None = None) -> int:
    """Train `vae` in place on random `crop` x `crop` windows of `images` (uint8 (H, W, 3), each at least `crop`
    on both sides), Adam at the constant `learning_rate`. `decoder_only`: the encoder (and so
    every latent) stays as it is, only `post_quant_conv` and the decoder learn.

    `state_file` (.safetensors): where training continues from if it exists, and where it is saved when it stops;
    `stop_after`: stop after this many seconds (at a step boundary). Returns the number of steps done in all."""
    names = [p.name for p in vae.get_parameters()]  # wrapping prefixes them ("vae."): restored at the end
    params = vae.trainable_params()
    if decoder_only:
        params = [p for p in params if not p.name.startswith(("encoder.", "quant_conv."))]
    optimizer = nn.Adam(params, learning_rate=learning_rate)
    step = nn.TrainOneStepCell(_Loss(vae, kl_weight), optimizer)
    state = {f"p{i}": p for i, p in enumerate(step.get_parameters())}  # weights and Adam's moments, in cell order
    start = 0
    if state_file is not None and Path(state_file).exists():
        saved = read_safetensors(state_file)
        for key, p in state.items():
            p.set_data(Tensor(saved[key], dtype=p.dtype))  # built in its dtype: a cast one can corrupt the heap
        start = int(np.asarray(saved["step"]).reshape(-1)[0])  # stored as a one-element array
        log(f"vae: resumed at step {start} from {state_file}")
    step.set_train()
    f = vae.downsample_factor
    latent_shape = (vae.latent_channels, crop // f, crop // f)
    losses, t0, i = [], time.time(), start
    while i < steps and (stop_after is None or time.time() - t0 < stop_after):
        x, noise = _batch(images, seed, i, batch_size, crop, latent_shape)
        losses.append(float(step(Tensor(x), Tensor(noise)).asnumpy()))
        i += 1
        if i % log_every == 0 or i == steps:
            log(f"vae step {i}/{steps}: loss {np.mean(losses[-log_every:]):.5f} ({time.time() - t0:.0f} s)")
    step.set_train(False)
    if state_file is not None:
        Path(state_file).parent.mkdir(parents=True, exist_ok=True)
        write_safetensors({**{k: p.asnumpy() for k, p in state.items()}, "step": np.array(i, np.int64)},
                          state_file, {"format": "pt"})
    for p, name in zip(vae.get_parameters(), names):
        p.name = name
    return i
