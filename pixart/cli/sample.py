"""What `sample.py` does once its options are parsed: check everything, load once, encode, generate, save."""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from pixart import backend, cpu
from pixart.cli.options import (DTYPES, ArgumentParser, add_encoder_options, add_execution_group, add_kv_compress_group,
                                add_model_group, add_precision_group, kv_compress_config, mode_name, str2bool)
from pixart.diffusion import DEFAULT_STEPS, SAMPLERS
from pixart.models.pixart import preset_config
from pixart.models.t5 import load_t5, load_tokenizer
from pixart.pipelines.outputs import image_grid, provenance, save_images, save_png, write_json
from pixart.pipelines.text_to_image import PixArtPipeline, check_image_size, encode_text


class SampleError(ValueError):
    pass


def build_parser(description: str | None = None) -> ArgumentParser:
    """sample.py's options (gradio_demo.py and the LoRA inference script build on them); names follow the
    reference port."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", nargs="+", action="extend", default=None, help="one or more prompts")
    g.add_argument("--prompt_path", default=None, help="a text file with one prompt per line")
    g.add_argument("--negative_prompt", default="", help="negative prompt (the unconditional branch)")
    g.add_argument("--uncond", default="negative", choices=["negative", "y_embedding"],
                   help="unconditional branch: T5 of the negative prompt, or the checkpoint's null caption")

    g = add_model_group(p, "PixArt-Sigma-XL-2-1024-MS")
    g.add_argument("--checkpoint", default=None, help="transformer weights (.ckpt, .pth, or diffusers folder)")
    g.add_argument("--lora_path", default=None,
                   help="a LoRA to apply: pytorch_lora_weights.safetensors (diffusers), a peft adapter folder, or ours")
    g.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength: 0 = the base model, 1 = as trained")
    add_encoder_options(g)
    add_kv_compress_group(p, scale_factor=1)

    g = p.add_argument_group("generation")
    g.add_argument("--image_height", type=int, default=None)
    g.add_argument("--image_width", type=int, default=None)
    g.add_argument("--resolution_binning", type=str2bool, default=True,
                   help="generate at the nearest trained aspect ratio, then resize and crop to the requested size")
    g.add_argument("--sampling_method", default="dpm", choices=list(SAMPLERS))
    g.add_argument("--sampling_steps", type=int, default=None, help="default: dpm 20, iddpm 100, ddim 20, sa 25")
    g.add_argument("--dpm_schedule", default="linspace", choices=["linspace", "time_uniform"],
                   help="DPM-Solver++ steps: diffusers' schedule, or the official repos' time_uniform")
    g.add_argument("--guidance_scale", type=float, default=4.5)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--batch_size", type=int, default=1, help="images per prompt in one denoising batch")
    g.add_argument("--num_trials", type=int, default=1, help="repeat each prompt this many times (new seeds)")
    g.add_argument("--progress", type=str2bool, default=True, help="show a progress bar over denoising steps")

    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="samples")
    g.add_argument("--imagegrid", type=str2bool, default=False, help="also save all images as one grid")

    g = add_precision_group(p)
    g.add_argument("--dtype", default="fp32", choices=DTYPES, help="transformer precision")
    add_execution_group(p, mode="pynative")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_path:
        path = Path(args.prompt_path)
        if not path.exists():
            raise SampleError(f"prompt file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SampleError(f"prompt file {path} has no prompts (one per line expected)")
    if not prompts:
        raise SampleError("no prompt: give --prompt \"...\" or --prompt_path FILE")
    return prompts


def check_args(args) -> None:
    """Everything that can be checked before a model is loaded, so bad input costs nothing and writes nothing."""
    mode_name(args, SampleError)
    preset = preset_config(args.model)  # unknown presets fail here, naming the known ones
    try:
        check_image_size(args.image_height, args.image_width, preset.patch_size, args.resolution_binning,
                         names=("--image_height", "--image_width"))
    except ValueError as e:
        raise SampleError(str(e)) from None
    if args.sampling_steps is not None and args.sampling_steps < 1:
        raise SampleError(f"--sampling_steps must be >= 1, got {args.sampling_steps}")
    if args.batch_size < 1 or args.num_trials < 1:
        raise SampleError(f"--batch_size and --num_trials must be >= 1, got {args.batch_size}, {args.num_trials}")
    for name in ("checkpoint", "vae_root", "text_encoder_root"):
        value = getattr(args, name)
        if not value:
            raise SampleError(f"--{name} is required (set it in the YAML config or on the command line)")
        if not Path(value).exists():
            raise SampleError(f"--{name} not found: {value}")
    if args.tokenizer_root and not Path(args.tokenizer_root).exists():
        raise SampleError(f"--tokenizer_root not found: {args.tokenizer_root}")
    if getattr(args, "lora_path", None) and not Path(args.lora_path).exists():
        raise SampleError(f"--lora_path not found: {args.lora_path}")


def setup_backend(args) -> None:
    backend.setup(args.device_target, mode_name(args), args.jit_level, args.enable_flash_attention)
    backend.dtype(args.dtype)  # bf16 on CPU fails here, before loading


def load_pipeline(args, log=print, text_encoder: bool = True):
    """Set up the backend and load the pipeline the model flags name (sample.py and gradio_demo.py), with T5 unless
    `text_encoder` is False; run `check_args` first."""
    setup_backend(args)
    kv = kv_compress_config(args)
    return PixArtPipeline.from_pretrained(
        checkpoint=args.checkpoint, model=args.model, vae_root=args.vae_root, text_encoder_root=args.text_encoder_root,
        tokenizer_root=args.tokenizer_root, dtype=args.dtype, text_encoder_dtype=args.text_encoder_dtype,
        kv_compress=kv, scaling_factor=args.sd_scale_factor, lora_path=getattr(args, "lora_path", None),
        lora_scale=getattr(args, "lora_scale", 1.0), text_encoder=text_encoder, log=log)


def encode_first(args, prompts: list[str], log=print):
    """T5 on its own, before the transformer is loaded: every prompt (and the negative one) encoded, then T5 freed,
    so the two models never share memory (T5-XXL is the larger of the two). Returns the embeddings per prompt and
    the negative's (None with --uncond y_embedding)."""
    setup_backend(args)
    t0 = time.time()
    log(f"loading text encoder {args.text_encoder_root}")
    t5 = cpu.accelerate(load_t5(args.text_encoder_root, args.text_encoder_dtype or args.dtype))
    tokenizer = load_tokenizer(args.tokenizer_root or args.text_encoder_root)
    length = preset_config(args.model).model_max_length  # a checkpoint must agree with its preset on it
    embeds = [encode_text(t5, tokenizer, [p], length) for p in prompts]
    negative = encode_text(t5, tokenizer, [args.negative_prompt], length) if args.uncond == "negative" else None
    del t5
    gc.collect()
    log(f"encoded {len(prompts)} prompt(s) in {time.time() - t0:.1f}s (T5 loaded, run and released)")
    return embeds, negative


def generation_kwargs(args, pipe) -> dict:
    """The `pipe(...)` keywords the flags set, other than prompt and seed (sample.py and the LoRA script)."""
    return dict(negative_prompt=args.negative_prompt, height=args.image_height or pipe.resolution,
                width=args.image_width or pipe.resolution, sampler=args.sampling_method,
                num_inference_steps=args.sampling_steps or DEFAULT_STEPS[args.sampling_method],
                guidance_scale=args.guidance_scale, num_images_per_prompt=args.batch_size, uncond=args.uncond,
                use_resolution_binning=args.resolution_binning, progress=args.progress,
                sampler_options={"schedule": args.dpm_schedule} if args.sampling_method == "dpm" else {})


def run(args, log=print) -> list[Path]:
    prompts = read_prompts(args)
    check_args(args)
    embeds, negative = encode_first(args, prompts, log)
    pipe = load_pipeline(args, log, text_encoder=False)
    options = generation_kwargs(args, pipe)

    out_dir = Path(args.output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, records, written = [], [], []
    for trial in range(args.num_trials):
        for i, (prompt, emb) in enumerate(zip(prompts, embeds)):
            seed = args.seed + (trial * len(prompts) + i) * args.batch_size
            result = pipe(prompt, seed=seed, prompt_embeds=emb, negative_prompt_embeds=negative, **options)
            first = len(records)
            paths = save_images(result, lambda j, _: out_dir / f"{first + j:04d}-p{i}-t{trial}-b{j}.png",
                                provenance(args.model, args.checkpoint, args.lora_path, args.lora_scale), log)
            images += result.images
            records += [{"file": path.name, **settings} for path, settings in zip(paths, result.settings)]
            written += paths
    if args.imagegrid and images:
        grid = out_dir / "grid.png"
        save_png(image_grid(images), grid, {"files": ",".join(r["file"] for r in records)})
        written.append(grid)
    write_json(records, out_dir / "prompts.json")
    return written
