"""The self-check's fixed models and inputs: small configurations of every architecture we ship, and weights and
inputs that are the same numbers on every machine.

Numbers come from a counter-based integer hash (splitmix64 of seed and index), turned into floats by exact integer
arithmetic: no random-number library, no transcendental function, so NumPy's version and the CPU cannot change a
single bit. Both sides use them: `pixart.selfcheck.checks` (this port, on the device) and
`tools/make_selfcheck_refs.py` (the PyTorch references, stored once in tests/data/selfcheck/).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from pixart.models.pixart import KVCompression, PixArtConfig, preset_config

REFERENCES = Path(__file__).resolve().parents[2] / "tests" / "data" / "selfcheck" / "references.npz"

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def uniform(shape, seed: int) -> np.ndarray:
    """float64 values in [-1, 1) of `shape`, a pure function of (shape, seed), bit-identical everywhere."""
    n = int(np.prod(shape, dtype=np.int64))
    z = np.arange(n, dtype=np.uint64) + np.uint64((seed * _GOLDEN) & _MASK64)
    z = z + np.uint64(_GOLDEN)  # splitmix64 (uint64 arithmetic wraps)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    top = (z >> np.uint64(40)).astype(np.float64)  # 24 bits: exact in float32 too
    return (top / float(1 << 23) - 1.0).reshape(shape)


def array(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    """float32 inputs of unit variance (uniform on [-sqrt 3, sqrt 3)) times `scale`."""
    return (uniform(shape, seed) * (np.sqrt(3.0) * scale)).astype(np.float32)


def weights(shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    """Fixed float32 weights for parameters by name: matrices and kernels uniform with variance 1 / fan-in (outputs
    keep unit scale through the layers), norm scales 1 +- 0.2, other vectors (biases) +- 0.1."""
    out = {}
    for name, shape in sorted(shapes.items()):
        shape = tuple(int(s) for s in shape)
        u = uniform(shape, seed * 1_000_003 + zlib.crc32(name.encode()))
        if len(shape) >= 2:
            value = u * np.sqrt(3.0 / int(np.prod(shape[1:])))
        elif "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.2 * u
        else:
            value = 0.1 * u
        out[name] = value.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Small configurations: the presets' layout (position embedding, caption length, micro-conditions, KV compression)
# at depth 2, width 96 (6 heads of 16; a third of it for the size embedders), 32 caption channels, 8 tokens.
# ---------------------------------------------------------------------------------------------------------------
SMALL = dict(depth=2, hidden_size=96, num_heads=6, caption_channels=32, model_max_length=8)
PIXART_PRESETS = {
    "alpha": "PixArt-XL-2-256x256",
    "alpha-1024": "PixArt-XL-2-1024-MS",
    "sigma": "PixArt-Sigma-XL-2-1024-MS",
    "sigma-kv": "PixArt-Sigma-XL-2-1024-MS-KV",
}
LATENT_HW = (8, 12)  # a 64 x 96 image: a 4 x 6 token grid (2 x 3 after KV compression)
BATCH = 2


def pixart_config(name: str) -> PixArtConfig:
    """The small PixArt config of check `name` (a key of PIXART_PRESETS)."""
    extra = {"kv_compress_config": KVCompression("conv", 2, (1,))} if name == "sigma-kv" else {}
    return preset_config(PIXART_PRESETS[name], **SMALL, **extra)


def diffusers_kwargs(cfg: PixArtConfig) -> dict:
    """The config's diffusers `PixArtTransformer2DModel` options that differ between presets."""
    return dict(sample_size=cfg.input_size, interpolation_scale=cfg.pe_interpolation,
                use_additional_conditions=cfg.micro_condition)


def pixart_inputs(cfg: PixArtConfig, seed: int = 1) -> dict[str, np.ndarray]:
    """Latents (N, 4, 8, 12), timesteps, caption features (N, 1, L, C) (the second caption padded after 5 tokens),
    mask (N, L) int32 and, for micro-conditioned models, img_hw and aspect_ratio."""
    h, w = LATENT_HW
    length = cfg.model_max_length
    mask = np.ones((BATCH, length), np.int32)
    mask[1, 5:] = 0
    out = dict(x=array((BATCH, cfg.in_channels, h, w), seed), t=np.array([999.0, 37.0], np.float32),
               y=array((BATCH, 1, length, cfg.caption_channels), seed + 1), mask=mask)
    if cfg.micro_condition:
        out["img_hw"] = np.array([[h * 8, w * 8]] * BATCH, np.float32)
        out["aspect_ratio"] = np.array([[h / w]] * BATCH, np.float32)
    return out


LORA = dict(rank=4, alpha=8.0)  # on the α model's default targets (every linear layer of the blocks)

T5 = dict(vocab_size=200, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
          model_type="t5", architectures=["T5EncoderModel"])


def t5_inputs() -> dict[str, np.ndarray]:
    """Token ids (3, 24) int32 (pad id 0 after 24, 13 and 6 tokens) and the mask."""
    lengths, n = (24, 13, 6), 24
    mask = (np.arange(n)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = (3 + np.floor((uniform((len(lengths), n), 7) + 1) / 2 * (T5["vocab_size"] - 3))).astype(np.int32)
    return dict(ids=ids * mask, mask=mask)


# the SD VAE's and the SDXL VAE's config.json fields (scaling factor, upcast) at small widths
VAES = {
    "vae-sd": dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=4,
                   sample_size=32, scaling_factor=0.18215),
    "vae-sdxl": dict(block_out_channels=[32, 32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=4,
                     sample_size=32, scaling_factor=0.13025, force_upcast=True),
}


def vae_config(name: str) -> dict:
    n = len(VAES[name]["block_out_channels"])
    return dict(VAES[name], _class_name="AutoencoderKL", in_channels=3, out_channels=3, act_fn="silu",
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def vae_inputs(name: str) -> dict[str, np.ndarray]:
    """An image (1, 3, 32, 32) in [-1, 1) and latents (1, 4, h, w) for the decoder."""
    f = 2 ** (len(VAES[name]["block_out_channels"]) - 1)
    return dict(image=uniform((1, 3, 32, 32), 11).astype(np.float32), z=array((1, 4, 32 // f, 24 // f), 12))


def control_condition() -> np.ndarray:
    """The ControlNet check's condition latents (1, 4, 8, 12), one for the whole batch as the pipeline passes it."""
    return array((1, 4, *LATENT_HW), 31)


# sampler -> steps: each a few steps of the α model (the variance channels matter to IDDPM)
SAMPLER_STEPS = {"dpm": 4, "sa": 4, "iddpm": 4, "ddim": 4, "lcm": 4}
SAMPLER_SEED = 5  # the NumPy generator of the stochastic samplers' noise (SA-Solver, IDDPM, LCM)


def train_inputs(cfg: PixArtConfig) -> dict[str, np.ndarray]:
    """One training batch: x0, t, noise, caption, mask, micro-conditions, caption-drop flags (the second sample
    uses the null caption). No t = 0: its decoder NLL is a difference of two nearly equal CDFs, which fp32 keeps to a
    few digits only, differently on every backend."""
    base = pixart_inputs(cfg, seed=21)
    return dict(x0=base["x"], t=np.array([10, 600], np.int32), noise=array(base["x"].shape, 23), y=base["y"],
                mask=base["mask"], img_hw=np.array([[64, 96]] * BATCH, np.float32),
                aspect_ratio=np.array([[8 / 12]] * BATCH, np.float32), drop=np.array([0, 1], np.int32))


# The training step runs AdamW with eps far above every gradient and no weight decay, so that its first update is
# lr * g / (|g| + eps): linear in the gradient, which the check then compares (plain Adam's first update is about
# lr * sign(g), blind to the gradient's size). Compared: the loss, and every parameter's update at fixed strided
# positions (up to SAMPLED_UPDATES per parameter, to keep the stored references small).
TRAIN_OPTIMIZER = dict(lr=1e3, betas=(0.9, 0.999), eps=1e3, weight_decay=0.0)
SAMPLED_UPDATES = 64


def sampled(values: np.ndarray) -> np.ndarray:
    """The fixed strided positions of a flattened parameter that the training check compares."""
    flat = np.asarray(values).reshape(-1)
    idx = np.unique(np.linspace(0, flat.size - 1, min(flat.size, SAMPLED_UPDATES)).round().astype(np.int64))
    return flat[idx]
