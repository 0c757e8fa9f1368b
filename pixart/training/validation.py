"""Validation images during training: fixed prompts, fixed seeds, the sampling pipeline on the weights being trained.

Prompts (and negative prompts, default the empty caption) are encoded once at start-up (T5 is loaded for that if captions come from the cache, then freed) and the
VAE is kept for decoding; images go to <output_dir>/validation/step_XXXXXXXX/NN.png.
"""
from __future__ import annotations

import gc
from pathlib import Path

from pixart import cpu
from pixart.data.features import TextEncoder, pad_captions
from pixart.models.vae import load_vae
from pixart.pipelines.outputs import save_images
from pixart.pipelines.text_to_image import PixArtPipeline


class Validation:
    def __init__(self, model, args, max_length: int, scaling_factor: float, resolution: int, text_encoder=None,
                 log=print, prompts=None):
        self.prompts = list(prompts or args.validation_prompts)  # one image each, seeds validation_seed + i
        self.model = model
        self.steps, self.guidance, self.seed = args.validation_steps, args.validation_guidance, args.validation_seed
        self.size = resolution
        self.log = log
        encoder = text_encoder or TextEncoder(args.text_encoder_root, args.tokenizer_root, max_length,
                                              args.text_encoder_dtype)
        unique = {p: pad_captions(encoder([p]), max_length) for p in dict.fromkeys(self.prompts)}
        self.embeds = [unique[p] for p in self.prompts]
        negatives = getattr(args, "validation_negative_prompts", None) or [""] * len(self.prompts)
        unique_neg = {p: pad_captions(encoder([p]), max_length) for p in dict.fromkeys(negatives)}
        self.negatives = [unique_neg[p] for p in negatives]
        self.sampler = getattr(args, "sampling_method", "dpm")
        if text_encoder is None:
            del encoder
            gc.collect()
        vae = cpu.accelerate(load_vae(args.vae_root, args.vae_dtype))
        self.pipe = PixArtPipeline(transformer=model, vae=vae, text_encoder=None,
                                   tokenizer=None, scaling_factor=scaling_factor, max_sequence_length=max_length)

    def __call__(self, step: int, out_dir: Path) -> list[Path]:
        folder = Path(out_dir) / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        self.model.set_train(False)  # no dropout while sampling (LoRA dropout)
        try:
            for i, (prompt, emb, negative) in enumerate(zip(self.prompts, self.embeds, self.negatives)):
                result = self.pipe(prompt, height=self.size, width=self.size, sampler=self.sampler,
                                   num_inference_steps=self.steps, guidance_scale=self.guidance, seed=self.seed + i,
                                   prompt_embeds=emb, negative_prompt_embeds=negative, progress=False,
                                   use_resolution_binning=False)
                written += save_images(result, lambda *_: folder / f"{i:02d}.png", {"training_step": step})
        finally:
            self.model.set_train(True)
        self.log(f"validation: {len(written)} image(s) in {folder}")
        return written
