"""A pipeline written as a diffusers pipeline folder that diffusers (PyTorch) and this package load as it is."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pixart.io import write_safetensors
from pixart.models.convert import save_diffusers_transformer
from pixart.pipelines.scheduler import scheduler_config, write_scheduler
from pixart.pipelines.transformer import parameters_numpy

_SIGMA_TOKENS = 300  # PixArt-Σ's caption length; α's is 120


def pipeline_class_name(pipe) -> str:
    """PixArtAlphaPipeline / PixArtSigmaPipeline: the class itself when it is one of them, else by caption length."""
    name = type(pipe).__name__
    if name in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
        return name
    return "PixArtSigmaPipeline" if pipe.transformer.config.model_max_length == _SIGMA_TOKENS else "PixArtAlphaPipeline"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_vae(vae, folder) -> None:
    folder = Path(folder)
    cfg = dataclasses.asdict(vae.config)
    n = len(cfg["block_out_channels"])
    cfg.update(_class_name="AutoencoderKL", block_out_channels=list(cfg["block_out_channels"]), act_fn="silu",
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    _write_json(folder / "config.json", cfg)
    write_safetensors(parameters_numpy(vae), folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})


def save_t5(text_encoder, folder) -> None:
    folder = Path(folder)
    cfg = dict(dataclasses.asdict(text_encoder.config), architectures=["T5EncoderModel"], model_type="t5",
               is_encoder_decoder=False, use_cache=False)
    _write_json(folder / "config.json", cfg)
    write_safetensors(parameters_numpy(text_encoder), folder / "model.safetensors", {"format": "pt"})


def save_pipeline(pipe, folder) -> None:
    """model_index.json, transformer/, vae/, text_encoder/ + tokenizer/ (null in the index when the pipeline has
    none), scheduler/ (the diffusers scheduler of the pipeline's sampler)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_diffusers_transformer(parameters_numpy(pipe.transformer), pipe.transformer.config, folder / "transformer")
    save_vae(pipe.vae, folder / "vae")
    index = {"_class_name": pipeline_class_name(pipe), "_diffusers_version": "0.30.0",
             "scheduler": ["diffusers", scheduler_config(pipe.sampler)["_class_name"]],
             "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": [None, None], "tokenizer": [None, None]}
    if pipe.text_encoder is not None:
        save_t5(pipe.text_encoder, folder / "text_encoder")
        index["text_encoder"] = ["transformers", "T5EncoderModel"]
    if pipe.tokenizer is not None:
        pipe.tokenizer.save_pretrained(str(folder / "tokenizer"))
        index["tokenizer"] = ["transformers", type(pipe.tokenizer).__name__.removesuffix("Fast")]
    write_scheduler(folder, pipe.sampler)
    _write_json(folder / "model_index.json", index)
