"""Building the pipeline's components from files: the one place scripts (sample.py, gradio_demo.py) and the
diffusers-shaped `from_pretrained` load models."""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from pixart import backend, cpu
from pixart.io import CheckpointError, load_into
from pixart.models.convert import fill_null_caption, pipeline_presets, read_pixart, resolve_config
from pixart.models.pixart import KVCompression, PixArt, preset_config


_DTYPE_NAMES = {ms.float32: "fp32", ms.float16: "fp16", ms.bfloat16: "bf16", "float32": "fp32", "float16": "fp16",
                "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def dtype_name(dtype) -> str:
    """'fp32' / 'fp16' / 'bf16' for a MindSpore dtype (diffusers' `mindspore_dtype=ms.float16`) or its name; None:
    fp32."""
    if dtype is None:
        return "fp32"
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"mindspore_dtype must be ms.float32, ms.float16 or ms.bfloat16, got {dtype!r}") from None


def resolve_pretrained(path, subfolder: str | None = None) -> Path:
    """A local folder, or a hub id (`PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`) already in the local Hugging Face
    cache (nothing is downloaded), then `subfolder` inside it."""
    folder = Path(path)
    if not folder.exists():
        name = str(path)
        if name.count("/") != 1 or name.startswith((".", "/")):
            raise CheckpointError(f"{path}: no such folder (and not a hub id like PixArt-alpha/PixArt-XL-2-512x512)")
        try:
            from huggingface_hub import snapshot_download  # optional: only hub ids need it
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:
            raise CheckpointError(f"{path}: no such folder, and the hub id is not in the local Hugging Face cache "
                                  f"(download it first: huggingface-cli download {name})") from None
    if subfolder:
        folder = folder / subfolder
        if not folder.exists():
            raise CheckpointError(f"{folder}: no such folder")
    return folder


def load_transformer(checkpoint, model: str | None = None, dtype: str = "fp32", kv_compress: dict | None = None,
                     log=print, lora_path=None, lora_scale: float = 1.0, cls=PixArt) -> PixArt:
    """PixArt from any supported checkpoint (converted .ckpt, original .pth, diffusers folder), with the LoRA at
    `lora_path` (diffusers / peft / our layout, see `pixart.models.lora`) applied at `lora_scale`.

    The architecture is what the file records (our .ckpt) or its weights and config.json say, completed by the
    preset `model` (the config's `model:` / `--model`) where the file says nothing (a diffusers folder's caption
    length, for one); a file that contradicts `model` is a CheckpointError naming the preset the file is, and one
    that several presets fit needs `model` (see `pixart.models.convert.resolve_config`). Depth and width may be
    those of a reduced copy of the preset. `kv_compress` overrides the KV-compression config (Σ); without layers it
    compresses the second half of the checkpoint's blocks. `cls`: PixArt or a subclass (the diffusers-named
    `PixArtTransformer2DModel`).
    """
    weights = read_pixart(checkpoint)
    cfg, preset, _ = resolve_config(weights.config, model, checkpoint)
    fill_null_caption(weights.state, cfg, cfg.model_max_length, log)  # diffusers files lack it
    if kv_compress is not None:
        cfg.kv_compress_config = KVCompression.from_options(  # unset layers: the second half of the blocks
            kv_compress.get("sampling", "conv"), kv_compress.get("scale_factor"), kv_compress.get("kv_compress_layer"),
            cfg.depth).config()
    ref = preset_config(preset) if preset else None
    if ref and (cfg.depth, cfg.hidden_size) != (ref.depth, ref.hidden_size):
        log(f"note: {checkpoint} is a reduced {preset} (depth {cfg.depth}, width {cfg.hidden_size})")
    with no_init_parameters():  # no random weights: the checkpoint's arrays become the parameters (no copy)
        net = cls(cfg)
    load_into(net, weights.state, what=f"{preset or 'PixArt'} transformer", share=True)
    if lora_path:
        from pixart.models.lora import load_lora
        load_lora(net, lora_path, lora_scale, log)  # before the cast, so the LoRA weights take `dtype` too
    return cpu.accelerate(backend.cast_parameters(net, dtype))


def load_components(checkpoint, model: str, vae_root, text_encoder_root, tokenizer_root=None, dtype: str = "fp32",
                    text_encoder_dtype: str | None = None, vae_dtype: str = "fp32", kv_compress: dict | None = None,
                    scaling_factor: float | None = None, lora_path=None, lora_scale: float = 1.0,
                    text_encoder: bool = True, log=print) -> dict:
    """Everything `PixArtPipeline(...)` takes. T5 may be loaded in half precision (`text_encoder_dtype`), or not at
    all (`text_encoder=False`: prompts were encoded beforehand; no tokenizer either)."""
    from pixart.models.t5 import load_t5
    from pixart.models.t5_tokenizer import load_tokenizer
    from pixart.models.vae import load_vae
    log(f"loading transformer {checkpoint}")
    transformer = load_transformer(checkpoint, model, dtype, kv_compress, log, lora_path, lora_scale)
    log(f"loading VAE {vae_root}")
    vae = cpu.accelerate(load_vae(vae_root, vae_dtype))
    t5 = tokenizer = None
    if text_encoder:
        log(f"loading text encoder {text_encoder_root}")
        t5 = cpu.accelerate(load_t5(text_encoder_root, text_encoder_dtype or dtype))
        tokenizer = load_tokenizer(tokenizer_root or text_encoder_root)
    return dict(transformer=transformer, vae=vae, text_encoder=t5, tokenizer=tokenizer,
                scaling_factor=scaling_factor or vae.config.scaling_factor)


def resolve_pipeline_folder(folder, model: str | None = None, given: tuple[str, ...] = ()) -> dict:
    """A diffusers pipeline folder (`PixArt-alpha/PixArt-XL-2-512x512` downloaded, or its hub id when cached) -> the
    component paths and the preset (`model`, unless given): α or Σ from model_index.json, training size and
    micro-conditions from transformer/config.json. Components named in `given` (passed in already: "checkpoint",
    "vae_root", ...) may be missing from the folder."""
    folder = resolve_pretrained(folder)
    paths = {"checkpoint": folder / "transformer", "vae_root": folder / "vae",
             "text_encoder_root": folder / "text_encoder", "tokenizer_root": folder / "tokenizer"}
    lacking = [str(p) for k, p in paths.items() if k not in given and not p.is_dir()]
    if lacking:
        raise CheckpointError(f"{folder} is not a diffusers PixArt pipeline folder: no {', '.join(lacking)} (download "
                              "one, e.g. huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512 --local-dir ...)")
    out = {k: str(v) for k, v in paths.items()}
    if model:
        return dict(out, model=model)
    if "checkpoint" in given:
        return dict(out, model=None)
    found = pipeline_presets(folder)
    if len(found) != 1:
        raise CheckpointError(f"{folder}: cannot tell which PixArt model it holds (it fits "
                              f"{', '.join(found) or 'no preset'}); pass --model with a preset name")
    return dict(out, model=found[0])
