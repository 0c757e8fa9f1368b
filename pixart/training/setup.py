"""Building a training run from its options: device and ranks, data (labels, buckets, cache, encoders), the model
(PixArt's initialisation or pretrained weights), and the optimisation (optimizer, EMA, loss scaling, train step).

The order of work: device and ranks -> data -> encoders (only what the cache lacks) -> model -> loss, optimizer,
EMA, train step; `pixart.training.trainer` runs them in that order for every kind of fine-tuning.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import mindspore as ms

from pixart import backend, cpu
from pixart.io import load_into
from pixart.models.convert import fill_null_caption
from pixart.cpu.blockwise import BlockwiseTrainStep, refusal
from pixart.data import dreambooth
from pixart.data.dataset import BatchStream, open_dataset
from pixart.data.features import FeatureCache, ImageEncoder, TextEncoder
from pixart.data.sources import source_from_args
from pixart.diffusion.loss import DiffusionLoss
from pixart.models.pixart import KVCompression, PixArt, preset_config
from pixart.training import distributed
from pixart.training.batch import BatchBuilder, timestep_weights
from pixart.training.dreambooth import PriorBatchBuilder, PriorPreservationLoss
from pixart.training.ema import EMA
from pixart.training.optimizers import auto_scale_lr, build_optimizer
from pixart.training.step import TrainStep


class TrainError(ValueError):
    """Bad training input; the message is one line for the user."""


def default_flag(dest: str) -> str:
    """How error messages name an option (the LoRA script passes its own: `--train_batch_size` for batch_size)."""
    return f"--{dest}"


def start(args, mode: str) -> distributed.Context:
    """Device and execution `mode` ("graph" or "pynative"), precision checks, ranks: the distributed Context."""
    backend.setup(args.device_target, mode, args.jit_level, args.enable_flash_attention, args.threads)
    for name in ("mixed_precision", "text_encoder_dtype", "vae_dtype"):  # bf16 on CPU fails here, before loading
        backend.dtype(getattr(args, name))
    return distributed.init(args.use_parallel)


@dataclasses.dataclass
class Data:
    """The training data and what turns it into model inputs: labels in buckets, cache, encoders, latent facts."""
    dataset: object
    cache: object
    text_encoder: object
    image_encoder: object
    resolution: int
    multi_scale: bool
    max_length: int
    caption_channels: int
    latent_channels: int
    vae_factor: int
    scaling: float
    global_batch: int
    classes: object = None      # DreamBooth's class images (prior preservation), batched after the instance images


def data_settings(args) -> tuple[int, bool, int]:
    """(bucket-table resolution, aspect-ratio buckets or square crops, caption tokens): the flags or the preset's."""
    preset = preset_config(args.model)
    resolution = args.resolution or preset.input_size * 8
    multi_scale = args.multi_scale if args.multi_scale is not None else args.model.endswith(("-MS", "-MS-KV"))
    multi_scale = multi_scale and not dreambooth.enabled(args)  # DreamBooth: square crops, as diffusers'
    return resolution, multi_scale, args.max_length or preset.model_max_length


def prepare_data(args, ctx, log, flag: Callable[[str], str] = default_flag) -> Data:
    """Cache (if any), labels and buckets, then encoders for what the cache does not hold."""
    resolution, multi_scale, max_length = data_settings(args)
    cache = FeatureCache(args.feature_dir) if args.feature_dir else None
    if cache is not None:
        cache.check_compatible(resolution, multi_scale, max_length, args.random_flip)
    captions = ("prompt", "sharegpt4v") if args.real_prompt_ratio < 1.0 else ("prompt",)
    source = dreambooth.instance_source(args) if dreambooth.enabled(args) else source_from_args(args)
    dataset = open_dataset(source, resolution, multi_scale=multi_scale,
                           check_images=not (cache and cache.has_latents) or controlnet_condition(args),
                           available=(lambda e: cache.missing(e, captions)) if cache else None,
                           rank=ctx.rank, world_size=ctx.world_size, seed=args.seed)
    log.info(dataset.summary())
    global_batch = args.batch_size * ctx.world_size
    dataset.check_batch_size(global_batch, f"{flag('batch_size')} {args.batch_size} x {ctx.world_size} rank(s)")
    for key in dataset.unused_buckets(global_batch):
        log.info(f"note: bucket {key} has {len(dataset.buckets[key])} image(s), fewer than a batch of {global_batch}: "
                 "never trained")
    no_caption = sum(1 for e in dataset.entries if not e.sharegpt4v)
    if args.real_prompt_ratio < 1.0 and no_caption:
        log.info(f"note: {no_caption} entries have no sharegpt4v caption; they always train on their prompt")

    text_encoder = image_encoder = None
    if not (cache and cache.has_text):
        if not args.text_encoder_root:
            raise TrainError(f"{flag('text_encoder_root')} is required: captions are not cached "
                             f"({flag('feature_dir')})")
        text_encoder = TextEncoder(args.text_encoder_root, args.tokenizer_root, max_length, args.text_encoder_dtype)
    if not (cache and cache.has_latents) or controlnet_condition(args):  # ControlNet: conditions encode on the fly
        if not args.vae_root:
            raise TrainError(f"{flag('vae_root')} is required: latents are not cached ({flag('feature_dir')})")
        image_encoder = ImageEncoder(args.vae_root, args.vae_dtype)
    return Data(
        dataset=dataset, cache=cache, text_encoder=text_encoder, image_encoder=image_encoder, resolution=resolution,
        multi_scale=multi_scale, max_length=max_length, global_batch=global_batch,
        caption_channels=text_encoder.channels if text_encoder else cache.meta["text_channels"],
        latent_channels=image_encoder.latent_channels if image_encoder else cache.meta["latent_channels"],
        vae_factor=image_encoder.vae.downsample_factor if image_encoder else cache.meta.get("vae_factor", 8),
        scaling=args.sd_scale_factor or (image_encoder.scaling_factor if image_encoder
                                         else cache.meta["scaling_factor"]))


def model_config(args, caption_channels: int, weights=None):
    """The preset, reduced by --depth / --hidden_size / --num_heads, or else to the pretrained `weights`' size
    (a PixArtConfig read off them), with --max_length and KV compression."""
    overrides = {}
    for k in ("depth", "hidden_size", "num_heads"):
        value = getattr(args, k)
        if value is None and weights is not None and args.depth is None and args.hidden_size is None:
            value = getattr(weights, k)
        if value is not None:
            overrides[k] = value
    if args.hidden_size is not None and args.num_heads is None:
        overrides["num_heads"] = max(1, args.hidden_size // 72)
    cfg = preset_config(args.model, caption_channels=caption_channels, **overrides)
    if cfg.hidden_size % cfg.num_heads:
        raise TrainError(f"--hidden_size {cfg.hidden_size} is not divisible by --num_heads {cfg.num_heads}")
    if args.max_length is not None:
        cfg.model_max_length = args.max_length
    if args.kv_compress:
        cfg.kv_compress_config = KVCompression.from_options(args.kv_compress_sampling, args.kv_compress_scale_factor,
                                                            args.kv_compress_layer, cfg.depth).config()
    return cfg


def build_model(args, data: Data, log, pretrained=None):
    """PixArt for `data`: PixArt's initialisation from --seed, or the `pretrained` (state, config) of
    `pixart.models.convert.convert_pixart` loaded into it."""
    cfg = model_config(args, data.caption_channels, pretrained[1] if pretrained else None)
    if cfg.in_channels != data.latent_channels:
        raise TrainError(f"the model takes {cfg.in_channels} latent channels, the VAE gives {data.latent_channels}")
    model = PixArt(cfg)
    if pretrained is None:
        model.initialize_weights(args.seed)
    else:
        state = dict(pretrained[0])
        fill_null_caption(state, dataclasses.replace(cfg), cfg.model_max_length, log.info)
        load_into(model, state, what=f"{args.load_from} into the {cfg.depth}-block model")
        log.info(f"loaded pretrained weights {args.load_from}")
    return model


def for_training(model, args):
    """Recompute (per block) and mixed precision: the Cell the loss runs. Call after any layer surgery (LoRA).
    Where recompute is host-driven (`build_optimisation`), the blocks are left as they are."""
    cpu.accelerate(model)
    if args.recompute and not _host_recompute(args, model):
        for block in model.blocks:
            block.recompute()
    if args.mixed_precision == "fp32":
        return model
    dtype = backend.dtype(args.mixed_precision)  # bf16 on CPU fails here with a clear message
    return ms.amp.auto_mixed_precision(model, "auto", dtype)


def _host_recompute(args, model) -> bool:
    """--recompute as block-by-block backpropagation from the host (pixart.cpu.blockwise): MindSpore CPU graph
    mode with fp32 weights (mixed precision wraps the model, which the block graphs do not see through), for a
    model it can train (no LoRA dropout)."""
    return (args.recompute and cpu.host_driven_recompute() and args.mixed_precision == "fp32"
            and refusal(model) is None)


@dataclasses.dataclass
class Optimisation:
    optimizer: object
    ema: object
    step_cell: object
    lr: float
    effective_batch: int
    dynamic: bool


def build_optimisation(args, compute_model, params, ctx, global_batch: int, log, use_ema: bool,
                       loss_fn=None) -> Optimisation:
    """Optimizer over `params`, EMA, loss scaling and the train step (see pixart.training.step) of `loss_fn`
    (default: the diffusion loss of `compute_model`, DreamBooth's with prior preservation)."""
    effective = global_batch * args.grad_accumulation
    lr, ratio = auto_scale_lr(args.learning_rate, effective, args.auto_lr)
    if args.auto_lr != "none":
        log.info(f"auto_lr ({args.auto_lr}): lr {args.learning_rate:g} x {ratio:.4f} = {lr:.3g} for an effective "
                 f"batch of {effective}")
    try:
        optimizer = build_optimizer(args.optimizer, params, lr, args.betas, args.eps, args.weight_decay)
    except ValueError as e:
        raise TrainError(str(e)) from None
    ema = EMA(optimizer.parameters, args.ema_rate) if use_ema else None
    dynamic = args.loss_scaler == "dynamic" or (args.loss_scaler == "auto" and args.mixed_precision == "fp16")
    init_scale = args.init_loss_scale or (65536.0 if dynamic else 1.0)
    if loss_fn is None:
        loss_fn = PriorPreservationLoss(compute_model, args.prior_loss_weight, snr_gamma=args.snr_gamma) \
            if prior_preservation(args) else DiffusionLoss(compute_model, snr_gamma=args.snr_gamma)
    step_cell = TrainStep(loss_fn, optimizer, ema, args.clip_grad, args.grad_accumulation,
                          ctx.world_size, init_scale, dynamic, scale_factor=args.loss_scale_factor,
                          scale_window=args.loss_scale_window)
    step_cell.set_train(True)
    cpu.accelerate_step(step_cell)
    if _host_recompute(args, compute_model):
        step_cell = BlockwiseTrainStep(step_cell)
        log.info("recompute: block by block (one compiled forward and backward graph per block structure)")
    elif args.recompute and args.mixed_precision == "fp32" and cpu.host_driven_recompute():
        log.info(f"recompute: inside one graph (it saves no memory on CPU): {refusal(compute_model)}")
    return Optimisation(optimizer, ema, step_cell, lr, effective, dynamic)


def open_stream(args, data: Data, ctx, batches_done: int, flag: Callable[[str], str] = default_flag):
    """(batch stream from `batches_done` on, batch builder, optimizer steps per epoch, last step)."""
    stream = BatchStream(data.dataset, args.batch_size, args.seed, ctx.rank, ctx.world_size, start=batches_done,
                         agree=ctx.min_over_ranks)
    steps_per_epoch = stream.per_epoch // args.grad_accumulation
    if steps_per_epoch == 0 and args.max_steps is None:
        raise TrainError(f"one epoch has {stream.per_epoch} batches, fewer than {flag('grad_accumulation')} "
                         f"{args.grad_accumulation}; set {flag('max_steps')}")
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    builder = batch_builder(args, data, data.dataset)
    if data.classes is not None:
        builder = PriorBatchBuilder(builder, batch_builder(args, data, data.classes), data.classes, args.batch_size,
                                    args.seed, ctx.rank, ctx.world_size)
    return stream, builder, steps_per_epoch, max_steps


def batch_builder(args, data: Data, dataset) -> BatchBuilder:
    """The model inputs of `dataset`'s batches (the training set's, or DreamBooth's class images)."""
    return BatchBuilder(dataset, args.seed, data.max_length, data.scaling, data.latent_channels,
                        data.vae_factor, real_prompt_ratio=args.real_prompt_ratio,
                        class_dropout_prob=args.class_dropout_prob, random_flip=args.random_flip,
                        sample_posterior=args.sample_posterior, cache=data.cache,
                        text_encoder=data.text_encoder, image_encoder=data.image_encoder,
                        workers=getattr(args, "num_parallel_workers", 1),
                        timestep_weights=timestep_weights(
                            args.timestep_bias_strategy, multiplier=args.timestep_bias_multiplier,
                            portion=args.timestep_bias_portion, begin=args.timestep_bias_begin,
                            end=args.timestep_bias_end),
                        noise_offset=args.noise_offset)


def controlnet_condition(args) -> bool:
    """ControlNet training: condition latents ride with the batch (`pixart.training.controlnet`)."""
    return bool(getattr(args, "controlnet", False))


def prior_preservation(args) -> bool:
    """DreamBooth with prior preservation: class images batched after the instance images, the weighted loss."""
    return dreambooth.enabled(args) and bool(getattr(args, "with_prior_preservation", False))
