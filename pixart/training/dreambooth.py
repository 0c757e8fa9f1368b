"""DreamBooth in the one trainer (diffusers' `train_dreambooth*.py`): instance images with one instance prompt and,
with prior preservation, class images with the class prompt, for full fine-tuning and for LoRA alike.

* class images: when `--class_data_dir` holds fewer than `--num_class_images`, the missing ones are sampled from the
  model before it trains (the base weights; for LoRA, before the LoRA branches exist) with the class prompt.
  Image k is drawn with seed `--seed + k` and written as `class_0000k.png` through a temporary name, so an
  interrupted generation resumes where it stopped and never leaves half a file. Under msrun rank 0 draws them and
  the other ranks wait for the folder to fill.
* batches: each rank's batch of b instance samples is followed by b class samples, the class batch being the
  class set's batch of the same global index (so a resumed run and a data-parallel run see exactly the class
  images an uninterrupted single-process run sees); their random draws are keyed by slots after the instance
  batch's.
* the loss: instance loss + `--prior_loss_weight` x class loss, each the mean over its half of the batch, as
  diffusers computes it (`torch.chunk(model_pred, 2)`), with PixArt's per-sample loss (MSE + variational bound).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pixart.data import dreambooth as D
from pixart.data.dataset import BatchStream, BucketDataset
from pixart.data.features import pad_captions
from pixart.diffusion.loss import DiffusionLoss
from pixart.pipelines.outputs import save_png
from pixart.pipelines.text_to_image import PixArtPipeline


class PriorPreservationLoss(DiffusionLoss):
    """The batch is [instance samples; class samples] in equal halves: loss = mean(instance) + w * mean(class)."""

    def __init__(self, model, prior_loss_weight: float, **kwargs):
        super().__init__(model, **kwargs)
        self.prior_loss_weight = float(prior_loss_weight)

    def terms(self, out, x0, x_t, t, noise):
        _, per_sample = super().terms(out, x0, x_t, t, noise)
        loss = per_sample[0]
        half = loss.shape[0] // 2
        return loss[:half].mean() + self.prior_loss_weight * loss[half:].mean(), per_sample


def class_data(args, ctx, log, model, data) -> BucketDataset:
    """The class images of prior preservation (`data`: the run's `pixart.training.setup.Data`): the missing ones
    sampled with `model` first, then the first --num_class_images of them, square at the data's resolution."""
    generate_class_images(args, ctx, log, model, data.text_encoder, data.image_encoder.vae, data.scaling,
                          data.max_length, data.resolution)
    dataset = BucketDataset(D.class_source(args), data.resolution, multi_scale=False)
    log.info(f"class {dataset.summary()}")
    dataset.check_batch_size(data.global_batch, f"--batch_size {args.batch_size} x {ctx.world_size} rank(s)")
    return dataset


def generate_class_images(args, ctx, log, model, text_encoder, vae, scaling: float, max_length: int,
                          resolution: int) -> None:
    """Sample the class images --class_data_dir lacks with `model` (rank 0; the other ranks wait for them)."""
    folder = Path(args.class_data_dir)
    missing = D.missing_class_images(args)
    if not missing:
        return
    if not ctx.is_main:
        log.rank(f"waiting for rank 0 to sample {missing} class image(s) into {folder}")
        while D.missing_class_images(args):
            time.sleep(1.0)
        return
    folder.mkdir(parents=True, exist_ok=True)
    existing = set(D.folder_images(folder))
    todo, k = [], 0
    while len(todo) < missing:  # the first free class_0000k.png names: a rerun draws the same k with the same seed
        if D.CLASS_IMAGE_NAME.format(k) not in existing:
            todo.append(k)
        k += 1
    log.info(f"prior preservation: {len(existing)} class image(s) in {folder}, sampling {missing} more with "
             f"{args.class_prompt!r} ({args.class_inference_steps} steps, guidance {args.validation_guidance:g})")
    embeds = pad_captions(text_encoder([args.class_prompt]), max_length)
    negative = pad_captions(text_encoder([""]), max_length)
    pipe = PixArtPipeline(transformer=model, vae=vae, text_encoder=None, tokenizer=None, scaling_factor=scaling,
                          max_sequence_length=max_length)
    model.set_train(False)
    try:
        for k in tqdm(todo, desc="class images", unit="image"):
            result = pipe(args.class_prompt, height=resolution, width=resolution,
                          num_inference_steps=args.class_inference_steps, guidance_scale=args.validation_guidance,
                          seed=args.seed + k, prompt_embeds=embeds, negative_prompt_embeds=negative, progress=False,
                          use_resolution_binning=False)
            save_png(result.images[0], folder / D.CLASS_IMAGE_NAME.format(k),
                     {**result.settings[0], "seed": args.seed + k})
    finally:
        model.set_train(True)
    log.info(f"prior preservation: {folder} holds {args.num_class_images} class image(s)")


class PriorBatchBuilder:
    """A rank's instance batch (`instance(ref)`) followed by its part of the class set's batch of the same global
    index (`classes`, a BatchBuilder over the class dataset)."""

    def __init__(self, instance, classes, class_dataset, batch_size: int, seed: int, rank: int, world_size: int):
        self.instance, self.classes = instance, classes
        self.stream = BatchStream(class_dataset, batch_size, seed, rank, world_size)
        self.offset = batch_size * world_size  # class draws come after the instance batch's slots

    def __call__(self, ref) -> dict[str, np.ndarray]:
        first = self.instance(ref)
        self.stream.next_index = ref.index
        class_ref = next(self.stream)
        class_ref.slots = [s + self.offset for s in class_ref.slots]
        second = self.classes(class_ref)
        return {k: np.concatenate([first[k], second[k]]) for k in first}
