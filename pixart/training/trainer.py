"""The one trainer: full fine-tuning, LoRA and ControlNet are the same run, configured by a `Method` that says what
trains, how its weights are resumed and how its checkpoints are laid out; DreamBooth (`pixart.training.dreambooth`)
changes the data and the loss of any of them.

The order of work: resume target -> log -> device and ranks were set up by `start` -> data (labels, buckets, cache;
DreamBooth's instance images) -> encoders (only what the cache lacks) -> model (init or pretrained weights) ->
DreamBooth's class images (sampled from that model where missing) -> the method's model (ControlNet's branch) and
surgery (LoRA) -> loss, optimizer, EMA, train step -> resume -> the loop (lr, micro-batches, step, log, checkpoint,
validation) -> final checkpoint -> the method's last files -> summary.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from pixart.io import load_into
from pixart.models.convert import architecture_record, convert_pixart
from pixart.training import checkpoint as ckpt
from pixart.training.log import Logger
from pixart.training.loop import finish, train_loop
from pixart.training.resume import param_state, restore_training_state, resume_target, run_state
from pixart.training.setup import (build_model, build_optimisation, data_settings, default_flag, for_training,
                                   open_stream, prepare_data, prior_preservation, start)
from pixart.training.dreambooth import class_data
from pixart.training.validation import Validation


class Method:
    """What a kind of fine-tuning decides; the trainer does the rest. Full fine-tuning is this class itself."""

    script = "train.py"
    layout = ckpt.FULL  # checkpoint folder names

    def checkpoint_root(self, args) -> Path:
        return Path(args.output_dir) / "checkpoints"

    def load_checkpoint(self, path) -> dict:
        return ckpt.load(path)

    def begin(self, args) -> None:
        """Before anything is logged (the LoRA method picks the preset from its base weights here)."""

    def describe(self, args, ctx, mode: str, resolution: int, multi_scale: bool) -> str:
        return (f"{self.script}: {args.model} at {resolution} px "
                f"({'multi-aspect buckets' if multi_scale else 'square'}), {ctx.world_size} rank(s), {mode} mode on "
                f"{args.device_target}")

    def pretrained(self, args):
        """The (state, config) of the weights to start from (`convert_pixart`), or None for PixArt's init."""
        return convert_pixart(args.load_from) if args.load_from else None

    def wrap(self, model, args, log):
        """The model that trains, built around the PixArt just made (the ControlNet method puts a control branch
        around it); full fine-tuning trains the PixArt itself."""
        return model

    def trainable(self, model, args, log) -> list:
        """The parameters the optimizer updates (after any layer surgery, before compilation)."""
        return model.trainable_params()

    def loss(self, compute_model, args):
        """The loss Cell the train step differentiates; None: the trainer's (`build_optimisation`)."""
        return None

    def batches(self, builder, data, args):
        """The batch builder the loop calls (the ControlNet method adds the condition latents)."""
        return builder

    def report_model(self, model, params, data, args) -> str:
        n_params = sum(int(np.prod(p.shape)) for p in params)
        return (f"model: depth {model.config.depth}, width {model.config.hidden_size}, {model.config.num_heads} "
                f"heads, {n_params / 1e6:.2f} M trainable parameters, captions {data.max_length} x "
                f"{data.caption_channels}, latents x{data.scaling:g}")

    def use_ema(self, args) -> bool:
        return args.use_ema

    def restore(self, resumed, path, model, opt, args, log) -> None:
        """The trained weights of checkpoint `resumed` (the optimizer state is the trainer's)."""
        load_into(model, resumed["model"], what=f"model of checkpoint {path}")
        if opt.ema is not None:
            if resumed["ema"] is None:
                log.info(f"note: checkpoint {path} has no EMA; the EMA restarts from the weights")
            else:
                opt.ema.load_state_dict(resumed["ema"])

    def validation(self, args, steps_per_epoch: int) -> tuple[list | None, int] | None:
        """(prompts, steps between validations) or None for none; prompts None: --validation_prompts, one image
        each."""
        if getattr(args, "visualize", False):  # the reference port's: every N epochs (and at the end)
            return None, args.visualize_interval * max(steps_per_epoch, 1)
        return (None, args.validation_every) if args.validation_every else None

    def save(self, root: Path, step: int, model, opt, train_state: dict, state: dict, args) -> Path:
        ema_state = {**param_state(model), **opt.ema.state_dict()} if opt.ema is not None else None
        return ckpt.save(root, step, param_state(model), ema_state, train_state, state, args.keep_last,
                         architecture_record(model.config, args.model))

    def schedule(self, args, opt) -> str:
        return (f"{args.optimizer} lr {opt.lr:.3g} (warm-up {args.warmup_steps}), clip {args.clip_grad or 'off'}, "
                f"ema {args.ema_rate if opt.ema else 'off'}")

    def end(self, model, args, ctx, log, validate: Callable[[int], None] | None, validate_every: int,
            start_step: int, max_steps: int) -> None:
        """After the last checkpoint, before the summary (the LoRA method writes its file here)."""

    def digests(self, model) -> list[tuple[str, dict]]:
        """(label, state) pairs whose SHA-256 every rank prints with --param_digest."""
        return [("parameter digest", param_state(model))]


class Trainer:
    """A training run of `method` with options `args` (checked by the CLI), in execution `mode`; `flag` names
    options in error messages."""

    def __init__(self, args, method: Method, mode: str, flag: Callable[[str], str] = default_flag):
        self.args, self.method, self.mode, self.flag = args, method, mode, flag

    def run(self) -> dict:
        """Train; returns the summary (steps, skipped steps, median step time, peak RSS, skipped images)."""
        args, method = self.args, self.method
        ctx = start(args, self.mode)
        root = method.checkpoint_root(args)
        resume_from = resume_target(args, root, ctx, method.layout, self.flag)
        resumed = method.load_checkpoint(resume_from) if resume_from is not None else None
        log = Logger(Path(args.output_dir), ctx, resumed["state"]["step"] if resumed else None,
                     getattr(args, "report_to", "none"), getattr(args, "logging_dir", "logs"))
        try:
            return self._train(ctx, log, resumed, resume_from, root)
        finally:
            log.close()

    def _train(self, ctx, log, resumed, resume_from, root: Path) -> dict:
        args, method = self.args, self.method
        t_setup = time.time()
        method.begin(args)
        resolution, multi_scale, _ = data_settings(args)
        log.info(method.describe(args, ctx, self.mode, resolution, multi_scale))
        data = prepare_data(args, ctx, log, self.flag)

        model = build_model(args, data, log, method.pretrained(args))
        if prior_preservation(args):  # DreamBooth: class images from the base weights, before any LoRA surgery
            data.classes = class_data(args, ctx, log, model, data)
        model = method.wrap(model, args, log)
        params = method.trainable(model, args, log)  # before any compilation: a compiled graph would not see it
        compute_model = for_training(model, args)
        log.info(method.report_model(model, params, data, args))
        opt = build_optimisation(args, compute_model, params, ctx, data.global_batch, log, method.use_ema(args),
                                 method.loss(compute_model, args))

        start_step, batches_done, failures_before = 0, 0, []
        if resumed:
            method.restore(resumed, resume_from, model, opt, args, log)
            start_step, batches_done = restore_training_state(resumed, resume_from, opt, args, ctx, data.dataset,
                                                              log)
            failures_before = resumed["state"].get("decode_failures", [])
        stream, builder, steps_per_epoch, max_steps = open_stream(args, data, ctx, batches_done, self.flag)
        builder = method.batches(builder, data, args)

        validate, validate_every = None, 0
        plan = method.validation(args, steps_per_epoch)
        if plan is not None and ctx.is_main:
            prompts, validate_every = plan
            validation = Validation(model, args, data.max_length, data.scaling, data.resolution, data.text_encoder,
                                    log.info, prompts=prompts)

            def validate(step: int) -> None:
                log.images(step, validation(step, out_dir=Path(args.output_dir) / "validation"))

        def save(step: int, batches: int) -> None:
            if not ctx.is_main:
                return
            train_state = {**opt.optimizer.state_dict(),
                           **{p.name: p.asnumpy() for p in opt.step_cell.state_parameters()}}
            state = run_state(step, batches, args, ctx, data, stream, failures_before)
            path = method.save(root, step, model, opt, train_state, state, args)
            log.info(f"saved checkpoint {path}")

        log.info(f"training steps {start_step + 1}..{max_steps}: batch {args.batch_size} x {ctx.world_size} rank(s) "
                 f"x {args.grad_accumulation} accumulation, {stream.per_epoch} batches per epoch, "
                 f"{method.schedule(args, opt)}, {args.mixed_precision}"
                 f"{' + dynamic loss scale' if opt.dynamic else ''}; set-up {time.time() - t_setup:.1f}s")
        loop = train_loop(args, opt, stream, builder, start_step, max_steps, log, save, validate, validate_every,
                          steps_per_epoch, validate_last=getattr(args, "visualize", False))
        method.end(model, args, ctx, log, validate, validate_every, start_step, max_steps)
        summary = finish(args, log, data, failures_before, max_steps, loop)
        if args.param_digest:
            for label, state in method.digests(model):
                log.rank(f"{label} {ckpt.digest(state)}")
        return summary
