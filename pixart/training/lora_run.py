"""What `pixart/lora-finetuning/train_pixart_lora.py` does: LoRA fine-tuning of a pretrained PixArt-α / Σ.

It is train.py with three differences, everything else (data, feature cache, IDDPM loss, train step, exact resume,
msrun data parallel, logs) being train.py's own code from `pixart.training.run`:

* the model: the pretrained transformer, frozen, with fresh LoRA branches (`pixart.models.lora.inject_lora`) on the
  target layers; AdamW updates the LoRA matrices only, so the base weights stay bit-identical;
* the files: `<output_dir>/pytorch_lora_weights.safetensors` at the end, in diffusers' / peft's layout (loads
  with `sample.py --lora_path`, `tools/merge_lora.py`, diffusers' `load_lora_adapter`), and checkpoints named as
  diffusers names them, `<output_dir>/checkpoint-N/` (the LoRA file, optimizer state, state.json);
* the flags: those of diffusers' `train_text_to_image_lora.py` and PixArt's LoRA example
  (`--pretrained_model_name_or_path`, `--rank`, `--train_batch_size`, `--checkpointing_steps`, ...), with
  train.py's names accepted as aliases (`--batch_size`, `--save_every`, ...) and train.py's data flags.

The order of work: checks -> device and ranks -> resume target -> base weights (which preset) -> data -> model and
LoRA -> AdamW on the LoRA -> resume -> the loop -> the LoRA file -> a last validation.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from pixart.config import ArgumentParser, flag_namer, str2bool
from pixart.training.run import (Logger, TrainError, add_data_args, add_execution_args, add_model_args,
                                 add_precision_args, build_model, build_optimisation, check_common_args,
                                 data_settings, finish, for_training, open_stream, prepare_data, restore_training_state,
                                 resume_target, run_state, start, train_loop)

TARGET_SETS = {"blocks": "attention and MLP linears of every block", "all": "every linear layer"}


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_model_args(p, model_default=None)
    g.add_argument("--pretrained_model_name_or_path", "--checkpoint", "--load_from", dest="load_from", default=None,
                   help="the base model: a local diffusers pipeline folder (transformer/, vae/, text_encoder/, "
                        "tokenizer/; sets --model and the encoder folders), or transformer weights (.pth, .ckpt, "
                        ".safetensors, a diffusers transformer folder)")
    p.set_defaults(model=None)  # --model: default the preset of a pipeline folder, or the one the weights match

    add_data_args(p)
    p.set_defaults(class_dropout_prob=0.0)  # diffusers' --proportion_empty_prompts default

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="rank r of the low-rank updates")
    g.add_argument("--lora_alpha", type=float, default=None, help="alpha; updates are scaled by alpha / r "
                   "(default: alpha = rank, scale 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branches' input")
    g.add_argument("--lora_targets", nargs="+", default=["blocks"],
                   help="blocks: the attention and MLP linears of every block (default); all: every linear layer "
                        "(PixArt's LoRA example, less the patch embedding); or module names, matched as suffixes: "
                        "attn.qkv attn.proj cross_attn.q_linear cross_attn.kv_linear cross_attn.proj mlp.fc1 "
                        "mlp.fc2 t_block.1 y_embedder.y_proj.fc1 final_layer.linear ...")
    g.add_argument("--use_rslora", type=str2bool, nargs="?", const=True, default=False,
                   help="rank-stabilised scaling alpha / sqrt(r)")

    g = p.add_argument_group("optimisation (AdamW on the LoRA weights only)")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--train_batch_size", "--batch_size", dest="batch_size", type=int, default=16, help="per rank")
    g.add_argument("--gradient_accumulation_steps", "--grad_accumulation", dest="grad_accumulation", type=int,
                   default=1)
    g.add_argument("--num_train_epochs", "--epochs", dest="epochs", type=int, default=100)
    g.add_argument("--max_train_steps", "--max_steps", dest="max_steps", type=int, default=None,
                   help="optimizer steps (overrides --num_train_epochs)")
    g.add_argument("--lr_scheduler", default="constant", choices=["constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", "--warmup_steps", dest="warmup_steps", type=int, default=0,
                   help="linear warm-up (used by --lr_scheduler constant_with_warmup, as in diffusers)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", "--clip_grad", dest="clip_grad", type=float, default=1.0,
                   help="global gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=42)
    add_precision_args(g)
    add_execution_args(p)

    g = p.add_argument_group("checkpoints, validation and logs")
    g.add_argument("--output_dir", default="pixart-model-finetuned-lora")
    g.add_argument("--checkpointing_steps", "--save_every", dest="save_every", type=int, default=500,
                   help="steps between checkpoint-N folders (and one at the end)")
    g.add_argument("--checkpoints_total_limit", "--keep_last", dest="keep_last", type=int, default=None,
                   help="checkpoints kept (default: all)")
    g.add_argument("--resume_from_checkpoint", "--resume", dest="resume", default=None,
                   help="'latest' (the newest checkpoint-N in --output_dir) or a checkpoint folder")
    g.add_argument("--log_every", type=int, default=20, help="steps between log lines (every step: train_log.jsonl)")
    g.add_argument("--validation_prompt", "--validation_prompts", dest="validation_prompts", nargs="+", default=None,
                   help="prompt(s) sampled with the LoRA during training")
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation prompt")
    g.add_argument("--validation_epochs", type=int, default=1, help="epochs between validations")
    g.add_argument("--validation_every", type=int, default=None,
                   help="steps between validations (instead of --validation_epochs)")
    g.add_argument("--validation_sampling_steps", "--validation_steps", dest="validation_steps", type=int,
                   default=20, help="DPM-Solver++ steps per validation image")
    g.add_argument("--validation_guidance", type=float, default=4.5)
    g.add_argument("--validation_seed", type=int, default=None, help="default: --seed")
    g.add_argument("--param_digest", type=str2bool, default=False,
                   help="every rank prints SHA-256 digests of its LoRA and of its base weights")
    # what train.py's shared code reads and this script fixes
    p.set_defaults(optimizer="adamw", use_ema=False, ema_rate=0.0, auto_lr="none")
    return p


FLAG = flag_namer(build_parser())


# ----------------------------------------------------------------------------------------------------------------
# Options -> what the shared code reads; checks that need no model
# ----------------------------------------------------------------------------------------------------------------
def complete_args(args) -> None:
    """Fill in what the flags imply: a pipeline folder's components and preset, a checkpoint named relative to
    --output_dir (as diffusers resolves it), AdamW's settings, the lr schedule."""
    from pixart.pipelines.loading import resolve_pipeline_folder
    base = Path(args.load_from) if args.load_from else None
    if base is not None and ((base / "model_index.json").is_file() or (base / "transformer").is_dir()):
        for name, value in resolve_pipeline_folder(base, args.model).items():
            if name == "checkpoint":
                args.load_from = value
            elif getattr(args, name, None) is None:
                setattr(args, name, value)
    if args.resume and args.resume != "latest" and not Path(args.resume).exists() \
            and (Path(args.output_dir) / args.resume).exists():
        args.resume = str(Path(args.output_dir) / args.resume)
    args.keep_last = args.keep_last or 0
    args.betas, args.eps, args.weight_decay = [args.adam_beta1, args.adam_beta2], [args.adam_epsilon], \
        args.adam_weight_decay
    args.lr_warmup_steps = args.warmup_steps
    if args.lr_scheduler == "constant":
        args.warmup_steps = 0
    if args.validation_seed is None:
        args.validation_seed = args.seed


def check_args(args) -> None:
    check_common_args(args, FLAG)
    if not args.load_from:
        raise TrainError(f"{FLAG('load_from')} is required: a LoRA trains on top of pretrained weights (a diffusers "
                         "pipeline folder, or a .pth / .ckpt / .safetensors / diffusers transformer folder)")
    if args.rank < 1:
        raise TrainError(f"--rank must be >= 1, got {args.rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise TrainError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise TrainError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise TrainError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not args.adam_epsilon > 0 or args.adam_weight_decay < 0:
        raise TrainError(f"--adam_epsilon must be > 0 and --adam_weight_decay >= 0, got {args.adam_epsilon}, "
                         f"{args.adam_weight_decay}")
    for name in ("num_validation_images", "validation_epochs", "validation_steps"):
        if getattr(args, name) < 1:
            raise TrainError(f"{FLAG(name)} must be >= 1, got {getattr(args, name)}")
    if args.validation_every is not None and args.validation_every < 1:
        raise TrainError(f"--validation_every must be >= 1, got {args.validation_every}")
    if args.validation_prompts and not (args.vae_root and args.text_encoder_root):
        raise TrainError(f"{FLAG('validation_prompts')} needs --vae_root and --text_encoder_root (or a pipeline "
                         f"folder as {FLAG('load_from')}) to sample images")


def lora_settings(args) -> dict:
    """What a LoRA checkpoint must agree on with the run that resumes it."""
    return {"rank": args.rank, "alpha": float(args.lora_alpha or args.rank), "targets": list(args.lora_targets),
            "rslora": bool(args.use_rslora), "dropout": args.lora_dropout}


def target_names(spec: list[str], model) -> tuple[str, ...]:
    """--lora_targets -> module-name suffixes for `inject_lora` ('blocks' and 'all' expanded)."""
    from pixart.models.lora import BLOCK_TARGETS, linear_layers
    names: list[str] = []
    for item in spec:
        expanded = BLOCK_TARGETS if item == "blocks" else tuple(linear_layers(model)) if item == "all" else (item,)
        names += [n for n in expanded if n not in names]
    return tuple(names)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/checkpoint-N/{pytorch_lora_weights.safetensors, train_state.ckpt, state.json}
# ----------------------------------------------------------------------------------------------------------------
def load_checkpoint(path) -> dict:
    from pixart.io import CheckpointError, read_ckpt
    from pixart.models.lora import LORA_WEIGHT_NAME
    from pixart.training import checkpoint as ckpt
    path = Path(path)
    for name in (LORA_WEIGHT_NAME, ckpt.TRAIN_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is not a LoRA training checkpoint: no {name}")
    return {"lora": path / LORA_WEIGHT_NAME, "train_state": read_ckpt(path / ckpt.TRAIN_STATE),
            "state": ckpt.read_state(path)}


def write_lora(model, folder) -> Path:
    """`<folder>/pytorch_lora_weights.safetensors`, written to a temporary name and renamed (never half a file)."""
    from pixart.models.lora import LORA_WEIGHT_NAME, save_lora
    folder = Path(folder)
    tmp = save_lora(model, folder / f".{LORA_WEIGHT_NAME}.tmp.safetensors")
    final = folder / LORA_WEIGHT_NAME
    os.replace(tmp, final)
    return final


def _check_resumable(state: dict, path, args, log) -> None:
    saved = state.get("lora") or {}
    now = lora_settings(args)
    for key, flag in (("rank", "--rank"), ("alpha", "--lora_alpha"), ("targets", "--lora_targets"),
                      ("rslora", "--use_rslora")):
        if saved.get(key) != now[key]:
            raise TrainError(f"checkpoint {path} trained a LoRA with {flag} {saved.get(key)}, this run asks for "
                             f"{now[key]}")
    base = (state.get("args") or {}).get("load_from")
    if base != args.load_from:
        log.info(f"warning: the checkpoint's LoRA was trained on {base}, this run loads {args.load_from}")
    if args.lora_dropout > 0:
        log.info("note: LoRA dropout masks come from MindSpore's kernel RNG, which a checkpoint cannot hold: with "
                 "--lora_dropout > 0 the losses after a resume differ from an uninterrupted run's")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    from pixart.training import checkpoint as ckpt
    complete_args(args)
    check_args(args)
    mode, ctx = start(args)
    out_dir = Path(args.output_dir)
    resume_from = resume_target(args, out_dir, ctx, ckpt.LORA, FLAG)
    resumed = load_checkpoint(resume_from) if resume_from is not None else None
    log = Logger(out_dir, ctx, resumed["state"]["step"] if resumed else None)
    try:
        return _train(args, ctx, mode, log, resumed, resume_from, out_dir)
    finally:
        log.close()


def _preset_of(weights_cfg, path) -> str:
    from pixart.models.convert import match_preset
    name, diff = match_preset(weights_cfg)
    if name is None:
        raise TrainError(f"cannot tell which PixArt preset {path} is ({'; '.join(diff)}); pass --model")
    return name


def _train(args, ctx, mode, log, resumed, resume_from, out_dir: Path) -> dict:
    from pixart.io import write_ckpt
    from pixart.models.convert import convert_pixart
    from pixart.models import lora as L
    from pixart.training import checkpoint as ckpt
    from pixart.training.model_init import initialize_lora

    t_setup = time.time()
    pretrained = convert_pixart(args.load_from)
    args.model = args.model or _preset_of(pretrained[1], args.load_from)
    resolution, multi_scale, _ = data_settings(args)
    log.info(f"train_pixart_lora.py: LoRA on {args.model} ({args.load_from}) at {resolution} px "
             f"({'multi-aspect buckets' if multi_scale else 'square'}), {ctx.world_size} rank(s), {mode} mode on "
             f"{args.device_target}")
    data = prepare_data(args, ctx, log, FLAG)

    # the frozen base with fresh LoRA branches (before any compilation: a compiled graph would not see them)
    model = build_model(args, data, log, pretrained)
    del pretrained
    try:
        params = L.inject_lora(model, args.rank, args.lora_alpha, args.lora_dropout,
                               target_names(args.lora_targets, model), freeze_base=True, rslora=args.use_rslora)
    except ValueError as e:
        raise TrainError(f"--lora_targets: {e}") from None
    initialize_lora(params, args.seed)
    compute_model = for_training(model, args)
    n_lora = sum(int(np.prod(p.shape)) for p in params)
    n_base = sum(int(v.size) for v in L.base_state_dict(model).values())
    settings = lora_settings(args)
    log.info(f"LoRA: rank {args.rank}, alpha {settings['alpha']:g}{' (rsLoRA)' if args.use_rslora else ''}, "
             f"dropout {args.lora_dropout:g} on {len(L.lora_layers(model))} linear layers "
             f"({' '.join(args.lora_targets)}): {n_lora / 1e6:.3f} M trainable parameters, "
             f"{100 * n_lora / n_base:.2f}% of the frozen {n_base / 1e6:.2f} M")
    opt = build_optimisation(args, compute_model, params, ctx, data.global_batch, log, use_ema=False)

    start_step, batches_done, failures_before = 0, 0, []
    if resumed:
        _check_resumable(resumed["state"], resume_from, args, log)
        L.copy_lora_weights(model, resumed["lora"], log=log.info)
        start_step, batches_done = restore_training_state(resumed, resume_from, opt, args, ctx, data.dataset, log)
        failures_before = resumed["state"].get("decode_failures", [])
    stream, builder, steps_per_epoch, max_steps = open_stream(args, data, ctx, batches_done, FLAG)

    validation, validate_every = None, 0
    if args.validation_prompts and ctx.is_main:
        from pixart.training.validation import Validation
        prompts = [p for p in args.validation_prompts for _ in range(args.num_validation_images)]
        validation = Validation(model, args, data.max_length, data.scaling, data.resolution, data.text_encoder,
                                log.info, prompts=prompts)
        validate_every = args.validation_every or args.validation_epochs * max(1, steps_per_epoch)

    def validate(step: int) -> None:
        validation(step, out_dir=out_dir / "validation")

    def save(step: int, batches: int) -> None:
        if not ctx.is_main:
            return
        train_state = {**opt.optimizer.state_dict(),
                       **{p.name: p.asnumpy() for p in opt.step_cell.state_parameters()}}
        state = {**run_state(step, batches, args, ctx, data, stream, failures_before), "lora": settings}

        def write(folder: Path) -> None:
            L.save_lora(model, folder)
            write_ckpt(train_state, folder / ckpt.TRAIN_STATE)
            ckpt.write_state(folder, state)
        path = ckpt.save_folder(out_dir, step, write, args.keep_last, ckpt.LORA)
        log.info(f"saved checkpoint {path}")

    log.info(f"training steps {start_step + 1}..{max_steps}: batch {args.batch_size} x {ctx.world_size} rank(s) x "
             f"{args.grad_accumulation} accumulation, {stream.per_epoch} batches per epoch, adamw lr {opt.lr:.3g} "
             f"({args.lr_scheduler}, warm-up {args.warmup_steps}), clip {args.clip_grad or 'off'}, "
             f"{args.mixed_precision}{' + dynamic loss scale' if opt.dynamic else ''}; set-up "
             f"{time.time() - t_setup:.1f}s")
    loop = train_loop(args, opt, stream, builder, start_step, max_steps, log, save,
                      validate if validation else None, validate_every)
    if ctx.is_main:
        path = write_lora(model, out_dir)
        log.info(f"saved LoRA {path} ({path.stat().st_size / 1e6:.2f} MB): sample.py --lora_path {out_dir}")
        if validation is not None and max_steps > start_step and max_steps % validate_every:
            validate(max_steps)  # the final LoRA's images, as diffusers' script ends
    summary = finish(args, log, data, failures_before, max_steps, loop)
    if args.param_digest:
        log.rank(f"parameter digest {ckpt.digest(L.lora_state_dict(model))}")
        log.rank(f"base weights digest {ckpt.digest(L.base_state_dict(model))}")
    return summary
