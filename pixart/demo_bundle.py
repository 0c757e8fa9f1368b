"""The embedded demo bundle: a tiny PixArt-Σ-256 with a tiny T5 (tokenizer trained on the fly) and a tiny VAE, written
in exactly the on-disk layout of the real checkpoints, so sampling runs offline through the same loading code.

The VAE and the transformer are trained on the demo's synthetic world (`pixart.demo_world`: a coloured shape on the
left or right of a coloured background) by `tools/train_demo_world.py`; their weights ship in `pixart/demo_weights/`,
so the bundle draws what its captions ask ("a red circle on the left, black background"). T5 keeps random weights:
the transformer learned from its features. `build(trained=False)` writes the untrained bundle (random weights
everywhere, images of noise), which the training tool starts from.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pixart import backend, demo_world
from pixart.io import read_safetensors, read_safetensors_metadata, write_safetensors
from pixart.models.convert import save_pixart
from pixart.models.pixart import PixArt, preset_config
from pixart.models.t5 import T5Config, T5EncoderModel
from pixart.models.t5_tokenizer import make_tiny_tokenizer
from pixart.models.vae import AutoencoderKL, VAEConfig
from pixart.pipelines.loading import load_components
from pixart.pipelines.text_to_image import PixArtPipeline

PRESET = "PixArt-Sigma-XL-2-256x256"
ROOT = Path("models/demo")
CHECKPOINT = f"{PRESET}-demo.ckpt"
COMPONENTS = "pixart_sigma_sdxlvae_T5_diffusers"  # the folder name of the real Σ T5 + SDXL-VAE bundle
WEIGHTS = Path(__file__).resolve().parent / "demo_weights"  # the trained VAE and transformer (train_demo_world.py)
VAE_WEIGHTS = WEIGHTS / "vae.safetensors"
TRANSFORMER_WEIGHTS = WEIGHTS / "transformer.safetensors"

T5_CONFIG = dict(architectures=["T5EncoderModel"], model_type="t5", d_model=64, d_kv=32, d_ff=128, num_layers=2,
                 num_heads=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE_CONFIG = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
                  block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=1,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  act_fn="silu", scaling_factor=0.13025, sample_size=256, force_upcast=True)
DEFAULT_PROMPT = "a red circle on the left, black background"  # README's first command and the Gradio page
EXAMPLE_PROMPTS = (DEFAULT_PROMPT, "a blue square on the right, yellow background",
                   "a green triangle on the left, white background", "a red square on the right, white background",
                   "a blue circle on the left, black background", "a green circle on the right, yellow background")
PAGE_NOTE = ("The embedded demo bundle is a tiny model trained on a synthetic world: one red, green or blue circle, "
             "square or triangle on the left or right of a white, black or yellow background (see the example "
             "prompts); T5 is untrained, so other prompts give arbitrary scenes of that world.")
PIXART_SHRINK = dict(depth=2, hidden_size=144, num_heads=2)  # head width 72, as the real model
# how the demo samples (configs/inference/demo.yaml says the same; tests/test_demo_world.py checks it): the
# unconditional branch is the null caption the transformer was trained with (train.py's caption dropout), not T5 of
# an empty prompt, which it never saw
SAMPLING = dict(sampler="dpm", num_inference_steps=20, guidance_scale=4.5, uncond="y_embedding")


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


def write_vae(folder, state: dict[str, np.ndarray], scaling_factor: float) -> None:
    """The VAE's diffusers folder: config.json (VAE_CONFIG with this latent `scaling_factor`) and its weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(VAE_CONFIG, scaling_factor=scaling_factor), indent=2))
    write_safetensors(state, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})


def build(root=ROOT, log=print, trained: bool = True) -> Path:
    """Write the bundle under `root` (seconds). Deterministic: the same files every time. `trained`: the shipped
    VAE and transformer weights; else random ones (the untrained bundle)."""
    if trained and not (VAE_WEIGHTS.exists() and TRANSFORMER_WEIGHTS.exists()):
        raise FileNotFoundError(f"the trained demo weights are missing from {WEIGHTS} "
                                "(python tools/train_demo_world.py writes them)")
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

    cfg = preset_config(PRESET, caption_channels=T5_CONFIG["d_model"], **PIXART_SHRINK)
    if trained:
        scale = float(read_safetensors_metadata(VAE_WEIGHTS)["scaling_factor"])
        write_vae(comp / "vae", read_safetensors(VAE_WEIGHTS), scale)
        save_pixart(read_safetensors(TRANSFORMER_WEIGHTS), cfg, root / CHECKPOINT, PRESET)
        log(f"demo bundle written to {root} (trained on the demo world: try \"{DEFAULT_PROMPT}\")")
        return root
    write_vae(comp / "vae", random_vae_state(), VAE_CONFIG["scaling_factor"])
    save_pixart(random_transformer_state(cfg), cfg, root / CHECKPOINT, PRESET)
    log(f"demo bundle written to {root} (untrained: its images are noise)")
    return root


def random_vae_state() -> dict[str, np.ndarray]:
    """The untrained bundle's VAE weights (also where the VAE's training starts)."""
    return _random_state(AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG)), 2)


def random_transformer_state(cfg) -> dict[str, np.ndarray]:
    """The untrained bundle's transformer weights, null caption included."""
    state = _random_state(PixArt(cfg), 3)
    state["y_embedder.y_embedding"] = (np.random.default_rng(4).standard_normal(
        (cfg.model_max_length, cfg.caption_channels)) / cfg.caption_channels ** 0.5).astype(np.float32)
    return state


def evaluate(root=ROOT, cases=None, seed: int = 0, log=print, **sampling) -> tuple[float, list[dict]]:
    """Sample the bundle under `root` once per (scene, ratio) of `cases` (default: demo_world.probe_scenes()),
    seed `seed + i` for case i, as the demo samples (SAMPLING, updated by `sampling`), and measure each image.
    Returns (the fraction of the named attributes present, one row per case: caption, ratio, what was measured,
    the score out of 3 and the uint8 image)."""
    pipe = PixArtPipeline(**load_components(Path(root) / CHECKPOINT, PRESET, Path(root) / COMPONENTS / "vae",
                                            Path(root) / COMPONENTS / "text_encoder",
                                            Path(root) / COMPONENTS / "tokenizer", log=lambda *_: None))
    rows = []
    for i, (scene, ratio) in enumerate(cases or demo_world.probe_scenes()):
        h, w = demo_world.SIZES[ratio]
        out = pipe(scene.caption, height=h, width=w, seed=seed + i, use_resolution_binning=False, output_type="np",
                   progress=False, **{**SAMPLING, **sampling})
        image = np.round(np.asarray(out.images[0]) * 255).astype(np.uint8)
        rows.append(dict(caption=scene.caption, ratio=ratio, measured=demo_world.measure(image),
                         score=demo_world.score(image, scene), image=image))
        log(f"{scene.caption} ({ratio}): {rows[-1]['score']}/3 {rows[-1]['measured']}")
    return sum(r["score"] for r in rows) / (3 * len(rows)), rows
