"""The embedded demo bundle: a tiny, untrained PixArt-Σ-256 with a tiny T5 (tokenizer trained on the fly) and a tiny
VAE, written in exactly the on-disk layout of the real checkpoints, so sampling runs offline through the same
loading code. Its images are noise: it proves the plumbing, not the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pixart import backend
from pixart.io import write_safetensors
from pixart.models.convert import save_pixart
from pixart.models.pixart import PixArt, preset_config
from pixart.models.t5 import T5Config, T5EncoderModel, make_tiny_tokenizer
from pixart.models.vae import AutoencoderKL, VAEConfig

PRESET = "PixArt-Sigma-XL-2-256x256"
ROOT = Path("models/demo")
CHECKPOINT = f"{PRESET}-demo.ckpt"
COMPONENTS = "pixart_sigma_sdxlvae_T5_diffusers"  # the folder name of the real Σ T5 + SDXL-VAE bundle

T5_CONFIG = dict(architectures=["T5EncoderModel"], model_type="t5", d_model=64, d_kv=32, d_ff=128, num_layers=2,
                 num_heads=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE_CONFIG = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
                  block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  act_fn="silu", scaling_factor=0.13025, sample_size=256, force_upcast=True)
PIXART_SHRINK = dict(depth=2, hidden_size=144, num_heads=2)  # head width 72, as the real model


def _random_state(cell, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in cell.get_parameters():
        shape = tuple(p.shape)
        if p.name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layer_norm.weight", "norm_out.weight")):
            out[p.name] = np.ones(shape, np.float32)
        elif len(shape) <= 1:
            out[p.name] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            out[p.name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


def is_built(root=ROOT) -> bool:
    root = Path(root)
    return all((root / p).exists() for p in (CHECKPOINT, f"{COMPONENTS}/vae/config.json",
                                            f"{COMPONENTS}/text_encoder/config.json", f"{COMPONENTS}/tokenizer"))


def build(root=ROOT, log=print) -> Path:
    """Write the bundle under `root` (seconds). Deterministic: the same files every time."""
    root = Path(root)
    if backend.device_target() != "CPU":
        backend.setup("CPU")
    comp = root / COMPONENTS
    tok = make_tiny_tokenizer(comp / "tokenizer", vocab_size=256)
    vocab = spm.SentencePieceProcessor(model_file=str(tok / "spiece.model")).get_piece_size()

    t5_cfg = dict(T5_CONFIG, vocab_size=vocab)
    t5 = T5EncoderModel(T5Config.from_dict(t5_cfg))
    (comp / "text_encoder").mkdir(parents=True, exist_ok=True)
    (comp / "text_encoder" / "config.json").write_text(json.dumps(t5_cfg, indent=2))
    write_safetensors(_random_state(t5, 1), comp / "text_encoder" / "model.safetensors", {"format": "pt"})

    vae = AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG))
    (comp / "vae").mkdir(parents=True, exist_ok=True)
    (comp / "vae" / "config.json").write_text(json.dumps(VAE_CONFIG, indent=2))
    write_safetensors(_random_state(vae, 2), comp / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})

    cfg = preset_config(PRESET, caption_channels=T5_CONFIG["d_model"], **PIXART_SHRINK)
    state = _random_state(PixArt(cfg), 3)
    state["y_embedder.y_embedding"] = (np.random.default_rng(4).standard_normal(
        (cfg.model_max_length, cfg.caption_channels)) / cfg.caption_channels ** 0.5).astype(np.float32)
    save_pixart(state, cfg, root / CHECKPOINT, PRESET)
    log(f"demo bundle written to {root} (untrained: its images are noise)")
    return root
