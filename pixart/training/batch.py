"""Turning one rank's share of a global batch into model inputs, with every random draw reproducible.

Each sample's randomness comes from its own NumPy generator keyed by (seed, global batch index, slot in the global
batch): which caption (real prompt or ShareGPT4V), caption dropout, flip, timestep, diffusion noise and the VAE
posterior draw. Nothing depends on what ran before, so a resumed run repeats an uninterrupted one exactly, and a
sample gets the same draws whether it is trained by one process or by one of several ranks.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pixart.data.buckets import micro_conditions
from pixart.data.features import pad_captions, posterior_latents

SAMPLE_STREAM = 2  # pixart.data.dataset's shuffle uses 1


@dataclass
class Draws:
    real_prompt: bool
    drop: bool
    flip: bool
    t: int
    noise: np.ndarray          # (C, h, w) diffusion noise
    posterior: np.ndarray      # (C, h, w) VAE posterior noise


def sample_draws(seed: int, batch_index: int, slot: int, latent_shape, real_prompt_ratio: float,
                 dropout: float, random_flip: bool, num_timesteps: int, timestep_weights: np.ndarray | None = None,
                 noise_offset: float = 0.0) -> Draws:
    """One sample's draws. `timestep_weights` (num_timesteps,) summing to 1: t is drawn from them (else uniform);
    `noise_offset` > 0: offset noise, a per-channel constant of that spread added to the diffusion noise."""
    rng = np.random.default_rng([seed, SAMPLE_STREAM, batch_index, slot])
    u_prompt, u_drop, u_flip = rng.random(3)
    if timestep_weights is None:
        t = int(rng.integers(0, num_timesteps))
    else:
        t = int(rng.choice(num_timesteps, p=timestep_weights))
    noise = rng.standard_normal(latent_shape, dtype=np.float32)
    posterior = rng.standard_normal(latent_shape, dtype=np.float32)
    if noise_offset:  # drawn last, so the other draws are those of a run without it
        noise += np.float32(noise_offset) * rng.standard_normal((latent_shape[0], 1, 1), dtype=np.float32)
    return Draws(bool(u_prompt < real_prompt_ratio), bool(u_drop < dropout), bool(random_flip and u_flip < 0.5), t,
                 noise, posterior)


def timestep_weights(strategy: str, num_timesteps: int = 1000, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> np.ndarray | None:
    """The training timesteps' sampling weights, as diffusers' `--timestep_bias_strategy`: "later" multiplies
    the weight of the last `portion` of the timesteps (the noisiest) by `multiplier`, "earlier" the first
    `portion`, "range" the timesteps in [begin, end); None for "none" (uniform)."""
    if strategy == "none":
        return None
    weights = np.ones(num_timesteps, np.float64)
    count = int(portion * num_timesteps)
    biased = {"later": slice(num_timesteps - count, None), "earlier": slice(0, count),
              "range": slice(begin, end)}[strategy]
    weights[biased] *= multiplier
    return weights / weights.sum()


class BatchBuilder:
    """BatchRef -> dict of arrays for DiffusionLoss: x0, t, noise, y, mask, img_hw, aspect_ratio, drop.

    Captions and latents come from the FeatureCache where it has them, else from the encoders (on the fly); with
    `workers` > 1 a batch's images are decoded by that many threads (same images, same order).
    """

    def __init__(self, dataset, seed: int, max_length: int, scaling_factor: float, latent_channels: int = 4,
                 vae_factor: int = 8, num_timesteps: int = 1000, real_prompt_ratio: float = 1.0,
                 class_dropout_prob: float = 0.1, random_flip: bool = False, sample_posterior: bool = True,
                 cache=None, text_encoder=None, image_encoder=None, workers: int = 1,
                 timestep_weights: np.ndarray | None = None, noise_offset: float = 0.0):
        self.dataset, self.seed, self.max_length = dataset, seed, max_length
        self.timestep_weights, self.noise_offset = timestep_weights, noise_offset
        self.scaling_factor, self.latent_channels, self.vae_factor = scaling_factor, latent_channels, vae_factor
        self.num_timesteps, self.real_prompt_ratio = num_timesteps, real_prompt_ratio
        self.class_dropout_prob, self.random_flip = class_dropout_prob, random_flip
        self.sample_posterior = sample_posterior
        self.cache, self.text_encoder, self.image_encoder = cache, text_encoder, image_encoder
        self.text_cached = cache is not None and cache.has_text
        self.latents_cached = cache is not None and cache.has_latents
        self.pool = ThreadPoolExecutor(workers) if workers > 1 and not self.latents_cached else None
        if not self.text_cached and text_encoder is None:
            raise ValueError("captions are neither cached nor encodable: give --text_encoder_root or --feature_dir")
        if not self.latents_cached and image_encoder is None:
            raise ValueError("latents are neither cached nor encodable: give --vae_root or --feature_dir")

    def latent_shape(self, entry) -> tuple[int, int, int]:
        h, w = entry.size
        return self.latent_channels, h // self.vae_factor, w // self.vae_factor

    def draws(self, ref) -> list[Draws]:
        """The random draws of each sample of `ref` (the same every time they are asked for)."""
        return [sample_draws(self.seed, ref.index, slot, self.latent_shape(e), self.real_prompt_ratio,
                             self.class_dropout_prob, self.random_flip, self.num_timesteps,
                             self.timestep_weights, self.noise_offset)
                for slot, e in zip(ref.slots, ref.entries)]

    def __call__(self, ref) -> dict[str, np.ndarray]:
        entries = ref.entries
        draws = self.draws(ref)
        captions = [e.prompt if (d.real_prompt or not e.sharegpt4v) else e.sharegpt4v for e, d in zip(entries, draws)]
        if self.text_cached:
            feats = [self.cache.text(c) for c in captions]
        else:
            feats = self.text_encoder(captions)
        y, mask = pad_captions(feats, self.max_length)

        if self.latents_cached:
            moments = [self.cache.latents(e.path, d.flip) for e, d in zip(entries, draws)]
            mean, std = np.stack([m for m, _ in moments]), np.stack([s for _, s in moments])
        else:
            load = lambda pos, d: self.dataset.image(pos, d.flip)[0]  # noqa: E731
            pairs = list(zip(ref.positions, draws))
            images = list(self.pool.map(load, *zip(*pairs))) if self.pool else [load(*pd) for pd in pairs]
            mean, std = self.image_encoder(np.stack(images))
        noise = np.stack([d.posterior for d in draws]) if self.sample_posterior else None
        x0 = posterior_latents(mean, std, noise, self.scaling_factor)

        conds = [micro_conditions(e.height, e.width, e.bucket) for e in entries]
        return dict(
            x0=x0,
            t=np.array([d.t for d in draws], np.int32),
            noise=np.stack([d.noise for d in draws]),
            y=y, mask=mask,
            img_hw=np.stack([hw for hw, _ in conds]).astype(np.float32),
            aspect_ratio=np.array([[ar] for _, ar in conds], np.float32),
            drop=np.array([d.drop for d in draws], np.int32),
        )


BATCH_KEYS = ("x0", "t", "noise", "y", "mask", "img_hw", "aspect_ratio", "drop")
