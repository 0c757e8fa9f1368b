"""Text-to-image with PixArt-α / Σ: prompts -> T5 -> denoise with classifier-free guidance -> VAE -> images; with
`image=` image-to-image (SDEdit) and with `mask_image=` inpainting.

    pipe = PixArtSigmaPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", mindspore_dtype=ms.float16)
    image = pipe("a small cactus with a happy face in the Sahara desert", generator=0)[0][0]
    edited = pipe("the same cactus in snow", image=image, strength=0.6, generator=0)[0][0]
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint
from PIL import Image

from pixart import backend, cpu
from pixart.data.buckets import ASPECT_RATIOS, closest_bucket, resize_and_crop_array
from pixart.diffusion import DEFAULT_STEPS, SAMPLERS, make_sampler
from pixart.models.t5_tokenizer import encode_prompts
from pixart.models.convert import pipeline_class
from pixart.pipelines.image_inputs import image_tensor, latent_mask, load_image, load_mask, pixel_mask
from pixart.pipelines.loading import (dtype_name, load_components, load_transformer, resolve_pipeline_folder)
from pixart.pipelines import captions


MIN_IMAGE_SIZE = 8  # pixels: one latent pixel


def check_image_size(height: int | None, width: int | None, patch_size: int, resolution_binning: bool,
                     names: tuple[str, str] = ("height", "width")) -> None:
    """The image sizes the pipeline can make (None: the model's own size): at least 8 pixels each way, and without
    resolution binning multiples of 8 x `patch_size` (the VAE's factor times the patch), since the model then
    generates the size exactly. With binning any size works: it is generated at the nearest trained bucket and
    resized. Raises ValueError naming the value (`names` as the caller's options spell them)."""
    for name, value in zip(names, (height, width)):
        if value is not None and value < MIN_IMAGE_SIZE:
            raise ValueError(f"{name} must be at least {MIN_IMAGE_SIZE} pixels, got {value}")
    multiple = 8 * patch_size
    if not resolution_binning and ((height or 0) % multiple or (width or 0) % multiple):
        raise ValueError(f"image size {height}x{width} (height x width) is not reachable without resolution "
                         f"binning: both must be multiples of {multiple} (8x VAE, {patch_size}x{patch_size} patches)")


def encode_text(text_encoder, tokenizer, prompts: list[str], max_length: int):
    """T5 features (N, 1, L, C) as float32 NumPy and masks (N, L) for `prompts`, lower-cased and stripped as diffusers
    does. T5 runs eagerly, so that no compiled graph keeps its weights alive once it is released."""
    warn_truncated(tokenizer, [p.lower().strip() for p in prompts], max_length)
    ids, mask = encode_prompts(tokenizer, [p.lower().strip() for p in prompts], max_length)
    with backend.eager():
        emb = text_encoder(Tensor(ids), Tensor(mask)).astype(ms.float32).asnumpy()
    return emb[:, None], mask


def warn_truncated(tokenizer, prompts: list[str], max_length: int) -> None:
    """One warning line per prompt longer than the `max_length` tokens T5 sees (the end is cut, as diffusers warns)."""
    for ids in tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]:
        if len(ids) > max_length:
            cut = tokenizer.decode(ids[max_length - 1:], skip_special_tokens=True)
            print(f"warning: a prompt has {len(ids)} tokens, more than the {max_length} the model reads; this end is "
                  f"cut: {cut[:80]!r}" + ("..." if len(cut) > 80 else ""), file=sys.stderr)


OUTPUT_TYPES = ("pil", "np", "ms", "latent")
CALLBACK_TENSOR_INPUTS = ("latents",)


@dataclass
class PipelineOutput:
    """`.images`, and indexable as diffusers' and mindone's outputs are: `out[0]` is the images, `out[0][0]` the
    first image."""
    images: list                     # PIL images; (N, H, W, 3) float arrays in [0, 1] ("np"); a Tensor ("ms"); latents
    latents: np.ndarray              # final latents (N, 4, h, w), in the transformer's space (before / scaling_factor)
    settings: list = field(default_factory=list)  # per image: prompt, seed, sampler, steps, guidance, size

    def to_tuple(self) -> tuple:
        return (self.images,)

    def __getitem__(self, index):
        return self.to_tuple()[index]

    def __len__(self) -> int:
        return 1


def _as_list(value, name: str, n: int | None = None) -> list:
    items = [value] if isinstance(value, str) else list(value)
    if any(not isinstance(v, str) for v in items):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    if n is not None and len(items) != n:
        raise ValueError(f"{name} has {len(items)} entries for {n} prompts; pass one string or {n}")
    return items


def _embeddings(embeds, mask, name: str):
    """(features (N, 1, L, C) float32, mask (N, L)) from diffusers' (N, L, C) + mask, ours (N, 1, L, C), or the
    tuple (features, mask) this pipeline's own `encode_prompt` returns."""
    if isinstance(embeds, tuple):
        embeds, mask = embeds
    embeds = np.asarray(embeds.asnumpy() if isinstance(embeds, Tensor) else embeds, np.float32)
    if embeds.ndim == 3:
        embeds = embeds[:, None]
    if mask is None:
        raise ValueError(f"{name.replace('embeds', 'attention_mask')} must be given with {name}")
    mask = np.asarray(mask.asnumpy() if isinstance(mask, Tensor) else mask)
    if embeds.ndim != 4 or mask.shape != (embeds.shape[0], embeds.shape[2]):
        raise ValueError(f"{name} must be (N, L, C) with a mask (N, L), got {embeds.shape} and mask {mask.shape}")
    return embeds, mask


class PixArtPipeline:
    """Text-to-image with PixArt-α / Σ, shaped as diffusers' PixArtAlphaPipeline / PixArtSigmaPipeline; every
    component is a MindSpore Cell already loaded. `sampler` ("dpm", "ddim", "sa", "iddpm") plays the part of
    diffusers' scheduler (from_pretrained reads it from the folder's scheduler_config.json)."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, scaling_factor: float | None = None,
                 max_sequence_length: int | None = None, sampler: str = "dpm"):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scaling_factor = scaling_factor or vae.config.scaling_factor
        self.max_sequence_length = max_sequence_length or transformer.config.model_max_length
        self.sampler = sampler
        self.resolution = transformer.config.input_size * 8  # the training size picks the aspect-ratio table
        self.tiled_decode_from = 256  # latent pixels: images of 2048 px and more decode in tiles
        self._interrupt = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, mindspore_dtype=None, transformer=None,
                        text_encoder=..., vae=None, tokenizer=None, scheduler: str | None = None,
                        model: str | None = None, lora_path=None, lora_scale: float = 1.0,
                        text_encoder_dtype=None, vae_dtype=None, kv_compress: dict | None = None, log=None,
                        **kwargs) -> "PixArtPipeline":
        """A diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)
        or a hub id in the local Hugging Face cache, as diffusers' `from_pretrained`:

            pipe = PixArtSigmaPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", mindspore_dtype=ms.float16)

        `mindspore_dtype` is the transformer's and T5's (the VAE stays float32: the SDXL VAE overflows in float16);
        a component passed in (`transformer=`, `vae=`, `tokenizer=`) is used as is, `text_encoder=None` loads no T5
        (prompts then come as embeddings); `scheduler` names our sampler instead of the folder's
        scheduler_config.json; `model` names the preset where the folder leaves it open; a LoRA (`lora_path`) is
        applied at `lora_scale`; `text_encoder_dtype` / `vae_dtype` override the dtype of those two, `kv_compress`
        the transformer's KV compression (Σ). Returns the folder's pipeline class (α or Σ) when called on
        PixArtPipeline.

        Without a folder, the keyword form loads separate files: `from_pretrained(checkpoint=..., model=...,
        vae_root=..., text_encoder_root=...)` (see `pixart.pipelines.loading.load_components`)."""
        log = log or (lambda *a: None)
        if pretrained_model_name_or_path is None:
            named = dict(model=model, lora_path=lora_path, lora_scale=lora_scale, kv_compress=kv_compress,
                         text_encoder_dtype=text_encoder_dtype, vae_dtype=vae_dtype or "fp32")
            if text_encoder is not ...:
                named["text_encoder"] = text_encoder
            return cls(**load_components(**kwargs, **named, log=log))
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected arguments: {', '.join(sorted(kwargs))}")
        from pixart.models.t5 import load_t5
        from pixart.models.t5_tokenizer import load_tokenizer
        from pixart.models.vae import load_vae
        from pixart.pipelines.scheduler import read_scheduler
        from pixart.pipelines.transformer import PixArtTransformer2DModel
        given = tuple(k for k, v in (("checkpoint", transformer), ("vae_root", vae), ("tokenizer_root", tokenizer),
                                     ("text_encoder_root", text_encoder)) if v is not ... and v is not None) + \
            (("text_encoder_root", "tokenizer_root") if text_encoder is None else ())
        paths = resolve_pipeline_folder(pretrained_model_name_or_path, model, given)
        folder = Path(paths["checkpoint"]).parent
        dtype = dtype_name(mindspore_dtype)
        if transformer is None:
            transformer = load_transformer(paths["checkpoint"], paths["model"], dtype, kv_compress, log=log,
                                           lora_path=lora_path, lora_scale=lora_scale, cls=PixArtTransformer2DModel)
        if vae is None:
            vae = cpu.accelerate(load_vae(paths["vae_root"], dtype_name(vae_dtype)))
        if text_encoder is ...:
            text_encoder = cpu.accelerate(load_t5(paths["text_encoder_root"],
                                                  dtype_name(text_encoder_dtype or mindspore_dtype)))
        if tokenizer is None and text_encoder is not None:
            tokenizer = load_tokenizer(paths["tokenizer_root"])
        sampler = scheduler or read_scheduler(folder) or "dpm"
        make_sampler(sampler)  # refuses an unknown name now, not at the first call
        target = cls
        if cls is PixArtPipeline:
            target = _PIPELINE_CLASSES.get(pipeline_class(folder), cls)
        return target(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      sampler=sampler)

    def save_pretrained(self, save_directory) -> None:
        """Write a diffusers pipeline folder that diffusers' PixArt pipelines load as it is: model_index.json,
        transformer/ (diffusers names), vae/, text_encoder/, tokenizer/, scheduler/ (our sampler's diffusers
        scheduler)."""
        from pixart.pipelines.saving import save_pipeline
        save_pipeline(self, save_directory)

    # -- 1. text ---------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], max_sequence_length: int | None = None):
        """T5 features (N, 1, L, C) and masks (N, L) for `prompts` (see `encode_text`)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was released; pass prompt embeddings or reload the pipeline")
        return encode_text(self.text_encoder, self.tokenizer, prompts, max_sequence_length or self.max_sequence_length)

    def release_text_encoder(self):
        """Free T5 once prompts are encoded, so it is not resident while denoising."""
        self.text_encoder = None
        gc.collect()

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- the whole call ---------------------------------------------------------------------------------------
    def __call__(self, prompt=None, negative_prompt: str | list[str] = "", num_inference_steps: int | None = None,
                 timesteps=None, sigmas=None, guidance_scale: float = 4.5, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, eta: float = 0.0, generator=None,
                 latents=None, prompt_embeds=None, prompt_attention_mask=None, negative_prompt_embeds=None,
                 negative_prompt_attention_mask=None, output_type: str = "pil", return_dict: bool = True,
                 callback=None, callback_steps: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clean_caption: bool = False,
                 use_resolution_binning: bool = True, max_sequence_length: int | None = None,
                 sampler: str | None = None, seed: int | list[int] | None = None, uncond: str = "negative",
                 progress: bool = True, sampler_options: dict | None = None, image=None, mask_image=None,
                 strength: float = 0.8, mask_blur: float = 0.0):
        """diffusers' arguments with diffusers' meanings; beside them `sampler` (instead of the scheduler), `seed`
        (as `generator`), `uncond="y_embedding"` (the checkpoint's learned null caption as the unconditional
        branch, as the original repo samples), `sampler_options` and `progress`.

        `generator`: an int seed, a list of seeds (one per image), or a NumPy Generator (or a list of them, one per
        image) from which the initial latents are drawn as `generator.standard_normal((4, h, w))` per image, and the
        sampler's noise (eta > 0, SA-Solver) after them. A seed s means `np.random.default_rng(s)`: images do not
        depend on the device. `callback_on_step_end(pipe, i, t, {"latents": x})` may return {"latents": ...} to
        replace them and set `pipe._interrupt = True` to stop after step i. `output_type="latent"` returns the
        denoised latents; `pipe.decode_latents(latents, "np")` then gives exactly the "np" images.

        `timesteps=[...]`: a custom schedule (strictly decreasing, in 0..999) for the samplers that take one ("dpm",
        "lcm"; e.g. PixArt-Alpha-DMD's one step: `timesteps=[400], guidance_scale=1`); `sigmas` is not taken.
        Guidance is off at `guidance_scale <= 1` (diffusers' rule): the transformer then runs on the prompts alone.

        `image` (a path, PIL image or array; height and width default to its size): image-to-image as SDEdit. The
        image, scaled and cropped to the size generated (see `pixart.pipelines.image_inputs`), is VAE-encoded (the
        posterior mean), noised to the level of step k = steps - round(strength * steps) of the sampler's schedule
        with the initial noise, and denoised from there: round(strength * steps) transformer calls; strength 1 is
        text-to-image from the same noise, 0 the VAE round trip. LCM (without custom timesteps) follows diffusers'
        LCM img2img instead: its `steps` are re-spaced over the first int(K * strength) of its K distillation
        timesteps (K = original_inference_steps, 50) and all run (`steps` transformer calls), from the image noised
        to the first of them; fewer than `steps` kept is refused, as diffusers refuses it. `mask_image` (white = repaint) makes it
        inpainting: after every step the kept region's latents are replaced by the encoded image noised to the
        level reached (the clean image after the last step), and the decoded output keeps the VAE round trip of the
        input outside the mask (blended over the edge that `mask_blur`, in pixels, softens; output_type="latent"
        returns the blended latents, before that overlay).
        """
        # 1. check inputs: every error names the argument and what is allowed
        sampler = sampler or self.sampler
        if generator is not None and seed is not None:
            raise ValueError("pass generator or seed, not both")
        generator = seed if generator is None else generator
        if sigmas is not None:
            raise ValueError(f"sigmas: sampler {sampler!r} takes a custom schedule as timesteps=[...], not sigmas")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        if uncond not in ("negative", "y_embedding"):
            raise ValueError(f"uncond must be 'negative' or 'y_embedding', got {uncond!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs may hold {', '.join(CALLBACK_TENSOR_INPUTS)}, "
                             f"got {', '.join(map(repr, bad))}")
        if not isinstance(callback_steps, int) or callback_steps < 1:
            raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
        if clean_caption:
            captions.check_available()  # one line naming beautifulsoup4 / ftfy when missing
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        max_length = int(max_sequence_length or self.max_sequence_length)
        legacy = isinstance(prompt_embeds, tuple)  # our (features, mask): prompts may stay as the record
        if prompt_embeds is not None:
            if prompt is not None and not legacy:
                raise ValueError("pass prompt or prompt_embeds, not both")
            y, mask = _embeddings(prompt_embeds, prompt_attention_mask, "prompt_embeds")
            prompts = _as_list(prompt, "prompt", len(y)) if prompt is not None else [""] * len(y)
        elif prompt is None or (not isinstance(prompt, str) and not list(prompt)):
            raise ValueError(f"prompt must be a non-empty string or list of strings (or pass prompt_embeds), got "
                             f"{prompt!r}")
        else:
            prompts = _as_list(prompt, "prompt")
        if negative_prompt_embeds is not None:
            y_neg, mask_neg = _embeddings(negative_prompt_embeds, negative_prompt_attention_mask,
                                          "negative_prompt_embeds")
            if len(y_neg) != len(prompts):
                raise ValueError(f"negative_prompt_embeds has batch size {len(y_neg)}, prompt_embeds "
                                 f"{len(prompts)}: they must match")
            negatives = [""] * len(prompts) if negative_prompt is None else \
                _as_list(negative_prompt, "negative_prompt", None)
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        else:
            negatives = _as_list(negative_prompt if negative_prompt is not None else "", "negative_prompt")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; pass "
                                 f"one string or {len(prompts)}")
        steps = num_inference_steps or DEFAULT_STEPS.get(sampler)
        options = dict(sampler_options or {})
        if eta and sampler in ("ddim", "sa"):
            options.setdefault("eta", eta)
        if timesteps is not None:
            options["timesteps"] = list(np.asarray(timesteps).reshape(-1))
        init_image, inpaint_mask = self._check_image_inputs(image, mask_image, strength, mask_blur)
        respaced = (init_image is not None and timesteps is None and 0.0 < float(strength) < 1.0
                    and getattr(SAMPLERS.get(sampler), "STRENGTH_RESPACES", False))
        if respaced:  # LCM: all its steps, re-spaced below the level strength selects (diffusers' LCM img2img)
            options["strength"] = float(strength)
        sampler_impl = make_sampler(sampler, **options)
        if timesteps is not None:
            steps = len(options["timesteps"])
        if steps is None or int(steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        levels = sampler_impl.noise_levels(int(steps))  # also refuses a schedule that repeats timesteps
        if init_image is not None:
            height, width = height or init_image.height, width or init_image.width
        height, width = height or self.resolution, width or self.resolution
        orig_hw = (int(height), int(width))
        check_image_size(*orig_hw, self.transformer.patch_size, use_resolution_binning)
        if use_resolution_binning:
            height, width, _ = closest_bucket(height, width, self._table_resolution())
        n = len(prompts) * num_images_per_prompt
        shape = (4, height // 8, width // 8)
        seeds, rngs = self._generators(generator, n)
        if latents is not None:
            latents = np.asarray(latents.asnumpy() if isinstance(latents, Tensor) else latents, np.float32)
            if latents.shape != (n, *shape):
                raise ValueError(f"latents must have shape {(n, *shape)} for {n} images of {height}x{width}, got "
                                 f"{latents.shape}")

        if clean_caption:  # as diffusers: what is encoded is cleaned, prompts and negative prompts alike
            prompts, negatives = captions.clean_captions(prompts), captions.clean_captions(negatives)
        # 2. encode prompts: [negative, positive] as diffusers orders the guidance batch
        if prompt_embeds is None:
            y, mask = self.encode_prompt(prompts, max_length)
        y, mask = (np.repeat(a, num_images_per_prompt, 0) for a in (y, mask))
        do_cfg = guidance_scale > 1.0  # diffusers' do_classifier_free_guidance: off, no unconditional branch
        if not do_cfg:
            y_neg = mask_neg = None
        elif uncond == "y_embedding":  # the checkpoint's learned null caption, with the prompt's mask (original repo)
            null = self.transformer.y_embedder.y_embedding.asnumpy()
            if null.shape[0] != y.shape[2]:
                raise ValueError(f"y_embedding has {null.shape[0]} tokens but prompts are encoded to {y.shape[2]}")
            y_neg, mask_neg = np.broadcast_to(null[None, None], y.shape).copy(), mask
        else:
            if negative_prompt_embeds is None:
                y_neg, mask_neg = self.encode_prompt(negatives, y.shape[2])
            y_neg, mask_neg = (np.repeat(a, num_images_per_prompt, 0) for a in (y_neg, mask_neg))
        y_in = np.concatenate([y_neg, y]) if do_cfg else y
        mask_in = np.concatenate([mask_neg, mask]) if do_cfg else mask

        # 3. prepare latents: one NumPy generator per image, so results do not depend on the device
        if latents is None:
            latents = np.stack([g.standard_normal(shape) for g in rngs]).astype(np.float32)
        hook = self._step_callback(callback, callback_steps, callback_on_step_end)
        start, x_T = 0, latents
        if init_image is not None:  # SDEdit: the encoded image noised to the level of the first step run
            start = 0 if respaced else int(steps) - round(float(strength) * int(steps))
            x_0 = np.repeat(self.encode_image(init_image, height, width), n, 0)
            x_T = self._noised(x_0, latents, levels, start, pure_at_start=not respaced)
            if inpaint_mask is not None:
                hook = self._blend_known(hook, x_0, latents, levels,
                                         latent_mask(inpaint_mask, height, width, mask_blur))

        # 4. denoise
        model_fn = self._guided_denoiser(Tensor(y_in), Tensor(mask_in.astype(np.int32)), guidance_scale, do_cfg,
                                         height, width, n)
        self._interrupt = False
        x = sampler_impl.sample(model_fn, Tensor(x_T), num_steps=int(steps), progress=progress,
                                generator=rngs[0] if seeds is None else np.random.default_rng(seeds[0] + 1),
                                callback=hook, start=start)

        # 5. decode and 6. post-process
        x = x.asnumpy()
        settings = [dict(prompt=prompts[i // num_images_per_prompt], negative_prompt=negatives[i // num_images_per_prompt],
                         seed=None if seeds is None else seeds[i], sampler=sampler, steps=int(steps),
                         guidance_scale=guidance_scale, height=orig_hw[0], width=orig_hw[1]) for i in range(n)]
        for record in settings:
            if timesteps is not None:
                record["timesteps"] = [int(t) for t in options["timesteps"]]
            if init_image is not None:
                record["strength"] = float(strength)
                if inpaint_mask is not None:
                    record["mask_blur"] = float(mask_blur)
        if output_type == "latent":
            images = x
        else:
            overlay = None
            if inpaint_mask is not None:  # the kept region as the VAE gives the input back, pixel for pixel
                overlay = (self.decode(x_0[:1]), pixel_mask(inpaint_mask, height, width, mask_blur))
            images = self.decode_latents(x, output_type, orig_hw if use_resolution_binning else None, overlay)
        out = PipelineOutput(images=images, latents=x, settings=settings)
        return out if return_dict else out.to_tuple()

    def decode_latents(self, latents, output_type: str = "np", size: tuple[int, int] | None = None, overlay=None):
        """Denoised latents (what output_type="latent" returns) -> images as `output_type` ("pil", "np": (N, H, W, 3)
        in [0, 1], "ms": a (N, 3, H, W) Tensor in [0, 1]), resized and cropped to `size` (height, width) when the
        latents were generated in a bucket of another size. `overlay` = (kept (1, 3, H, W) in [-1, 1], repaint
        weights (H, W)): inpainting's output is the decoded image where the mask repaints and `kept` elsewhere;
        latent blending alone cannot give that, since every decoded pixel depends on all latents (GroupNorm)."""
        images = self.decode(np.asarray(latents, np.float32))
        if overlay is not None:
            kept, weight = overlay
            images = images * weight + kept * (1.0 - weight)
        if size is not None and images.shape[-2:] != tuple(size):
            images = resize_and_crop_array(images, *size)
        images = np.clip(images / 2 + 0.5, 0, 1)
        if output_type == "ms":
            return Tensor(images)
        images = images.transpose(0, 2, 3, 1)  # (N, H, W, 3) in [0, 1]
        if output_type == "pil":
            return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
        return images

    def encode_image(self, image, height: int, width: int) -> np.ndarray:
        """An image (anything `load_image` reads) scaled and cropped to height x width -> its latents (1, 4, h, w)
        in the transformer's space: the VAE posterior's mean, shifted and scaled as `decode` undoes."""
        pixels = image_tensor(load_image(image), height, width)
        mean, _ = self.vae.encode(Tensor(pixels))
        shift = self.vae.config.shift_factor or 0.0
        return ((mean.asnumpy() - shift) * self.scaling_factor).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unscaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [-1, 1], one image at a time. From 2K on
        (`tiled_decode_from` latent pixels) the VAE decodes overlapping tiles of its own training size, which bounds
        memory; below it the decode is whole, exactly as diffusers' default."""
        tile = max(self.vae.config.sample_size // 8, 32)
        shift = self.vae.config.shift_factor or 0.0
        out = []
        for z in latents:
            z = Tensor(z[None] / self.scaling_factor + shift)
            big = max(z.shape[-2:]) >= self.tiled_decode_from
            image = self.vae.decode_tiled(z, tile=tile, overlap=tile // 4) if big else self.vae.decode(z)
            out.append(image.astype(ms.float32).asnumpy())
        return np.concatenate(out)

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _check_image_inputs(image, mask_image, strength, mask_blur):
        """(the input image as PIL or None, the mask as PIL or None), refusing what cannot be used."""
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: the picture to inpaint")
        if image is None:
            return None, None
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}") from None
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 repaints it all), got {strength}")
        try:
            mask_blur = float(mask_blur)
        except (TypeError, ValueError):
            mask_blur = -1.0
        if not 0.0 <= mask_blur < float("inf"):
            raise ValueError(f"mask_blur must be a number of pixels >= 0, got {mask_blur!r}")
        return load_image(image), None if mask_image is None else load_mask(mask_image)

    @staticmethod
    def _noised(x_0: np.ndarray, noise: np.ndarray, levels, k: int, pure_at_start: bool = True) -> np.ndarray:
        """x_0 at the noise level before step k: noise itself at k = 0 (text-to-image exactly) unless not
        `pure_at_start` (a schedule re-spaced by strength starts lower), x_0 after the last."""
        alpha, sigma = levels
        if k == 0 and pure_at_start:
            return noise
        if k == len(alpha) - 1:
            return x_0
        return (alpha[k] * x_0 + sigma[k] * noise).astype(np.float32)

    def _blend_known(self, hook, x_0: np.ndarray, noise: np.ndarray, levels, mask: np.ndarray):
        """The per-step hook with inpainting's latent blending first: after step k the kept region (mask 0) is
        the input image noised to the level step k leaves (the image itself after the last step)."""
        repaint, keep = Tensor(mask), Tensor(1.0 - mask)

        def blend(k, t, x):
            x = x * repaint + Tensor(self._noised(x_0, noise, levels, k + 1)) * keep
            return hook(k, t, x) if hook is not None else (x, self._interrupt)
        return blend

    def _table_resolution(self) -> int:
        res = min(ASPECT_RATIOS, key=lambda r: abs(r - self.resolution))
        return res

    @staticmethod
    def _generators(generator, n: int) -> tuple[list[int] | None, list[np.random.Generator]]:
        """(the seeds, when seeds were given, else None; one NumPy generator per image) from `generator`: None (a
        fresh seed), an int (seed + i for image i), a list of n ints, a NumPy Generator (shared by every image) or
        a list of n of them."""
        if isinstance(generator, np.random.Generator):
            return None, [generator] * n
        if generator is None:
            base = int(np.random.default_rng().integers(0, 2 ** 31 - n))
            seeds = [base + i for i in range(n)]
        elif isinstance(generator, (int, np.integer)):
            seeds = [int(generator) + i for i in range(n)]
        else:
            items = list(generator)
            if len(items) != n:
                raise ValueError(f"generator has {len(items)} entries for {n} images; pass one seed, or {n}")
            if all(isinstance(g, np.random.Generator) for g in items):
                return None, items
            if not all(isinstance(g, (int, np.integer)) for g in items):
                raise ValueError("generator must be an int seed, a list of seeds, a numpy.random.Generator or a "
                                 f"list of them, got {generator!r}")
            seeds = [int(s) for s in items]
        return seeds, [np.random.default_rng(s) for s in seeds]

    def _step_callback(self, callback, callback_steps: int, on_step_end):
        """The samplers' per-step hook (see `pixart.diffusion.common.after_step`) for diffusers' `callback`
        (every `callback_steps` steps, told (i, t, latents)) and `callback_on_step_end` (may replace latents,
        may stop by setting `pipe._interrupt`)."""
        if callback is None and on_step_end is None:
            return None

        def hook(i, t, x):
            if on_step_end is not None:
                out = on_step_end(self, i, t, {"latents": x}) or {}
                x = out.get("latents", x)
                x = x if isinstance(x, Tensor) else Tensor(np.asarray(x, np.float32))
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x)
            return x, self._interrupt
        return hook

    def denoiser_parts(self, height: int, width: int):
        """The transformer's (encode_caption, denoise) for images of height x width (the ControlNet pipeline gives
        denoise its condition here)."""
        return self.transformer.sampler_parts()

    def _guided_denoiser(self, y, mask, guidance_scale: float, do_cfg: bool, height: int, width: int, n: int):
        """model_fn(x, t) for the samplers: the transformer on [uncond, cond], guided on all 4 noise channels;
        the learned-variance channels come from the conditional half (IDDPM uses them)."""
        model, c = self.transformer, 4
        batch = 2 * n if do_cfg else n
        data_info = None
        if model.micro_condition:
            data_info = {"img_hw": Tensor(np.tile(np.array([[height, width]], np.float32), (batch, 1))),
                         "aspect_ratio": Tensor(np.full((batch, 1), height / width, np.float32))}

        encode_caption, denoise = self.denoiser_parts(height, width)
        caption_kv = encode_caption(y)  # once per prompt: the caption's keys and values for every block

        def model_fn(x, t):
            x_in = mint.cat([x, x]) if do_cfg else x
            t_in = t.reshape(-1)
            t_in = mint.cat([t_in, t_in]) if do_cfg else t_in
            out = denoise(x_in, t_in.astype(ms.float32), caption_kv, mask, data_info).astype(ms.float32)
            if not do_cfg:
                return out
            uncond, cond = out[:n], out[n:]
            eps = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
            return mint.cat([eps, cond[:, c:]], 1) if out.shape[1] > c else eps
        return model_fn


class PixArtAlphaPipeline(PixArtPipeline):
    """PixArt-α under diffusers' name: the one pipeline (120 caption tokens by the model)."""


class PixArtSigmaPipeline(PixArtPipeline):
    """PixArt-Σ under diffusers' name: the one pipeline (300 caption tokens by the model)."""


_PIPELINE_CLASSES = {"PixArtAlphaPipeline": PixArtAlphaPipeline, "PixArtSigmaPipeline": PixArtSigmaPipeline}
