"""Text-to-image with PixArt-α / Σ: prompts -> T5 -> denoise with classifier-free guidance -> VAE -> images.

    pipe = PixArtPipeline.from_pretrained(checkpoint="models/PixArt-Sigma-XL-2-1024-MS.ckpt",
                                          model="PixArt-Sigma-XL-2-1024-MS",
                                          text_encoder_root="models/t5-v1_1-xxl", vae_root="models/sdxl-vae")
    images = pipe("a small cactus with a happy face in the Sahara desert", seed=0).images
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint
from PIL import Image

from pixart import backend
from pixart.data.buckets import ASPECT_RATIOS, closest_bucket, resize_and_crop_array
from pixart.diffusion import DEFAULT_STEPS, make_sampler
from pixart.models.t5 import encode_prompts
from pixart.pipelines.loading import load_components


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
    ids, mask = encode_prompts(tokenizer, [p.lower().strip() for p in prompts], max_length)
    with backend.eager():
        emb = text_encoder(Tensor(ids), Tensor(mask)).astype(ms.float32).asnumpy()
    return emb[:, None], mask


@dataclass
class PipelineOutput:
    images: list                     # PIL images, or (N, H, W, 3) float arrays in [0, 1] with output_type="np"
    latents: np.ndarray              # final latents (N, 4, h, w), unscaled
    settings: list = field(default_factory=list)  # per image: prompt, seed, sampler, steps, guidance, size


class PixArtPipeline:
    """The documented Python API; every component is a MindSpore Cell already loaded."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, scaling_factor: float,
                 max_sequence_length: int | None = None):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scaling_factor = scaling_factor
        self.max_sequence_length = max_sequence_length or transformer.config.model_max_length
        self.resolution = transformer.config.input_size * 8  # the training size picks the aspect-ratio table
        self.tiled_decode_from = 256  # latent pixels: images of 2048 px and more decode in tiles

    @classmethod
    def from_pretrained(cls, **kwargs) -> "PixArtPipeline":
        """Load every component; see `pixart.pipelines.loading.load_components` for the arguments."""
        return cls(**load_components(**kwargs))

    # -- 1. text ---------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]):
        """T5 features (N, 1, L, C) and masks (N, L) for `prompts` (see `encode_text`)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was released; pass prompt embeddings or reload the pipeline")
        return encode_text(self.text_encoder, self.tokenizer, prompts, self.max_sequence_length)

    def release_text_encoder(self):
        """Free T5 once prompts are encoded, so it is not resident while denoising."""
        self.text_encoder = None
        gc.collect()

    # -- the whole call ---------------------------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt: str | list[str] = "", height: int | None = None,
                 width: int | None = None, sampler: str = "dpm", num_inference_steps: int | None = None,
                 guidance_scale: float = 4.5, num_images_per_prompt: int = 1, seed: int | list[int] | None = None,
                 latents: np.ndarray | None = None, use_resolution_binning: bool = True, uncond: str = "negative",
                 prompt_embeds=None, negative_prompt_embeds=None, output_type: str = "pil",
                 progress: bool = True, sampler_options: dict | None = None) -> PipelineOutput:
        # 1. check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if prompt_embeds is None and (not prompts or any(not isinstance(p, str) for p in prompts)):
            raise ValueError(f"prompt must be a non-empty string or list of strings, got {prompt!r}")
        if prompt_embeds is not None:
            prompts = prompts or [""] * len(prompt_embeds[0])
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        if uncond not in ("negative", "y_embedding"):
            raise ValueError(f"uncond must be 'negative' or 'y_embedding', got {uncond!r}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        steps = num_inference_steps or DEFAULT_STEPS.get(sampler)
        sampler_impl = make_sampler(sampler, **(sampler_options or {}))
        if steps is None or int(steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        height, width = height or self.resolution, width or self.resolution
        orig_hw = (int(height), int(width))
        check_image_size(*orig_hw, self.transformer.patch_size, use_resolution_binning)
        if use_resolution_binning:
            height, width, _ = closest_bucket(height, width, self._table_resolution())
        n = len(prompts) * num_images_per_prompt

        # 2. encode prompts: [negative, positive] as diffusers orders the guidance batch
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompts)
        y, mask = (np.repeat(a, num_images_per_prompt, 0) for a in prompt_embeds)
        if uncond == "y_embedding":  # the checkpoint's learned null caption, with the prompt's mask (original repo)
            null = self.transformer.y_embedder.y_embedding.asnumpy()
            if null.shape[0] != y.shape[2]:
                raise ValueError(f"y_embedding has {null.shape[0]} tokens but prompts are encoded to {y.shape[2]}")
            y_neg, mask_neg = np.broadcast_to(null[None, None], y.shape).copy(), mask
        else:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(negatives)
            y_neg, mask_neg = (np.repeat(a, num_images_per_prompt, 0) for a in negative_prompt_embeds)
        do_cfg = guidance_scale > 1.0
        y_in = np.concatenate([y_neg, y]) if do_cfg else y
        mask_in = np.concatenate([mask_neg, mask]) if do_cfg else mask

        # 3. prepare latents: one seed per image, NumPy's generator so results do not depend on the device
        seeds = self._seeds(seed, n)
        shape = (4, height // 8, width // 8)
        if latents is None:
            latents = np.stack([np.random.default_rng(s).standard_normal(shape) for s in seeds]).astype(np.float32)
        latents = np.asarray(latents, np.float32)
        if latents.shape != (n, *shape):
            raise ValueError(f"latents must have shape {(n, *shape)}, got {latents.shape}")

        # 4. denoise
        model_fn = self._guided_denoiser(Tensor(y_in), Tensor(mask_in.astype(np.int32)), guidance_scale, do_cfg,
                                         height, width, n)
        x = sampler_impl.sample(model_fn, Tensor(latents), num_steps=int(steps), progress=progress,
                                generator=np.random.default_rng(seeds[0] + 1))

        # 5. decode and 6. post-process
        x = x.asnumpy()
        images = self.decode(x)
        if use_resolution_binning and (height, width) != orig_hw:
            images = resize_and_crop_array(images, *orig_hw)
        images = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # (N, H, W, 3) in [0, 1]
        settings = [dict(prompt=prompts[i // num_images_per_prompt], negative_prompt=negatives[i // num_images_per_prompt],
                         seed=seeds[i], sampler=sampler, steps=int(steps), guidance_scale=guidance_scale,
                         height=orig_hw[0], width=orig_hw[1]) for i in range(n)]
        if output_type == "pil":
            images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
        return PipelineOutput(images=images, latents=x, settings=settings)

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
    def _table_resolution(self) -> int:
        res = min(ASPECT_RATIOS, key=lambda r: abs(r - self.resolution))
        return res

    @staticmethod
    def _seeds(seed, n: int) -> list[int]:
        if seed is None:
            base = int(np.random.default_rng().integers(0, 2 ** 31 - n))
            return [base + i for i in range(n)]
        if isinstance(seed, int):
            return [seed + i for i in range(n)]
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images")
        return seeds

    def _guided_denoiser(self, y, mask, guidance_scale: float, do_cfg: bool, height: int, width: int, n: int):
        """model_fn(x, t) for the samplers: the transformer on [uncond, cond], guided on all 4 noise channels;
        the learned-variance channels come from the conditional half (IDDPM uses them)."""
        model, c = self.transformer, 4
        batch = 2 * n if do_cfg else n
        data_info = None
        if model.micro_condition:
            data_info = {"img_hw": Tensor(np.tile(np.array([[height, width]], np.float32), (batch, 1))),
                         "aspect_ratio": Tensor(np.full((batch, 1), height / width, np.float32))}

        encode_caption, denoise = model.sampler_parts()
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
