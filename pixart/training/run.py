"""What `train.py` does once its options are parsed: check, set up, train, checkpoint, log.

The order of work: every check that needs no model (files, numbers, resume path) -> device and ranks -> data
(labels, buckets, cache) -> encoders (only what the cache lacks) -> model (init or --load_from) -> loss, optimizer,
EMA, train step -> resume -> the loop (lr, micro-batches, step, log, checkpoint, validation) -> final checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from pixart.config import ArgumentParser, str2bool


class TrainError(ValueError):
    """Bad training input; the message is one line for the user."""


MODES = {"0": "graph", "graph": "graph", "1": "pynative", "pynative": "pynative"}


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="PixArt-Sigma-XL-2-512-MS", help="preset (architecture and resolution)")
    g.add_argument("--load_from", default=None, help="pretrained weights to fine-tune (.pth, .ckpt, .safetensors, "
                   "diffusers folder); default: PixArt's initialisation from --seed")
    g.add_argument("--depth", type=int, default=None, help="reduce the preset (tests, experiments)")
    g.add_argument("--hidden_size", type=int, default=None, help="reduce the preset; heads are 72 wide")
    g.add_argument("--num_heads", type=int, default=None)
    g.add_argument("--kv_compress", type=str2bool, default=False, help="Σ KV compression (2K)")
    g.add_argument("--kv_compress_sampling", default="conv", choices=["conv", "ave", "uniform"])
    g.add_argument("--kv_compress_scale_factor", type=int, default=2)
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None)

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
    g.add_argument("--class_dropout_prob", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    g.add_argument("--random_flip", type=str2bool, default=False)
    g.add_argument("--sample_posterior", type=str2bool, default=True, help="VAE posterior sample (else its mean)")
    g.add_argument("--vae_root", default=None, help="HF folder of the VAE (needed unless latents are cached)")
    g.add_argument("--text_encoder_root", default=None, help="HF folder of T5 (needed unless captions are cached)")
    g.add_argument("--tokenizer_root", default=None)
    g.add_argument("--text_encoder_dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--vae_dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--sd_scale_factor", type=float, default=None, help="latent scale (default: VAE config / cache)")
    g.add_argument("--max_length", type=int, default=None, help="caption tokens (default: preset, 120 α / 300 Σ)")

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
    g.add_argument("--mixed_precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="compute precision (weights and optimizer stay fp32); fp16/bf16 are for Ascend")
    g.add_argument("--loss_scaler", default="auto", choices=["auto", "dynamic", "static"],
                   help="auto: dynamic for fp16, static otherwise")
    g.add_argument("--init_loss_scale", type=float, default=None, help="default: 65536 dynamic, 1 static")
    g.add_argument("--loss_scale_window", type=int, default=1000)

    g = p.add_argument_group("execution")
    g.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    g.add_argument("--mode", default="graph", help="graph (0) or pynative (1)")
    g.add_argument("--jit_level", default="O1", choices=["O0", "O1", "O2"])
    g.add_argument("--enable_flash_attention", type=str2bool, default=None)
    g.add_argument("--recompute", type=str2bool, default=False, help="recompute each block in the backward pass")
    g.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel under msrun")
    g.add_argument("--threads", type=int, default=None, help="MindSpore runtime threads")

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
def check_args(args) -> None:
    from pixart.models.pixart import preset_config
    if str(args.mode) not in MODES:
        raise TrainError(f"--mode must be graph (0) or pynative (1), got {args.mode!r}")
    preset_config(args.model)
    if not args.json_path:
        raise TrainError("--json_path is required (the label JSON)")
    if not Path(args.json_path).is_file():
        raise TrainError(f"--json_path not found: {args.json_path}")
    if args.image_dir and not Path(args.image_dir).is_dir():
        raise TrainError(f"--image_dir not found: {args.image_dir}")
    if args.feature_dir and not Path(args.feature_dir).is_dir():
        raise TrainError(f"--feature_dir not found: {args.feature_dir}")
    if not args.feature_dir and not args.image_dir:
        raise TrainError("--image_dir is required unless --feature_dir holds cached latents")
    for name in ("load_from", "vae_root", "text_encoder_root", "tokenizer_root"):
        value = getattr(args, name)
        if value and not Path(value).exists():
            raise TrainError(f"--{name} not found: {value}")
    for name in ("batch_size", "grad_accumulation", "epochs", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise TrainError(f"--max_steps must be >= 1, got {args.max_steps}")
    for name in ("real_prompt_ratio", "class_dropout_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise TrainError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise TrainError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.warmup_steps < 0 or args.clip_grad < 0 or args.keep_last < 0:
        raise TrainError("--warmup_steps, --clip_grad and --keep_last must be >= 0")
    if not 0.0 <= args.ema_rate < 1.0:
        raise TrainError(f"--ema_rate must be in [0, 1), got {args.ema_rate}")
    if args.seed < 0:
        raise TrainError(f"--seed must be >= 0, got {args.seed}")
    if args.validation_every and not args.validation_prompts:
        raise TrainError("--validation_every needs --validation_prompts")
    if args.validation_every and not (args.vae_root and args.text_encoder_root):
        raise TrainError("validation images need --vae_root and --text_encoder_root")
    if args.resume and args.resume != "latest" and not Path(args.resume).exists():
        raise TrainError(f"--resume path not found: {args.resume}")


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
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def _model_config(args, caption_channels: int):
    from pixart.models.pixart import preset_config
    overrides = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads") if getattr(args, k) is not None}
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


def _load_pretrained(model, path, log) -> None:
    from pixart.checkpoints import convert_pixart, fill_null_caption, load_into
    state, _ = convert_pixart(path)
    fill_null_caption(state, dataclasses.replace(model.config), model.config.model_max_length, log)
    load_into(model, state, what=f"{path} into the {model.config.depth}-block model")
    log(f"loaded pretrained weights {path}")


def _apply_precision(model, name: str):
    if name == "fp32":
        return model
    import mindspore as ms
    from pixart import backend
    dtype = backend.dtype(name)  # bf16 on CPU fails here with a clear message
    return ms.amp.auto_mixed_precision(model, "auto", dtype)


def _param_state(model) -> dict[str, np.ndarray]:
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.parameters_and_names()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(p.asnumpy()).tobytes())
    return h.hexdigest()[:16]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    check_args(args)
    from pixart import backend
    from pixart.training import checkpoint as ckpt
    from pixart.training import distributed

    mode = MODES[str(args.mode)]
    backend.setup(args.device_target, mode, args.jit_level, args.enable_flash_attention, args.threads)
    for name in ("mixed_precision", "text_encoder_dtype", "vae_dtype"):  # bf16 on CPU fails here, before loading
        backend.dtype(getattr(args, name))
    ctx = distributed.init(args.use_parallel)
    out_dir = Path(args.output_dir)
    ckpt_root = out_dir / "checkpoints"

    # resume target first: a bad path must fail before anything slow
    resume_from = None
    if args.resume:
        resume_from = ckpt.resolve(args.resume, ckpt_root)
        if resume_from is None and ctx.is_main:
            print(f"--resume latest: no checkpoint in {ckpt_root} yet; starting from scratch", flush=True)
    resumed = ckpt.load(resume_from) if resume_from is not None else None
    log = Logger(out_dir, ctx, resumed["state"]["step"] if resumed else None)
    try:
        return _train(args, ctx, mode, log, resumed, resume_from, ckpt_root)
    finally:
        log.close()


def _train(args, ctx, mode, log, resumed, resume_from, ckpt_root) -> dict:
    import mindspore as ms
    from mindspore import Tensor
    from pixart.data.dataset import BatchStream, BucketDataset
    from pixart.data.features import FeatureCache, ImageEncoder, TextEncoder
    from pixart.diffusion.loss import DiffusionLoss
    from pixart.models.pixart import PixArt, preset_config
    from pixart.training import checkpoint as ckpt
    from pixart.training.batch import BATCH_KEYS, BatchBuilder
    from pixart.training.ema import EMA
    from pixart.training.model_init import initialize_weights
    from pixart.training.optimizers import auto_scale_lr, build_optimizer, constant_with_warmup
    from pixart.training.step import TrainStep

    t_setup = time.time()
    preset = preset_config(args.model)
    resolution = args.resolution or preset.input_size * 8
    multi_scale = args.multi_scale if args.multi_scale is not None else args.model.endswith(("-MS", "-MS-KV"))
    max_length = args.max_length or preset.model_max_length
    if ctx.is_main:
        log.info(f"train.py: {args.model} at {resolution} px ({'multi-aspect buckets' if multi_scale else 'square'}), "
                 f"{ctx.world_size} rank(s), {mode} mode on {args.device_target}")

    # 1. data: cache (if any), labels, buckets
    cache = FeatureCache(args.feature_dir) if args.feature_dir else None
    if cache is not None:
        cache.check_compatible(resolution, multi_scale, max_length, args.random_flip)
    captions = ("prompt", "sharegpt4v") if args.real_prompt_ratio < 1.0 else ("prompt",)
    dataset = BucketDataset(args.json_path, resolution, args.image_dir if not (cache and cache.has_latents) else None,
                            multi_scale, available=(lambda e: cache.missing(e, captions)) if cache else None)
    log.info(dataset.summary())
    global_batch = args.batch_size * ctx.world_size
    dataset.check_batch_size(global_batch, f"--batch_size {args.batch_size} x {ctx.world_size} rank(s)")
    for key in dataset.unused_buckets(global_batch):
        log.info(f"note: bucket {key} has {len(dataset.buckets[key])} image(s), fewer than a batch of {global_batch}: "
                 "never trained")
    no_caption = sum(1 for e in dataset.entries if not e.sharegpt4v)
    if args.real_prompt_ratio < 1.0 and no_caption:
        log.info(f"note: {no_caption} entries have no sharegpt4v caption; they always train on their prompt")

    # 2. encoders for what the cache does not hold
    text_encoder = image_encoder = None
    if not (cache and cache.has_text):
        if not args.text_encoder_root:
            raise TrainError("--text_encoder_root is required: captions are not cached (--feature_dir)")
        text_encoder = TextEncoder(args.text_encoder_root, args.tokenizer_root, max_length, args.text_encoder_dtype)
    if not (cache and cache.has_latents):
        if not args.vae_root:
            raise TrainError("--vae_root is required: latents are not cached (--feature_dir)")
        image_encoder = ImageEncoder(args.vae_root, args.vae_dtype)
    caption_channels = text_encoder.channels if text_encoder else cache.meta["text_channels"]
    latent_channels = image_encoder.latent_channels if image_encoder else cache.meta["latent_channels"]
    vae_factor = image_encoder.vae.downsample_factor if image_encoder else cache.meta.get("vae_factor", 8)
    scaling = args.sd_scale_factor or (image_encoder.scaling_factor if image_encoder else cache.meta["scaling_factor"])

    # 3. model
    cfg = _model_config(args, caption_channels)
    if cfg.in_channels != latent_channels:
        raise TrainError(f"the model takes {cfg.in_channels} latent channels, the VAE gives {latent_channels}")
    model = PixArt(cfg)
    initialize_weights(model, args.seed)
    if args.load_from:
        _load_pretrained(model, args.load_from, log.info)
    if args.recompute:
        for block in model.blocks:
            block.recompute()
    compute_model = _apply_precision(model, args.mixed_precision)
    n_params = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    log.info(f"model: depth {cfg.depth}, width {cfg.hidden_size}, {cfg.num_heads} heads, {n_params / 1e6:.2f} M "
             f"trainable parameters, captions {max_length} x {caption_channels}, latents x{scaling:g}")

    # 4. optimisation
    effective = global_batch * args.grad_accumulation
    lr, ratio = auto_scale_lr(args.learning_rate, effective, args.auto_lr)
    if args.auto_lr != "none":
        log.info(f"auto_lr ({args.auto_lr}): lr {args.learning_rate:g} x {ratio:.4f} = {lr:.3g} for an effective "
                 f"batch of {effective}")
    try:
        optimizer = build_optimizer(args.optimizer, model.trainable_params(), lr, args.betas, args.eps,
                                    args.weight_decay)
    except ValueError as e:
        raise TrainError(str(e)) from None
    ema = EMA(optimizer.parameters, args.ema_rate) if args.use_ema else None
    dynamic = args.loss_scaler == "dynamic" or (args.loss_scaler == "auto" and args.mixed_precision == "fp16")
    init_scale = args.init_loss_scale or (65536.0 if dynamic else 1.0)
    step_cell = TrainStep(DiffusionLoss(compute_model), optimizer, ema, args.clip_grad, args.grad_accumulation,
                          ctx.world_size, init_scale, dynamic, scale_window=args.loss_scale_window)
    step_cell.set_train(True)

    # 5. resume
    start_step, batches_done, failures_before = 0, 0, []
    if resumed:
        start_step, batches_done = _restore(resumed, resume_from, model, optimizer, ema, step_cell, args, ctx,
                                            dataset, log)
        failures_before = resumed["state"].get("decode_failures", [])
    stream = BatchStream(dataset, args.batch_size, args.seed, ctx.rank, ctx.world_size, start=batches_done)
    steps_per_epoch = stream.per_epoch // args.grad_accumulation
    if steps_per_epoch == 0 and args.max_steps is None:
        raise TrainError(f"one epoch has {stream.per_epoch} batches, fewer than --grad_accumulation "
                         f"{args.grad_accumulation}; set --max_steps")
    max_steps = args.max_steps or args.epochs * steps_per_epoch
    builder = BatchBuilder(dataset, args.seed, max_length, scaling, latent_channels, vae_factor,
                           real_prompt_ratio=args.real_prompt_ratio, class_dropout_prob=args.class_dropout_prob,
                           random_flip=args.random_flip, sample_posterior=args.sample_posterior, cache=cache,
                           text_encoder=text_encoder, image_encoder=image_encoder)

    validation = None
    if args.validation_every and ctx.is_main:
        from pixart.training.validation import Validation
        validation = Validation(model, args, max_length, scaling, resolution, text_encoder, log.info)

    def save(step: int, batches: int) -> None:
        if not ctx.is_main:
            return
        ema_state = None
        if ema is not None:
            ema_state = {**_param_state(model), **ema.state_dict()}
        train_state = {**optimizer.state_dict(), **{p.name: p.asnumpy() for p in step_cell.state_parameters()}}
        state = {
            "step": step, "batches_done": batches, "epoch": stream.position(batches)[0], "seed": args.seed,
            "rng": "numpy default_rng([seed, 1, epoch]) shuffles; default_rng([seed, 2, batch, slot]) per sample",
            "model": args.model, "optimizer": args.optimizer, "batch_size": args.batch_size,
            "world_size": ctx.world_size, "global_batch": global_batch, "grad_accumulation": args.grad_accumulation,
            "data": {"labels": dataset.num_labels, "usable": len(dataset),
                     "fingerprint": ckpt.fingerprint(e.path for e in dataset.entries)},
            "skipped": [dataclasses.asdict(s) for s in dataset.skipped],
            "decode_failures": failures_before + [dataclasses.asdict(s) for s in dataset.decode_failures],
            "args": {k: v for k, v in vars(args).items()},
        }
        path = ckpt.save(ckpt_root, step, _param_state(model), ema_state, train_state, state, args.keep_last)
        log.info(f"saved checkpoint {path}")

    log.info(f"training steps {start_step + 1}..{max_steps}: batch {args.batch_size} x {ctx.world_size} rank(s) x "
             f"{args.grad_accumulation} accumulation, {stream.per_epoch} batches per epoch, {args.optimizer} lr {lr:.3g} "
             f"(warm-up {args.warmup_steps}), clip {args.clip_grad or 'off'}, ema {args.ema_rate if ema else 'off'}, "
             f"{args.mixed_precision}{' + dynamic loss scale' if dynamic else ''}; set-up {time.time() - t_setup:.1f}s")

    # 6. the loop
    step_times, window, skipped_steps = [], [], 0
    last_tic = time.time()
    step = start_step
    for step in range(start_step + 1, max_steps + 1):
        tic = time.time()
        step_lr = Tensor(constant_with_warmup(step - 1, lr, args.warmup_steps), ms.float32)
        losses, data_time = [], 0.0
        for micro in range(args.grad_accumulation):
            t_data = time.time()
            ref = next(stream)
            batch = builder(ref)
            data_time += time.time() - t_data
            if step == start_step + 1 and micro == 0:
                log.rank(f"first batch (global batch {ref.index}, bucket {ref.bucket}): "
                         + ", ".join(e.path for e in ref.entries))
            out = step_cell(*(Tensor(batch[k]) for k in BATCH_KEYS), step_lr, micro == args.grad_accumulation - 1)
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
               "bucket": ref.bucket, "images_per_s": effective / dt, "step_time": dt, "data_time": data_time}
        log.record(row)
        window.append(row)
        if step % args.log_every == 0 or step == start_step + 1 or step == max_steps:
            t = time.time() - last_tic
            imgs = effective * len(window) / max(t, 1e-9)
            mean = lambda k: float(np.mean([r[k] for r in window]))
            log.info(f"step {step}/{max_steps} | loss {mean('loss'):.4f} (mse {mean('mse'):.4f}, vb {mean('vb'):.4f}) "
                     f"| lr {row['lr']:.3g} | grad norm {mean('grad_norm'):.3g} | {imgs:.2f} img/s (data {mean('data_time'):.3f}s) "
                     f"| loss scale "
                     f"{row['loss_scale']:g}" + (f" | {sum(r['skipped'] for r in window)} skipped (overflow)"
                                                  if any(r["skipped"] for r in window) else ""))
            window, last_tic = [], time.time()
        if step % args.save_every == 0 and step != max_steps:
            save(step, stream.next_index)
        if validation is not None and step % args.validation_every == 0:
            validation(step, out_dir=Path(args.output_dir) / "validation")
    if max_steps > start_step:
        save(step, stream.next_index)

    failures = failures_before + [dataclasses.asdict(s) for s in dataset.decode_failures]
    if failures:
        log.info(f"data: {len(failures)} image(s) failed to decode and were replaced: " +
                 "; ".join(f"{f['path']} ({f['reason']})" for f in failures[:5]))
    summary = {"steps": max_steps, "skipped_steps": skipped_steps, "peak_rss_mb": _peak_rss_mb(),
               # the first steps compile (one graph per bucket shape in graph mode): the median skips them
               "median_step_s": float(np.median(step_times[2:] or step_times)) if step_times else None,
               "skipped_images": len(dataset.skipped) + len(failures)}
    log.info(f"done: {max_steps} steps, {skipped_steps} skipped; median step {summary['median_step_s'] or 0:.3f}s, "
             f"peak RSS {summary['peak_rss_mb']:.0f} MB; {summary['skipped_images']} image(s) skipped")
    log.record({"summary": summary})
    if args.param_digest:
        log.rank(f"parameter digest {_digest(model)}")
    return summary


def _restore(resumed, path, model, optimizer, ema, step_cell, args, ctx, dataset, log) -> tuple[int, int]:
    from mindspore import Tensor
    from pixart.checkpoints import CheckpointError, load_into
    from pixart.training import checkpoint as ckpt
    state = resumed["state"]
    load_into(model, resumed["model"], what=f"model of checkpoint {path}")
    if state.get("optimizer") != args.optimizer:
        raise TrainError(f"checkpoint {path} was trained with {state.get('optimizer')}, not --optimizer "
                         f"{args.optimizer}")
    try:
        optimizer.load_state_dict(resumed["train_state"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    for p in step_cell.state_parameters():
        if p.name in resumed["train_state"]:
            p.set_data(Tensor(resumed["train_state"][p.name]).astype(p.dtype))
    if ema is not None:
        if resumed["ema"] is None:
            log.info(f"note: checkpoint {path} has no EMA; the EMA restarts from the weights")
        else:
            ema.load_state_dict(resumed["ema"])
    if state.get("global_batch") != args.batch_size * ctx.world_size:
        log.info(f"warning: the checkpoint was trained with a global batch of {state.get('global_batch')}, now "
                 f"{args.batch_size * ctx.world_size}: the data order differs from an uninterrupted run")
    if state.get("data", {}).get("fingerprint") != ckpt.fingerprint(e.path for e in dataset.entries):
        log.info("warning: the usable data differ from the checkpoint's; the data order differs from an "
                 "uninterrupted run")
    log.info(f"resumed from {path}: step {state['step']}, {state['batches_done']} batches consumed "
             f"(epoch {state.get('epoch')})")
    return int(state["step"]), int(state["batches_done"])
