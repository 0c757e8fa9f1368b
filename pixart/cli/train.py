"""What `train.py` does once its options are parsed: check everything that needs no model, then run the trainer
(`pixart.training.trainer`) for full fine-tuning. The checks are shared with the LoRA script."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from pixart.cli.options import (ArgumentParser, DTYPES, add_data_group, add_encoder_options, add_execution_group,
                                add_kv_compress_group, add_model_group, add_precision_group, mode_name, str2bool)
from pixart.data.sources import check_data_args
from pixart.models.pixart import preset_config
from pixart.training.setup import TrainError, default_flag
from pixart.training.trainer import Method, Trainer


def add_model_options(p, default: str | None):
    """The model group of the training scripts: the preset, optionally reduced."""
    g = add_model_group(p, default)
    g.add_argument("--depth", type=int, default=None, help="reduce the preset (tests, experiments)")
    g.add_argument("--hidden_size", type=int, default=None, help="reduce the preset; heads are 72 wide")
    g.add_argument("--num_heads", type=int, default=None)
    return g


def add_training_data_options(p):
    """Data, with the encoders that turn it into captions features and latents."""
    g = add_data_group(p)
    add_encoder_options(g)
    return g


def add_precision_options(p):
    g = add_precision_group(p, text_encoder_dtype="fp32")
    g.add_argument("--vae_dtype", default="fp32", choices=DTYPES)
    g.add_argument("--mixed_precision", default="fp32", type=lambda v: "fp32" if v == "no" else v,
                   choices=DTYPES,
                   help="compute precision (weights and optimizer stay fp32; 'no' = fp32); fp16/bf16 are for Ascend")
    g.add_argument("--loss_scaler", default="auto", choices=["auto", "dynamic", "static"],
                   help="auto: dynamic for fp16, static otherwise")
    g.add_argument("--init_loss_scale", type=float, default=None, help="default: 65536 dynamic, 1 static")
    g.add_argument("--loss_scale_window", type=int, default=1000)
    return g


def add_training_execution_options(p):
    g = add_execution_group(p, mode="graph")
    g.add_argument("--recompute", type=str2bool, nargs="?", const=True, default=False,
                   help="recompute each block in the backward pass (MindSpore CPU graph mode: block by block from "
                        "the host, pixart/cpu/blockwise.py, the lowest-memory way there)")
    g.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel under msrun")
    g.add_argument("--threads", type=int, default=None, help="MindSpore runtime threads")
    return g


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_model_options(p, "PixArt-Sigma-XL-2-512-MS")
    g.add_argument("--load_from", default=None, help="pretrained weights to fine-tune (.pth, .ckpt, .safetensors, "
                   "diffusers folder); default: PixArt's initialisation from --seed")
    add_kv_compress_group(p, scale_factor=2)
    add_training_data_options(p)

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
    add_precision_options(p)
    add_training_execution_options(p)

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


def check_common_args(args, flag: Callable[[str], str] = default_flag) -> None:
    """The checks train.py and the LoRA script share: files, data and loop numbers, resume path."""
    mode_name(args, TrainError)
    if args.model is not None:
        preset_config(args.model)
    check_data_args(args, flag)
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


def run(args) -> dict:
    """train.py: full fine-tuning."""
    check_args(args)
    return Trainer(args, Method(), mode_name(args)).run()
