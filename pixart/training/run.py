"""What `train.py` does once its options are parsed: check, set up, train, checkpoint, log; and the pieces of it
that LoRA training (`pixart.training.lora_run`) shares.

The order of work: every check that needs no model (files, numbers, resume path) -> device and ranks -> data
(labels, buckets, cache) -> encoders (only what the cache lacks) -> model (init or --load_from) -> loss, optimizer,
EMA, train step -> resume -> the loop (lr, micro-batches, step, log, checkpoint, validation) -> final checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pixart.config import ArgumentParser, str2bool


class TrainError(ValueError):
    """Bad training input; the message is one line for the user."""


MODES = {"0": "graph", "graph": "graph", "1": "pynative", "pynative": "pynative"}


def default_flag(dest: str) -> str:
    """How error messages name an option (the LoRA script passes its own: `--train_batch_size` for batch_size)."""
    return f"--{dest}"


# ----------------------------------------------------------------------------------------------------------------
# Options: groups shared with the LoRA script, then train.py's parser
# ----------------------------------------------------------------------------------------------------------------
def add_model_args(p, model_default: str | None = "PixArt-Sigma-XL-2-512-MS"):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=model_default, help="preset (architecture and resolution)")
    g.add_argument("--depth", type=int, default=None, help="reduce the preset (tests, experiments)")
    g.add_argument("--hidden_size", type=int, default=None, help="reduce the preset; heads are 72 wide")
    g.add_argument("--num_heads", type=int, default=None)
    g.add_argument("--kv_compress", type=str2bool, default=False, help="Σ KV compression (2K)")
    g.add_argument("--kv_compress_sampling", default="conv", choices=["conv", "ave", "uniform"])
    g.add_argument("--kv_compress_scale_factor", type=int, default=2)
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None)
    return g


def add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--json_path", default=None, help="label JSON: [{path, prompt, sharegpt4v?, height, width, ratio}]")
    g.add_argument("--image_dir", default=None, help="folder the label paths are relative to")
    g.add_argument("--feature_dir", default=None, help="cache from tools/extract_features.py (T5 / VAE not loaded "
                   "for what it holds)")
    g.add_argument("--resolution", type=int, default=None, help="bucket table: 256/512/1024/2048 (default: preset)")
    g.add_argument("--multi_scale", type=str2bool, default=None,
                   help="aspect-ratio buckets (default: true for -MS presets, else square crops)")
    g.add_argument("--real_prompt_ratio", type=float, default=1.0,
                   help="probability of the label's prompt over its sharegpt4v caption")
    g.add_argument("--class_dropout_prob", "--proportion_empty_prompts", type=float, default=0.1,
                   help="caption dropout for classifier-free guidance (the learned null caption)")
    g.add_argument("--random_flip", type=str2bool, nargs="?", const=True, default=False,
                   help="mirror images at random (a bare --random_flip means true)")
    g.add_argument("--sample_posterior", type=str2bool, default=True, help="VAE posterior sample (else its mean)")
    g.add_argument("--vae_root", default=None, help="HF folder of the VAE (needed unless latents are cached)")
    g.add_argument("--text_encoder_root", default=None, help="HF folder of T5 (needed unless captions are cached)")
    g.add_argument("--tokenizer_root", default=None)
    g.add_argument("--text_encoder_dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--vae_dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--sd_scale_factor", type=float, default=None, help="latent scale (default: VAE config / cache)")
    g.add_argument("--max_length", "--max_token_length", type=int, default=None,
                   help="caption tokens (default: preset, 120 α / 300 Σ)")
    return g


def add_precision_args(g):
    g.add_argument("--mixed_precision", default="fp32", type=lambda v: "fp32" if v == "no" else v,
                   choices=["fp32", "fp16", "bf16"],
                   help="compute precision (weights and optimizer stay fp32; 'no' = fp32); fp16/bf16 are for Ascend")
    g.add_argument("--loss_scaler", default="auto", choices=["auto", "dynamic", "static"],
                   help="auto: dynamic for fp16, static otherwise")
    g.add_argument("--init_loss_scale", type=float, default=None, help="default: 65536 dynamic, 1 static")
    g.add_argument("--loss_scale_window", type=int, default=1000)


def add_execution_args(p):
    g = p.add_argument_group("execution")
    g.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    g.add_argument("--mode", default="graph", help="graph (0) or pynative (1)")
    g.add_argument("--jit_level", default="O1", choices=["O0", "O1", "O2"])
    g.add_argument("--enable_flash_attention", type=str2bool, default=None)
    g.add_argument("--recompute", "--gradient_checkpointing", type=str2bool, nargs="?", const=True, default=False,
                   help="recompute each block in the backward pass (MindSpore CPU graph mode: block by block from "
                        "the host, pixart/training/blockwise.py, the lowest-memory way there)")
    g.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel under msrun")
    g.add_argument("--threads", type=int, default=None, help="MindSpore runtime threads")
    return g


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_model_args(p)
    g.add_argument("--load_from", default=None, help="pretrained weights to fine-tune (.pth, .ckpt, .safetensors, "
                   "diffusers folder); default: PixArt's initialisation from --seed")
    add_data_args(p)

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "came"])
    g.add_argument("--learning_rate", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=None, help="default: adamw 0.03, came 0")
    g.add_argument("--betas", type=float, nargs="+", default=None, help="default: adamw 0.9 0.999, came 0.9 0.999 0.9999")
    g.add_argument("--eps", type=float, nargs="+", default=None, help="default: adamw 1e-10, came 1e-30 1e-16")
    g.add_argument("--warmup_steps", type=int, default=1000, help="constant lr after a linear warm-up")
    g.add_argument("--auto_lr", default="none", choices=["none", "sqrt", "linear"],
                   help="scale lr by (batch x ranks x accumulation / 256) or its square root")
    g.add_argument("--clip_grad", type=float, default=0.01, help="global gradient-norm clip (0: off)")
    g.add_argument("--use_ema", type=str2bool, default=True)
    g.add_argument("--ema_rate", type=float, default=0.9999)
    g.add_argument("--batch_size", type=int, default=1, help="per rank")
    g.add_argument("--grad_accumulation", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--seed", type=int, default=43)
    add_precision_args(g)
    add_execution_args(p)

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--output_dir", default="output/train")
    g.add_argument("--save_every", type=int, default=1000, help="steps between checkpoints (and one at the end)")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints kept (0: all)")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--log_every", type=int, default=20)
    g.add_argument("--validation_every", type=int, default=0, help="steps between validation images (0: never)")
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--validation_steps", type=int, default=14)
    g.add_argument("--validation_guidance", type=float, default=4.5)
    g.add_argument("--validation_seed", type=int, default=0)
    g.add_argument("--param_digest", type=str2bool, default=False,
                   help="every rank prints a SHA-256 of its final weights (to check ranks agree)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Checks that need no model
# ----------------------------------------------------------------------------------------------------------------
def check_common_args(args, flag: Callable[[str], str] = default_flag) -> None:
    """The checks train.py and the LoRA script share: files, data and loop numbers, resume path."""
    from pixart.models.pixart import preset_config
    if str(args.mode) not in MODES:
        raise TrainError(f"{flag('mode')} must be graph (0) or pynative (1), got {args.mode!r}")
    if args.model is not None:
        preset_config(args.model)
    if not args.json_path:
        raise TrainError(f"{flag('json_path')} is required (the label JSON)")
    if not Path(args.json_path).is_file():
        raise TrainError(f"{flag('json_path')} not found: {args.json_path}")
    if args.image_dir and not Path(args.image_dir).is_dir():
        raise TrainError(f"{flag('image_dir')} not found: {args.image_dir}")
    if args.feature_dir and not Path(args.feature_dir).is_dir():
        raise TrainError(f"{flag('feature_dir')} not found: {args.feature_dir}")
    if not args.feature_dir and not args.image_dir:
        raise TrainError(f"{flag('image_dir')} is required unless {flag('feature_dir')} holds cached latents")
    for name in ("load_from", "vae_root", "text_encoder_root", "tokenizer_root"):
        value = getattr(args, name)
        if value and not Path(value).exists():
            raise TrainError(f"{flag(name)} not found: {value}")
    for name in ("batch_size", "grad_accumulation", "epochs", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise TrainError(f"{flag('max_steps')} must be >= 1, got {args.max_steps}")
    if args.max_length is not None and args.max_length < 1:
        raise TrainError(f"{flag('max_length')} must be >= 1, got {args.max_length}")
    for name in ("real_prompt_ratio", "class_dropout_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise TrainError(f"{flag(name)} must be in [0, 1], got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise TrainError(f"{flag('learning_rate')} must be > 0, got {args.learning_rate}")
    for name in ("warmup_steps", "clip_grad", "keep_last"):
        if getattr(args, name) < 0:
            raise TrainError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    if args.seed < 0:
        raise TrainError(f"{flag('seed')} must be >= 0, got {args.seed}")
    if args.validation_every and not args.validation_prompts:
        raise TrainError(f"{flag('validation_every')} needs {flag('validation_prompts')}")
    if args.validation_prompts and args.validation_every and not (args.vae_root and args.text_encoder_root):
        raise TrainError(f"validation images need {flag('vae_root')} and {flag('text_encoder_root')}")
    if args.resume and args.resume != "latest" and not Path(args.resume).exists():
        raise TrainError(f"{flag('resume')} path not found: {args.resume}")


def check_args(args) -> None:
    """train.py's checks."""
    check_common_args(args)
    if args.model is None:
        raise TrainError("--model is required (a preset name)")
    if not 0.0 <= args.ema_rate < 1.0:
        raise TrainError(f"--ema_rate must be in [0, 1), got {args.ema_rate}")


# ----------------------------------------------------------------------------------------------------------------
# Logging (rank 0 writes; every rank may print a tagged line)
# ----------------------------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, output_dir: Path, ctx, resume_step: int | None):
        self.ctx = ctx
        self.text = self.jsonl = None
        if ctx.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl_path = output_dir / "train_log.jsonl"
            if resume_step is not None and self.jsonl_path.exists():  # drop what a killed run logged past the resume
                kept = [line for line in self.jsonl_path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", resume_step + 1) <= resume_step]
                tmp = self.jsonl_path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.jsonl_path)
            elif self.jsonl_path.exists():
                self.jsonl_path.unlink()
            self.jsonl = open(self.jsonl_path, "a")
            self.text = open(output_dir / "train.log", "a")

    def info(self, msg: str) -> None:
        if self.ctx.is_main:
            print(msg, flush=True)
            self.text.write(msg + "\n")
            self.text.flush()

    def rank(self, msg: str) -> None:
        """A line from every rank (msrun keeps one log per worker)."""
        print(f"[rank {self.ctx.rank}/{self.ctx.world_size}] {msg}", flush=True)

    def record(self, row: dict) -> None:
        if self.ctx.is_main:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f is not None:
                f.close()


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (train.py and the LoRA script)
# ----------------------------------------------------------------------------------------------------------------
def start(args) -> tuple[str, object]:
    """Device, precision checks and ranks: (mode name, distributed Context)."""
    from pixart import backend
    from pixart.training import distributed
    mode = MODES[str(args.mode)]
    backend.setup(args.device_target, mode, args.jit_level, args.enable_flash_attention, args.threads)
    for name in ("mixed_precision", "text_encoder_dtype", "vae_dtype"):  # bf16 on CPU fails here, before loading
        backend.dtype(getattr(args, name))
    return mode, distributed.init(args.use_parallel)


def resume_target(args, root, ctx, layout=None, flag: Callable[[str], str] = default_flag) -> Path | None:
    """The checkpoint folder `--resume` names (None: start from scratch); a bad path fails before anything slow."""
    from pixart.training import checkpoint as ckpt
    if not args.resume:
        return None
    path = ckpt.resolve(args.resume, root, layout or ckpt.FULL)
    if path is None and ctx.is_main:
        print(f"{flag('resume')} latest: no checkpoint in {root} yet; starting from scratch", flush=True)
    return path


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


def data_settings(args) -> tuple[int, bool, int]:
    """(bucket-table resolution, aspect-ratio buckets or square crops, caption tokens): the flags or the preset's."""
    from pixart.models.pixart import preset_config
    preset = preset_config(args.model)
    resolution = args.resolution or preset.input_size * 8
    multi_scale = args.multi_scale if args.multi_scale is not None else args.model.endswith(("-MS", "-MS-KV"))
    return resolution, multi_scale, args.max_length or preset.model_max_length


def prepare_data(args, ctx, log, flag: Callable[[str], str] = default_flag) -> Data:
    """Cache (if any), labels and buckets, then encoders for what the cache does not hold."""
    from pixart.data.dataset import BucketDataset
    from pixart.data.features import FeatureCache, ImageEncoder, TextEncoder
    resolution, multi_scale, max_length = data_settings(args)
    cache = FeatureCache(args.feature_dir) if args.feature_dir else None
    if cache is not None:
        cache.check_compatible(resolution, multi_scale, max_length, args.random_flip)
    captions = ("prompt", "sharegpt4v") if args.real_prompt_ratio < 1.0 else ("prompt",)
    dataset = BucketDataset(args.json_path, resolution, args.image_dir if not (cache and cache.has_latents) else None,
                            multi_scale, available=(lambda e: cache.missing(e, captions)) if cache else None)
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
    if not (cache and cache.has_latents):
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
    from pixart.models.pixart import preset_config
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
        cfg.kv_compress_config = {"sampling": args.kv_compress_sampling, "scale_factor": args.kv_compress_scale_factor,
                                  "kv_compress_layer": args.kv_compress_layer or list(range(cfg.depth // 2, cfg.depth))}
    return cfg


def build_model(args, data: Data, log, pretrained=None):
    """PixArt for `data`: PixArt's initialisation from --seed, or the `pretrained` (state, config) of
    `pixart.checkpoints.convert_pixart` loaded into it."""
    from pixart.io import load_into
    from pixart.models.convert import fill_null_caption
    from pixart.models.pixart import PixArt
    from pixart.training.model_init import initialize_weights
    cfg = model_config(args, data.caption_channels, pretrained[1] if pretrained else None)
    if cfg.in_channels != data.latent_channels:
        raise TrainError(f"the model takes {cfg.in_channels} latent channels, the VAE gives {data.latent_channels}")
    model = PixArt(cfg)
    if pretrained is None:
        initialize_weights(model, args.seed)
    else:
        state = dict(pretrained[0])
        fill_null_caption(state, dataclasses.replace(cfg), cfg.model_max_length, log.info)
        load_into(model, state, what=f"{args.load_from} into the {cfg.depth}-block model")
        log.info(f"loaded pretrained weights {args.load_from}")
    return model


def for_training(model, args):
    """Recompute (per block) and mixed precision: the Cell the loss runs. Call after any layer surgery (LoRA).
    Where recompute is host-driven (`build_optimisation`), the blocks are left as they are."""
    if args.recompute and not _host_recompute(args, model):
        for block in model.blocks:
            block.recompute()
    if args.mixed_precision == "fp32":
        return model
    import mindspore as ms
    from pixart import backend
    dtype = backend.dtype(args.mixed_precision)  # bf16 on CPU fails here with a clear message
    return ms.amp.auto_mixed_precision(model, "auto", dtype)


def _host_recompute(args, model) -> bool:
    """--recompute as block-by-block backpropagation from the host (pixart.training.blockwise): MindSpore CPU graph
    mode with fp32 weights (mixed precision wraps the model, which the block graphs do not see through), for a
    model it can train (no LoRA dropout)."""
    from pixart import backend
    from pixart.training.blockwise import refusal
    return (args.recompute and backend.host_driven_recompute() and args.mixed_precision == "fp32"
            and refusal(model) is None)


@dataclasses.dataclass
class Optimisation:
    optimizer: object
    ema: object
    step_cell: object
    lr: float
    effective_batch: int
    dynamic: bool


def build_optimisation(args, compute_model, params, ctx, global_batch: int, log, use_ema: bool) -> Optimisation:
    """Optimizer over `params`, EMA, loss scaling and the train step (see pixart.training.step)."""
    from pixart import backend
    from pixart.diffusion.loss import DiffusionLoss
    from pixart.training.ema import EMA
    from pixart.training.optimizers import auto_scale_lr, build_optimizer
    from pixart.training.step import TrainStep
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
    step_cell = TrainStep(DiffusionLoss(compute_model), optimizer, ema, args.clip_grad, args.grad_accumulation,
                          ctx.world_size, init_scale, dynamic, scale_window=args.loss_scale_window)
    step_cell.set_train(True)
    if _host_recompute(args, compute_model):
        from pixart.training.blockwise import BlockwiseTrainStep
        step_cell = BlockwiseTrainStep(step_cell)
        log.info("recompute: block by block (one compiled forward and backward graph per block structure)")
    elif args.recompute and args.mixed_precision == "fp32" and backend.host_driven_recompute():
        from pixart.training.blockwise import refusal
        log.info(f"recompute: inside one graph (it saves no memory on CPU): {refusal(compute_model)}")
    return Optimisation(optimizer, ema, step_cell, lr, effective, dynamic)


def restore_training_state(resumed, path, opt: Optimisation, args, ctx, dataset, log) -> tuple[int, int]:
    """Optimizer and loss-scale state of a checkpoint, with warnings where the data order cannot repeat;
    returns (step, global batches consumed)."""
    from mindspore import Tensor
    from pixart.io import CheckpointError
    from pixart.training import checkpoint as ckpt
    state = resumed["state"]
    if state.get("optimizer") != args.optimizer:
        raise TrainError(f"checkpoint {path} was trained with {state.get('optimizer')}, not --optimizer "
                         f"{args.optimizer}")
    try:
        opt.optimizer.load_state_dict(resumed["train_state"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    for p in opt.step_cell.state_parameters():
        if p.name in resumed["train_state"]:
            p.set_data(Tensor(resumed["train_state"][p.name]).astype(p.dtype))
    if state.get("global_batch") != args.batch_size * ctx.world_size:
        log.info(f"warning: the checkpoint was trained with a global batch of {state.get('global_batch')}, now "
                 f"{args.batch_size * ctx.world_size}: the data order differs from an uninterrupted run")
    if state.get("data", {}).get("fingerprint") != ckpt.fingerprint(e.path for e in dataset.entries):
        log.info("warning: the usable data differ from the checkpoint's; the data order differs from an "
                 "uninterrupted run")
    log.info(f"resumed from {path}: step {state['step']}, {state['batches_done']} batches consumed "
             f"(epoch {state.get('epoch')})")
    return int(state["step"]), int(state["batches_done"])


def open_stream(args, data: Data, ctx, batches_done: int, flag: Callable[[str], str] = default_flag):
    """(batch stream from `batches_done` on, batch builder, optimizer steps per epoch, last step)."""
    from pixart.data.dataset import BatchStream
    from pixart.training.batch import BatchBuilder
    stream = BatchStream(data.dataset, args.batch_size, args.seed, ctx.rank, ctx.world_size, start=batches_done)
    steps_per_epoch = stream.per_epoch // args.grad_accumulation
    if steps_per_epoch == 0 and args.max_steps is None:
        raise TrainError(f"one epoch has {stream.per_epoch} batches, fewer than {flag('grad_accumulation')} "
                         f"{args.grad_accumulation}; set {flag('max_steps')}")
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    builder = BatchBuilder(data.dataset, args.seed, data.max_length, data.scaling, data.latent_channels,
                           data.vae_factor, real_prompt_ratio=args.real_prompt_ratio,
                           class_dropout_prob=args.class_dropout_prob, random_flip=args.random_flip,
                           sample_posterior=args.sample_posterior, cache=data.cache,
                           text_encoder=data.text_encoder, image_encoder=data.image_encoder)
    return stream, builder, steps_per_epoch, max_steps


def run_state(step: int, batches: int, args, ctx, data: Data, stream, failures_before: list) -> dict:
    """What state.json records: step and data position (all a resume needs), and what the run was."""
    from pixart.training import checkpoint as ckpt
    dataset = data.dataset
    return {
        "step": step, "batches_done": batches, "epoch": stream.position(batches)[0], "seed": args.seed,
        "rng": "numpy default_rng([seed, 1, epoch]) shuffles; default_rng([seed, 2, batch, slot]) per sample",
        "model": args.model, "optimizer": args.optimizer, "batch_size": args.batch_size,
        "world_size": ctx.world_size, "global_batch": data.global_batch, "grad_accumulation": args.grad_accumulation,
        "data": {"labels": dataset.num_labels, "usable": len(dataset),
                 "fingerprint": ckpt.fingerprint(e.path for e in dataset.entries)},
        "skipped": [dataclasses.asdict(s) for s in dataset.skipped],
        "decode_failures": failures_before + [dataclasses.asdict(s) for s in dataset.decode_failures],
        "args": {k: v for k, v in vars(args).items()},
    }


def train_loop(args, opt: Optimisation, stream, builder, start_step: int, max_steps: int, log,
               save: Callable[[int, int], None], validate: Callable[[int], None] | None = None,
               validate_every: int = 0) -> dict:
    """Optimizer steps start_step+1 .. max_steps: lr, micro-batches, step, log line and jsonl row, checkpoints every
    --save_every (and the last step), validation every `validate_every`. Returns the step times and overflows."""
    import mindspore as ms
    from mindspore import Tensor
    from pixart.training.batch import BATCH_KEYS
    from pixart.training.optimizers import constant_with_warmup
    step_times, window, skipped_steps = [], [], 0
    last_tic = time.time()
    step = start_step
    for step in range(start_step + 1, max_steps + 1):
        tic = time.time()
        step_lr = Tensor(constant_with_warmup(step - 1, opt.lr, args.warmup_steps), ms.float32)
        losses, data_time = [], 0.0
        for micro in range(args.grad_accumulation):
            t_data = time.time()
            ref = next(stream)
            batch = builder(ref)
            data_time += time.time() - t_data
            if step == start_step + 1 and micro == 0:
                log.rank(f"first batch (global batch {ref.index}, bucket {ref.bucket}): "
                         + ", ".join(e.path for e in ref.entries))
            out = opt.step_cell(*(Tensor(batch[k]) for k in BATCH_KEYS), step_lr,
                                micro == args.grad_accumulation - 1)
            losses.append(out[1].asnumpy())
        _, _, norm, finite, scale = out
        terms = np.mean(losses, 0)
        finite = bool(finite.asnumpy())
        skipped_steps += not finite
        dt = time.time() - tic
        step_times.append(dt)
        row = {"step": step, "loss": float(terms[0]), "mse": float(terms[1]), "vb": float(terms[2]),
               "lr": float(step_lr.asnumpy()), "grad_norm": float(norm.asnumpy()),
               "loss_scale": float(scale.asnumpy()), "skipped": not finite, "epoch": stream.position(ref.index)[0],
               "bucket": ref.bucket, "images_per_s": opt.effective_batch / dt, "step_time": dt,
               "data_time": data_time}
        log.record(row)
        window.append(row)
        if step % args.log_every == 0 or step == start_step + 1 or step == max_steps:
            t = time.time() - last_tic
            imgs = opt.effective_batch * len(window) / max(t, 1e-9)
            mean = lambda k: float(np.mean([r[k] for r in window]))  # noqa: E731
            log.info(f"step {step}/{max_steps} | loss {mean('loss'):.4f} (mse {mean('mse'):.4f}, vb {mean('vb'):.4f}) "
                     f"| lr {row['lr']:.3g} | grad norm {mean('grad_norm'):.3g} | {imgs:.2f} img/s (data "
                     f"{mean('data_time'):.3f}s) | loss scale {row['loss_scale']:g}"
                     + (f" | {sum(r['skipped'] for r in window)} skipped (overflow)"
                        if any(r["skipped"] for r in window) else ""))
            window, last_tic = [], time.time()
        if step % args.save_every == 0 and step != max_steps:
            save(step, stream.next_index)
        if validate is not None and validate_every and step % validate_every == 0:
            validate(step)
    if max_steps > start_step:
        save(step, stream.next_index)
    return {"step_times": step_times, "skipped_steps": skipped_steps}


def finish(args, log, data: Data, failures_before: list, max_steps: int, loop: dict) -> dict:
    """Report replaced images, the speed and memory summary (log line and jsonl row); returns the summary."""
    failures = failures_before + [dataclasses.asdict(s) for s in data.dataset.decode_failures]
    if failures:
        log.info(f"data: {len(failures)} image(s) failed to decode and were replaced: " +
                 "; ".join(f"{f['path']} ({f['reason']})" for f in failures[:5]))
    step_times = loop["step_times"]
    summary = {"steps": max_steps, "skipped_steps": loop["skipped_steps"], "peak_rss_mb": _peak_rss_mb(),
               # the first steps compile (one graph per bucket shape in graph mode): the median skips them
               "median_step_s": float(np.median(step_times[2:] or step_times)) if step_times else None,
               "skipped_images": len(data.dataset.skipped) + len(failures)}
    log.info(f"done: {max_steps} steps, {summary['skipped_steps']} skipped; median step "
             f"{summary['median_step_s'] or 0:.3f}s, peak RSS {summary['peak_rss_mb']:.0f} MB; "
             f"{summary['skipped_images']} image(s) skipped")
    log.record({"summary": summary})
    return summary


def param_state(model) -> dict[str, np.ndarray]:
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------------------
# train.py: full fine-tuning
# ----------------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    check_args(args)
    from pixart.training import checkpoint as ckpt
    mode, ctx = start(args)
    ckpt_root = Path(args.output_dir) / "checkpoints"
    resume_from = resume_target(args, ckpt_root, ctx)
    resumed = ckpt.load(resume_from) if resume_from is not None else None
    log = Logger(Path(args.output_dir), ctx, resumed["state"]["step"] if resumed else None)
    try:
        return _train(args, ctx, mode, log, resumed, resume_from, ckpt_root)
    finally:
        log.close()


def _train(args, ctx, mode, log, resumed, resume_from, ckpt_root) -> dict:
    from pixart.models.convert import convert_pixart
    from pixart.training import checkpoint as ckpt

    t_setup = time.time()
    resolution, multi_scale, _ = data_settings(args)
    log.info(f"train.py: {args.model} at {resolution} px ({'multi-aspect buckets' if multi_scale else 'square'}), "
             f"{ctx.world_size} rank(s), {mode} mode on {args.device_target}")
    data = prepare_data(args, ctx, log)

    model = build_model(args, data, log, convert_pixart(args.load_from) if args.load_from else None)
    compute_model = for_training(model, args)
    n_params = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    log.info(f"model: depth {model.config.depth}, width {model.config.hidden_size}, {model.config.num_heads} heads, "
             f"{n_params / 1e6:.2f} M trainable parameters, captions {data.max_length} x {data.caption_channels}, "
             f"latents x{data.scaling:g}")
    opt = build_optimisation(args, compute_model, model.trainable_params(), ctx, data.global_batch, log,
                             args.use_ema)

    start_step, batches_done, failures_before = 0, 0, []
    if resumed:
        start_step, batches_done = _restore(resumed, resume_from, model, opt, args, ctx, data.dataset, log)
        failures_before = resumed["state"].get("decode_failures", [])
    stream, builder, _, max_steps = open_stream(args, data, ctx, batches_done)

    validation = None
    if args.validation_every and ctx.is_main:
        from pixart.training.validation import Validation
        validation = Validation(model, args, data.max_length, data.scaling, data.resolution, data.text_encoder,
                                log.info)

    def save(step: int, batches: int) -> None:
        if not ctx.is_main:
            return
        ema_state = {**param_state(model), **opt.ema.state_dict()} if opt.ema is not None else None
        train_state = {**opt.optimizer.state_dict(), **{p.name: p.asnumpy() for p in opt.step_cell.state_parameters()}}
        state = run_state(step, batches, args, ctx, data, stream, failures_before)
        path = ckpt.save(ckpt_root, step, param_state(model), ema_state, train_state, state, args.keep_last)
        log.info(f"saved checkpoint {path}")

    log.info(f"training steps {start_step + 1}..{max_steps}: batch {args.batch_size} x {ctx.world_size} rank(s) x "
             f"{args.grad_accumulation} accumulation, {stream.per_epoch} batches per epoch, {args.optimizer} lr "
             f"{opt.lr:.3g} (warm-up {args.warmup_steps}), clip {args.clip_grad or 'off'}, ema "
             f"{args.ema_rate if opt.ema else 'off'}, {args.mixed_precision}"
             f"{' + dynamic loss scale' if opt.dynamic else ''}; set-up {time.time() - t_setup:.1f}s")
    def validate(step: int) -> None:
        validation(step, out_dir=Path(args.output_dir) / "validation")

    loop = train_loop(args, opt, stream, builder, start_step, max_steps, log, save,
                      validate if validation else None, args.validation_every)
    summary = finish(args, log, data, failures_before, max_steps, loop)
    if args.param_digest:
        log.rank(f"parameter digest {ckpt.digest(param_state(model))}")
    return summary


def _restore(resumed, path, model, opt: Optimisation, args, ctx, dataset, log) -> tuple[int, int]:
    from pixart.io import load_into
    load_into(model, resumed["model"], what=f"model of checkpoint {path}")
    if opt.ema is not None:
        if resumed["ema"] is None:
            log.info(f"note: checkpoint {path} has no EMA; the EMA restarts from the weights")
        else:
            opt.ema.load_state_dict(resumed["ema"])
    return restore_training_state(resumed, path, opt, args, ctx, dataset, log)
