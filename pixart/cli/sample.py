"""What `sample.py` does once its options are parsed: check everything, load once, encode, generate, save."""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pixart import backend, cpu
from pixart.cli.controlnet import (add_controlnet_group, attach_controlnet, check_controlnet_args,
                                   controlnet_call_options)
from pixart.cli.options import (DTYPES, ArgumentParser, add_encoder_options, add_execution_group, add_kv_compress_group,
                                add_model_group, add_precision_group, kv_compress_config, mode_name,
                                resolve_model_paths, str2bool)
from pixart.diffusion import DEFAULT_STEPS, SAMPLERS, make_sampler, timesteps_list
from pixart.models.convert import read_pixart, resolve_config
from pixart.models.pixart import PRESETS, preset_config
from pixart.models.t5 import load_t5
from pixart.models.t5_tokenizer import load_tokenizer
from pixart.pipelines.image_inputs import load_image, load_mask
from pixart.pipelines.outputs import image_grid, provenance, save_images, save_png, write_json
from pixart.pipelines.text_to_image import PixArtPipeline, check_image_size, encode_text
from pixart.training import distributed


class SampleError(ValueError):
    pass


class PromptList(argparse.Action):
    """nargs="+" whose first use on the command line replaces the YAML's list and later uses extend it
    (`--prompt a b --prompt c` is three prompts; a config's `prompt:` list is not kept beside them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_given_" + self.dest, False)
        setattr(namespace, self.dest, (list(getattr(namespace, self.dest) or []) if seen else []) + list(values))
        setattr(namespace, "_given_" + self.dest, True)


REFERENCE_CHECKPOINT = "models/PixArt-Sigma-XL-2-512-MS.ckpt"  # the reference port's default


def build_parser(description: str | None = None) -> ArgumentParser:
    """sample.py's options (gradio_demo.py and the LoRA inference script build on them): the reference port's
    flags with its meanings and defaults, and ours beside them."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", nargs="+", action=PromptList, default=None, help="one or more prompts")
    g.add_argument("--prompt_path", default=None,
                   help="a text file with one prompt per line (blank lines skipped); replaces --prompt")
    g.add_argument("--negative_prompt", nargs="*", default=None,
                   help="negative prompt(s): one per prompt, or one for all (default: none)")
    g.add_argument("--uncond", default="negative", choices=["negative", "y_embedding"],
                   help="unconditional branch: T5 of the negative prompt, or the checkpoint's null caption")

    g = add_model_group(p, None)
    g.add_argument("--sample_size", type=int, default=None, choices=sorted(SIZE_PRESETS_SIZES),
                   help="latent size (image size / 8); without --model it picks the preset with --t5_max_length "
                        "(300: Σ, 120: α); default: the checkpoint's")
    g.add_argument("--max_length", type=int, default=None,
                   help="T5 tokens of each prompt (default: the model's, 300 Σ / 120 α)")
    g.add_argument("--checkpoint", default=REFERENCE_CHECKPOINT,
                   help="transformer weights (.ckpt, .pth, or diffusers folder)")
    g.add_argument("--lora_path", default=None,
                   help="a LoRA to apply: pytorch_lora_weights.safetensors (diffusers), a peft adapter folder, or ours")
    g.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength: 0 = the base model, 1 = as trained")
    add_encoder_options(g, reference_layout=True)
    add_kv_compress_group(p)

    g = p.add_argument_group("generation")
    g.add_argument("--image_height", type=int, default=None, help="default: the model's size")
    g.add_argument("--image_width", type=int, default=None, help="default: the model's size")
    g.add_argument("--resolution_binning", type=str2bool, default=True,
                   help="generate at the nearest trained aspect ratio, then resize and crop to the requested size")
    g.add_argument("--sampling_method", default="dpm", choices=list(SAMPLERS))
    g.add_argument("--sampling_steps", type=int, default=None,
                   help="default: dpm 20, iddpm 100, ddim 20, sa 25, lcm 4")
    g.add_argument("--timesteps", default=None,
                   help="a custom schedule instead of --sampling_steps: comma-separated, strictly decreasing, in "
                        "0..999 (dpm and lcm), e.g. 400 for PixArt-Alpha-DMD's one step")
    g.add_argument("--dpm_schedule", default="linspace", choices=["linspace", "time_uniform"],
                   help="DPM-Solver++ steps: diffusers' schedule, or the official repos' time_uniform")
    g.add_argument("--guidance_scale", type=float, default=4.5)
    g.add_argument("--seed", type=int, default=42, help="image k of the run (k = (trial x prompts + prompt) x "
                   "copies + copy) gets seed + k, whatever the batching")
    g.add_argument("--batch_size", type=int, default=1, help="different prompts denoised together in one batch")
    g.add_argument("--num_trials", type=int, default=1, help="images of each prompt, one per batch run (new noise)")
    g.add_argument("--num_images_per_prompt", type=int, default=1,
                   help="images of each prompt within one batch (diffusers' name; faster than --num_trials)")
    g.add_argument("--progress", type=str2bool, default=True, help="show a progress bar over denoising steps")

    g = p.add_argument_group("image to image / inpainting")
    g.add_argument("--image", default=None, help="start from this image (SDEdit), scaled and cropped to the size generated (--image_height / "
                        "--image_width; without them, its own size)")
    g.add_argument("--strength", type=float, default=0.8,
                   help="with --image: how much is redone, 0 (the image as the VAE returns it) .. 1 (all)")
    g.add_argument("--mask_image", default=None,
                   help="with --image: inpaint where this mask is white (resized onto the image), keep where black")
    g.add_argument("--mask_blur", type=float, default=0.0, help="soften the mask's edge by this many pixels")

    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="samples")
    g.add_argument("--imagegrid", type=str2bool, default=False,
                   help="also save the images as one grid: a row per trial of each batch, a column per image")

    g = add_precision_group(p)
    g.add_argument("--dtype", default=None, choices=DTYPES, help="transformer precision (default: fp16 on Ascend; "
                   "on CPU bf16 where the CPU has AVX512_BF16, else fp32)")
    add_controlnet_group(p)
    g = add_execution_group(p, mode="pynative")
    g.add_argument("--use_parallel", type=str2bool, default=False,
                   help="under msrun: the prompts are split across the ranks, each writes its own images")
    return p


# (latent size, caption tokens) -> preset, for configs that name the model by --sample_size (the reference port's)
SIZE_PRESETS = {(PRESETS[name]["input_size"], PRESETS[name]["model_max_length"]): name
                for name in PRESETS if not name.endswith("-KV")}
SIZE_PRESETS_SIZES = {size for size, _ in SIZE_PRESETS}


def pick_model(args) -> str:
    """The preset to run: --model; else --sample_size with --t5_max_length (300 unless given: Σ) and
    --kv_compress; else the one the checkpoint records. A --sample_size that contradicts --model is an error."""
    if args.model:
        preset = preset_config(args.model)  # unknown presets fail here, naming the known ones
        if args.sample_size is not None and args.sample_size != preset.input_size:
            raise SampleError(f"--sample_size {args.sample_size} does not match --model {args.model} (latent size "
                              f"{preset.input_size}, {preset.input_size * 8} px); drop one of them")
        return args.model
    if args.sample_size is not None:
        length = args.max_length or 300
        name = SIZE_PRESETS.get((args.sample_size, length))
        if name is None:
            raise SampleError(f"no PixArt model has latent size {args.sample_size} with {length} caption tokens; "
                              f"known: {', '.join(f'{s}/{n}' for s, n in sorted(SIZE_PRESETS))} (--sample_size / "
                              "--t5_max_length), or pass --model")
        if args.kv_compress and f"{name}-KV" in PRESETS:
            name = f"{name}-KV"
        return name
    if not Path(args.checkpoint).exists():
        raise SampleError(f"--checkpoint not found: {args.checkpoint}")
    _, preset, _ = resolve_config(read_pixart(args.checkpoint).config, None, args.checkpoint)
    if preset is None:
        raise SampleError(f"{args.checkpoint}: cannot tell which PixArt model it is; pass --model or --sample_size")
    return preset


def read_prompts(args, log=print) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_path:
        path = Path(args.prompt_path)
        if not path.exists():
            raise SampleError(f"prompt file not found: {path}")
        if prompts:
            log(f"note: prompts read from {path}; --prompt is not used")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SampleError(f"prompt file {path} has no prompts (one per line expected)")
    if not prompts:
        raise SampleError("no prompt: give --prompt \"...\" or --prompt_path FILE")
    return prompts


def negative_prompts(args, prompts: list[str]) -> list[str]:
    """One negative prompt per prompt: none given -> "", one -> the same for all, else exactly one per prompt."""
    given = args.negative_prompt
    given = [given] if isinstance(given, str) else list(given or [])
    if len(given) <= 1:
        return (given or [""]) * len(prompts)
    if len(given) != len(prompts):
        raise SampleError(f"--negative_prompt: got {len(given)} for {len(prompts)} prompts; give one for all or "
                          "one per prompt")
    return given


def check_args(args, log=print) -> None:
    """Everything that can be checked before a model is loaded, so bad input costs nothing and writes nothing;
    fills in the model (`pick_model`), the model files' layout (`resolve_model_paths`) and the dtype."""
    mode_name(args, SampleError)
    resolve_model_paths(args, log)
    if not args.checkpoint:
        raise SampleError("--checkpoint is required (set it in the YAML config or on the command line)")
    args.model = pick_model(args)
    preset = preset_config(args.model)
    try:
        check_image_size(args.image_height, args.image_width, preset.patch_size, args.resolution_binning,
                         names=("--image_height", "--image_width"))
    except ValueError as e:
        raise SampleError(str(e)) from None
    if args.sampling_steps is not None and args.sampling_steps < 1:
        raise SampleError(f"--sampling_steps must be >= 1, got {args.sampling_steps}")
    check_sampling(args)
    check_image_inputs(args)
    for name in ("batch_size", "num_trials", "num_images_per_prompt", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SampleError(f"--{name} must be >= 1, got {value}")
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
    kv_compress_config(args)  # a bad factor fails here
    check_controlnet_args(args, log)  # the control image is read here, before any model


def parse_timesteps(value) -> list[int] | None:
    """--timesteps "999,500" (or a YAML list) -> [999, 500]; the sampler checks range and order."""
    try:
        return timesteps_list(value)
    except ValueError as e:
        raise SampleError(f"--{e}") from None


def check_sampling(args) -> None:
    """The sampler and its schedule, built now so that a schedule it cannot run (custom timesteps it does not take,
    out of range or not decreasing, too many steps) is refused before loading."""
    options = {"schedule": args.dpm_schedule} if args.sampling_method == "dpm" else {}
    timesteps = parse_timesteps(getattr(args, "timesteps", None))
    try:
        sampler = make_sampler(args.sampling_method, timesteps=timesteps, **options)
        if getattr(sampler, "STRENGTH_RESPACES", False) and getattr(args, "image", None) and timesteps is None:
            sampler = make_sampler(args.sampling_method, strength=args.strength, **options)  # as image-to-image will
        sampler.noise_levels(args.sampling_steps or DEFAULT_STEPS[args.sampling_method])
    except ValueError as e:
        raise SampleError(f"--timesteps / --sampling_steps / --strength: {e}") from None


def check_image_inputs(args) -> None:
    """--image / --mask_image readable, --strength in [0, 1], --mask_blur >= 0."""
    if getattr(args, "mask_image", None) and not getattr(args, "image", None):
        raise SampleError("--mask_image needs --image: the picture to inpaint")
    if not getattr(args, "image", None):
        return
    if not 0.0 <= args.strength <= 1.0:
        raise SampleError(f"--strength must be in [0, 1] (0 keeps the image, 1 repaints it all), got {args.strength}")
    if not 0.0 <= args.mask_blur < float("inf"):
        raise SampleError(f"--mask_blur must be a number of pixels >= 0, got {args.mask_blur}")
    try:
        load_image(args.image, "--image")
        if args.mask_image:
            load_mask(args.mask_image, "--mask_image")
    except ValueError as e:
        raise SampleError(str(e)) from None


def caption_length(args) -> int:
    """T5 tokens per prompt: --t5_max_length, else the model's."""
    return args.max_length or preset_config(args.model).model_max_length


def setup_backend(args) -> None:
    """Device, mode and dtype, once per run (the device cannot change once msrun's communication is up)."""
    if getattr(args, "_backend_ready", False):
        return
    backend.setup(args.device_target, mode_name(args), args.jit_level, args.enable_flash_attention)
    args.dtype = args.dtype or backend.default_dtype()
    if args.text_encoder_dtype == "auto":
        args.text_encoder_dtype = backend.default_text_encoder_dtype()
    for name in (args.dtype, args.text_encoder_dtype or args.dtype):
        backend.weight_dtype(name)  # bf16 on a CPU without it fails here, before loading
    args._backend_ready = True


def load_pipeline(args, log=print, text_encoder: bool = True):
    """Set up the backend and load the pipeline the model flags name (sample.py and gradio_demo.py), with T5 unless
    `text_encoder` is False; run `check_args` first."""
    setup_backend(args)
    kv = kv_compress_config(args)  # unset layers: the second half of the checkpoint's blocks
    pipe = PixArtPipeline.from_pretrained(
        checkpoint=args.checkpoint, model=args.model, vae_root=args.vae_root, text_encoder_root=args.text_encoder_root,
        tokenizer_root=args.tokenizer_root, dtype=args.dtype, text_encoder_dtype=args.text_encoder_dtype,
        kv_compress=kv, scaling_factor=args.sd_scale_factor, lora_path=getattr(args, "lora_path", None),
        lora_scale=getattr(args, "lora_scale", 1.0), text_encoder=text_encoder, log=log)
    pipe.max_sequence_length = caption_length(args)
    return attach_controlnet(pipe, args, log)


def encode_first(args, prompts: list[str], negatives: list[str] | None = None, log=print):
    """T5 on its own, before the transformer is loaded: every prompt (and each distinct negative prompt) encoded,
    then T5 freed, so the two models never share memory (T5-XXL is the larger of the two). Returns the embeddings
    per prompt and per negative prompt (None with --uncond y_embedding, or guidance off)."""
    setup_backend(args)
    t0 = time.time()
    log(f"loading text encoder {args.text_encoder_root}")
    t5 = cpu.accelerate(load_t5(args.text_encoder_root, args.text_encoder_dtype or args.dtype))
    tokenizer = load_tokenizer(args.tokenizer_root or args.text_encoder_root)
    length = caption_length(args)
    embeds = [encode_text(t5, tokenizer, [p], length) for p in prompts]
    negatives = [""] * len(prompts) if negatives is None else negatives
    negative = None
    if args.uncond == "negative" and args.guidance_scale > 1.0:  # guidance off: no unconditional branch to encode
        distinct = {text: encode_text(t5, tokenizer, [text], length) for text in dict.fromkeys(negatives)}
        negative = [distinct[text] for text in negatives]
    del t5
    gc.collect()
    log(f"encoded {len(prompts)} prompt(s) in {time.time() - t0:.1f}s (T5 loaded, run and released)")
    return embeds, negative


def generation_kwargs(args, pipe) -> dict:
    """The `pipe(...)` keywords the flags set, other than prompts and seeds (sample.py and the LoRA script)."""
    image = getattr(args, "image", None)
    default_size = None if image else pipe.resolution  # image-to-image: the input image's size
    extra = dict(image=image, mask_image=args.mask_image, strength=args.strength,
                 mask_blur=args.mask_blur) if image else {}
    timesteps = parse_timesteps(getattr(args, "timesteps", None))
    if timesteps is not None:
        extra["timesteps"] = timesteps
    return dict(height=args.image_height or default_size, width=args.image_width or default_size,
                sampler=args.sampling_method, **extra,
                num_inference_steps=args.sampling_steps or DEFAULT_STEPS[args.sampling_method],
                guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images_per_prompt,
                uncond=args.uncond, use_resolution_binning=args.resolution_binning, progress=args.progress,
                sampler_options={"schedule": args.dpm_schedule} if args.sampling_method == "dpm" else {})


def plan(args, prompts: list[str], negatives: list[str], rank: int = 0, world: int = 1) -> list[list[list[dict]]]:
    """The run's images, as batches[b][trial] = the images of one pipeline call: each a dict of its file name,
    prompt, negative prompt, seed and trial. Prompts are split in contiguous shares across `world` ranks (this
    rank's share only), then grouped by --batch_size; image k of the whole run (k counted over trials, then
    prompts, then copies) has seed --seed + k and file `k-p<prompt>-t<trial>-b<copy>.png`, so names never
    collide between ranks and an image does not depend on the batching."""
    n, copies = len(prompts), args.num_images_per_prompt
    share = [i for i in range(n) if i * world // n == rank] if world > 1 else list(range(n))
    batches = []
    for start in range(0, len(share), args.batch_size):
        group = share[start:start + args.batch_size]
        trials = []
        for t in range(args.num_trials):
            images = []
            for i in group:
                for j in range(copies):
                    k = (t * n + i) * copies + j
                    images.append(dict(file=f"{k:04d}-p{i}-t{t}-b{j}.png", prompt=prompts[i],
                                       negative_prompt=negatives[i], seed=args.seed + k, trial=t, index=i))
            trials.append(images)
        batches.append(trials)
    return batches


def grid_of(rows: list[list]) -> Image.Image:
    """Images in rows (a short row is padded with black)."""
    ncols = max(len(r) for r in rows)
    blank = Image.new("RGB", rows[0][0].size)
    return image_grid([im for r in rows for im in r + [blank] * (ncols - len(r))], ncols)


def run(args, log=print) -> list[Path]:
    prompts = read_prompts(args, log)
    negatives = negative_prompts(args, prompts)
    check_args(args, log)
    setup_backend(args)
    context = distributed.init(args.use_parallel)
    batches = plan(args, prompts, negatives, context.rank, context.world_size)
    out_dir = Path(args.output_path)

    def write_prompts() -> None:
        """Every rank's images in prompts.json, written once (rank 0), once the models have loaded: a run that
        fails on its inputs or weights leaves no file behind."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if context.is_main:
            everything = plan(args, prompts, negatives) if context.distributed else batches
            images = sorted((image for trials in everything for images in trials for image in images),
                            key=lambda image: image["seed"])
            write_json([{k: v for k, v in image.items() if k != "index"} for image in images],
                       out_dir / "prompts.json")

    if not batches:
        write_prompts()
        log(f"rank {context.rank}: no prompt left for this rank ({len(prompts)} prompt(s), {context.world_size} ranks)")
        return []
    mine = sorted({image["index"] for trials in batches for image in trials[0]})
    embeds, negative = encode_first(args, [prompts[i] for i in mine], [negatives[i] for i in mine], log)
    embeds, negative = dict(zip(mine, embeds)), dict(zip(mine, negative)) if negative else None
    pipe = load_pipeline(args, log, text_encoder=False)
    write_prompts()
    options = dict(generation_kwargs(args, pipe), **controlnet_call_options(args))
    made_by = provenance(args.model, args.checkpoint, args.lora_path, args.lora_scale)

    written, grid_rows = [], []
    for trials in batches:
        for images in trials:
            group = list(dict.fromkeys(image["index"] for image in images))
            stack = lambda table: tuple(np.concatenate([table[i][a] for i in group]) for a in (0, 1))  # noqa: E731
            result = pipe([prompts[i] for i in group], negative_prompt=[negatives[i] for i in group],
                          seed=[image["seed"] for image in images], prompt_embeds=stack(embeds),
                          negative_prompt_embeds=stack(negative) if negative else None, **options)
            for image, settings in zip(images, result.settings):
                settings["trial"] = image["trial"]
            written += save_images(result, lambda j, _: out_dir / images[j]["file"], made_by, log)
            grid_rows.append(result.images)
    if args.imagegrid:
        grid = out_dir / ("grid.png" if not context.distributed else f"grid-rank{context.rank}.png")
        save_png(grid_of(grid_rows), grid, {"files": ",".join(p.name for p in written)})
        written.append(grid)
    return written
