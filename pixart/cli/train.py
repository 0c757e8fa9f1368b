"""What `train.py` does once its options are parsed: check everything that needs no model, then run the trainer
(`pixart.training.trainer`) for full fine-tuning. The checks are shared with the LoRA script."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pixart.cli.options import (ArgumentParser, DTYPES, add_data_group, add_encoder_options, add_execution_group,
                                add_kv_compress_group, add_model_group, add_precision_group, mode_name, option_group,
                                str2bool)
from pixart.data.dreambooth import check_training_data
from pixart.models.pixart import preset_config
from pixart.training.optimizers import add_lr_schedule_options, check_lr_schedule
from pixart.training.setup import TrainError, default_flag
from pixart.training.controlnet import ControlNetMethod, check_controlnet_training_args
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
    g.add_argument("--mixed_precision", default="fp32", type=lambda v: "fp32" if v in ("no", None) else v,
                   choices=DTYPES,
                   help="compute precision (weights and optimizer stay fp32; 'no' = fp32); fp16/bf16 are for Ascend "
                        "(on CPU fp16 falls back to fp32 with a warning)")
    g.add_argument("--loss_scaler", default="auto", choices=["auto", "dynamic", "static"],
                   help="auto: dynamic for fp16, static otherwise")
    g.add_argument("--init_loss_scale", type=float, default=None, help="default: 65536 dynamic, 1 static")
    g.add_argument("--loss_scale_window", type=int, default=1000, help="dynamic scaling: finite steps before it grows")
    g.add_argument("--loss_scale_factor", type=float, default=2.0,
                   help="dynamic scaling: x factor after a window of finite steps, / factor on overflow")
    g.add_argument("--drop_overflow_update", type=str2bool, default=True,
                   help="skip the update of a step whose gradients overflow (only true is supported)")
    return g


# ---------------------------------------------------------------------------------------------------------------
# The reference MindSpore port's train.py options that are not a plain alias of ours (aliases: ALIASES in
# pixart.cli.options); `resolve_reference_options` turns them into ours after parsing.
# ---------------------------------------------------------------------------------------------------------------
SAMPLE_SIZE_PRESETS = {  # --sample_size (latent size) -> the preset of the same family at that size
    "sigma": {32: "PixArt-Sigma-XL-2-256x256", 64: "PixArt-Sigma-XL-2-512-MS", 128: "PixArt-Sigma-XL-2-1024-MS",
              256: "PixArt-Sigma-XL-2-2K-MS"},
    "alpha": {32: "PixArt-XL-2-256x256", 64: "PixArt-XL-2-512x512", 128: "PixArt-XL-2-1024-MS"},
}
BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def clip_value(value):
    """--clip_grad: true/false (clip at --max_grad_norm, the reference port's switch) or a number (the norm; 0: off)."""
    if isinstance(value, (bool, int, float)):
        return value
    if str(value).strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[str(value).strip().lower()]
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true/false (clip at --max_grad_norm) or a norm, got {value!r}") \
            from None


def add_reference_options(p) -> None:
    """The reference port's options with no plain counterpart here, each into the group it belongs to."""
    g = option_group(p, "model")
    g.add_argument("--sample_size", type=int, default=None, choices=[256, 128, 64, 32],
                   help="latent size (image size / 8): picks the preset of --model's family at that size "
                        "(32: 256x256, 64: 512, 128: 1024-MS, 256: 2K-MS)")
    g = option_group(p, "data")
    g.add_argument("--path_column", default="path", help="the label JSON's image-path key (only 'path' is read)")
    g.add_argument("--num_parallel_workers", type=int, default=1,
                   help="image-decoding threads per rank")
    g = option_group(p, "optimisation")
    g.add_argument("--scheduler", default="constant", choices=["constant"],
                   help="the reference's learning-rate schedule: constant after a linear warm-up of --warmup_steps "
                        "(--lr_scheduler constant_with_warmup)")
    add_lr_schedule_options(g, "constant_with_warmup")
    g.add_argument("--adamw_eps", "--optim_eps", dest="adamw_eps", type=float, default=None,
                   help="AdamW's eps (same as --eps with --optimizer adamw)")
    g.add_argument("--came_betas", type=float, nargs="*", default=None, help="CAME's 3 betas (as --betas with came)")
    g.add_argument("--came_eps", type=float, nargs="*", default=None, help="CAME's 2 eps (as --eps with came)")
    g.add_argument("--max_grad_norm", type=float, default=0.01, help="the norm --clip_grad true clips at")
    g = option_group(p, "checkpoints and logs")
    g.add_argument("--ckpt_save_interval", type=int, default=None,
                   help="also save a checkpoint every N EPOCHS (and at the end); --save_every counts steps")
    g.add_argument("--visualize", type=str2bool, default=False,
                   help="validation images every --visualize_interval epochs and at the end (needs "
                        "--validation_prompts)")
    g.add_argument("--visualize_interval", type=int, default=1, help="epochs between --visualize images")
    g.add_argument("--validation_negative_prompts", nargs="*", default=None,
                   help="one negative prompt per validation prompt (default: the empty caption)")
    g.add_argument("--sampling_method", default="dpm", choices=["dpm", "iddpm", "ddim", "sa"],
                   help="sampler of the validation images")


def resolve_reference_options(args, flag: Callable[[str], str] = default_flag) -> None:
    """The reference port's options -> ours (a request that cannot be honoured raises TrainError), then the device
    fallbacks."""
    if isinstance(args.auto_lr, str) and args.auto_lr == "":
        args.auto_lr = "none"
    if isinstance(args.clip_grad, bool):
        args.clip_grad = args.max_grad_norm if args.clip_grad else 0.0
    args.clip_grad = float(args.clip_grad)
    if args.sample_size is not None and args.model is not None:
        family = "sigma" if "Sigma" in args.model else "alpha"
        if preset_config(args.model).input_size != args.sample_size:
            if args.sample_size not in SAMPLE_SIZE_PRESETS[family]:
                raise TrainError(f"{flag('sample_size')} {args.sample_size}: no {family} preset of that latent size; "
                                 f"allowed: {', '.join(map(str, SAMPLE_SIZE_PRESETS[family]))}")
            args.model = SAMPLE_SIZE_PRESETS[family][args.sample_size]
    if args.path_column != "path":
        raise TrainError(f"{flag('path_column')} {args.path_column!r}: the label JSON's image path is read from its "
                         "'path' key only")
    optimizer = args.optimizer
    if optimizer == "adamw" and args.adamw_eps is not None and args.eps is None:
        args.eps = [args.adamw_eps]
    if optimizer == "came":
        if args.came_betas and args.betas is None:
            args.betas = list(args.came_betas)
        if args.came_eps and args.eps is None:
            args.eps = list(args.came_eps)
    counts = {"adamw": (2, 1), "came": (3, 2)}.get(optimizer)
    for name, n in zip(("betas", "eps"), counts or ()):
        if getattr(args, name) is not None and len(getattr(args, name)) != n:
            raise TrainError(f"{flag(name)}: {optimizer} takes {n} value(s), got {getattr(args, name)} (the "
                             "optimizer's own keys, --adamw_eps / --came_betas / --came_eps, apply only to it)")
    device_fallbacks(args, flag)


def device_fallbacks(args, flag: Callable[[str], str] = default_flag) -> None:
    """fp16 training on CPU (a config written for Ascend): one warning line, then fp32 (train.py and the LoRA
    script). The device-wide fallbacks (flash attention, bf16, the device itself) are `check_execution`'s."""
    if args.mixed_precision == "fp16" and args.device_target == "CPU":
        warn(f"{flag('mixed_precision')} fp16: fp16 training (with dynamic loss scaling) is for Ascend; training "
             "in fp32 on CPU")
        args.mixed_precision = "fp32"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def add_dreambooth_options(p):
    """DreamBooth (diffusers' train_dreambooth*.py names): instance images with one prompt, optional prior
    preservation with class images, sampled from the base model when --class_data_dir holds too few."""
    g = p.add_argument_group("DreamBooth")
    g.add_argument("--instance_data_dir", default=None,
                   help="a folder of images of the subject (instead of --json_path / --dataset_name / "
                        "--train_data_dir); trained as square crops at the model's resolution")
    g.add_argument("--instance_prompt", default=None, help="the prompt of every instance image, e.g. "
                   "'a photo of sks dog'")
    g.add_argument("--with_prior_preservation", type=str2bool, nargs="?", const=True, default=False,
                   help="also train on class images with --class_prompt, weighted by --prior_loss_weight, so "
                        "that the class keeps what the base model makes of it")
    g.add_argument("--class_data_dir", default=None,
                   help="the class images; the missing ones up to --num_class_images are sampled into it first")
    g.add_argument("--class_prompt", default=None, help="the prompt of the class images, e.g. 'a photo of dog'")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the class images' loss")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="class images used; fewer in --class_data_dir are completed by sampling")
    g.add_argument("--class_inference_steps", type=int, default=20,
                   help="DPM-Solver++ steps per sampled class image (guidance: --validation_guidance)")
    return g


def add_controlnet_options(p):
    """train.py --controlnet: a PixArt-δ control branch on the frozen --load_from model."""
    g = p.add_argument_group("ControlNet")
    g.add_argument("--controlnet", type=str2bool, nargs="?", const=True, default=False,
                   help="train a control branch (copies of the first blocks, zero projections) on the frozen model")
    g.add_argument("--control_dir", default=None,
                   help="condition images, each at its training image's relative path (default: the training "
                        "image itself, made into edges by --control_type canny)")
    g.add_argument("--control_type", default=None, choices=["canny", "hed", "none"],
                   help="as sample.py's: canny: Canny edges of the condition image, on the fly (default without "
                        "--control_dir); hed: --control_dir holds HED maps (made gray); none: the --control_dir "
                        "images as they are, RGB (default with --control_dir)")
    g.add_argument("--copy_blocks_num", type=int, default=None,
                   help="blocks copied into the control branch (default: 13 of 28, the same fraction of a "
                        "reduced model)")
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
                   "diffusers folder); default or empty: PixArt's initialisation from --seed")
    add_kv_compress_group(p, scale_factor=2)
    add_training_data_options(p)

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "came"])
    g.add_argument("--learning_rate", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=None, help="default: adamw 0.03, came 0")
    g.add_argument("--betas", type=float, nargs="+", default=None, help="default: adamw 0.9 0.999, came 0.9 0.999 0.9999")
    g.add_argument("--eps", type=float, nargs="+", default=None, help="default: adamw 1e-10, came 1e-30 1e-16")
    g.add_argument("--warmup_steps", type=int, default=1000, help="constant lr after a linear warm-up")
    g.add_argument("--auto_lr", default="none", type=lambda v: "none" if v in ("", None) else v,
                   choices=["none", "sqrt", "linear"],
                   help="scale lr by (batch x ranks x accumulation / 256) or its square root ('' = none)")
    g.add_argument("--clip_grad", type=clip_value, default=True,
                   help="global gradient-norm clip: true/false (at --max_grad_norm) or the norm itself (0: off)")
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
    g.add_argument("--save_every", type=int, default=1000, help="steps between checkpoints (and one at the end); "
                   "they go to <output_dir>/checkpoints/step_XXXXXXXX/")
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
    add_reference_options(p)
    add_dreambooth_options(p)
    add_controlnet_options(p)
    return p


def check_common_args(args, flag: Callable[[str], str] = default_flag) -> None:
    """The checks train.py and the LoRA script share: files and loop numbers, resume path (the data's own checks,
    which read the label file or dataset, come last: `check_training_data`)."""
    mode_name(args, TrainError)
    if args.model is not None:
        preset_config(args.model)
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
    if args.timestep_bias_strategy == "range" and not args.timestep_bias_begin < args.timestep_bias_end:
        raise TrainError(f"{flag('timestep_bias_begin')} {args.timestep_bias_begin} must be below "
                         f"{flag('timestep_bias_end')} {args.timestep_bias_end}")
    if not args.learning_rate > 0:
        raise TrainError(f"{flag('learning_rate')} must be > 0, got {args.learning_rate}")
    for name in ("warmup_steps", "clip_grad", "keep_last"):
        if getattr(args, name) < 0:
            raise TrainError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    if not args.drop_overflow_update:
        raise TrainError(f"{flag('drop_overflow_update')} false is not supported: applying an overflowing step's "
                         "gradients would write inf/nan into the weights")
    if not args.loss_scale_factor > 1.0 or args.loss_scale_window < 1:
        raise TrainError(f"{flag('loss_scale_factor')} must be > 1 and {flag('loss_scale_window')} >= 1, got "
                         f"{args.loss_scale_factor}, {args.loss_scale_window}")
    if args.seed < 0:
        raise TrainError(f"{flag('seed')} must be >= 0, got {args.seed}")
    if args.validation_every and not args.validation_prompts:
        raise TrainError(f"{flag('validation_every')} needs {flag('validation_prompts')}")
    if args.validation_prompts and (args.validation_every or getattr(args, "visualize", False)) \
            and not (args.vae_root and args.text_encoder_root):
        raise TrainError(f"validation images need {flag('vae_root')} and {flag('text_encoder_root')}")
    if args.resume and args.resume != "latest" and not Path(args.resume).exists():
        raise TrainError(f"{flag('resume')} path not found: {args.resume}")
    check_lr_schedule(args, flag)


def check_args(args) -> None:
    """train.py's checks."""
    resolve_reference_options(args)
    check_common_args(args)
    if args.model is None:
        raise TrainError("--model is required (a preset name)")
    if not 0.0 <= args.ema_rate < 1.0:
        raise TrainError(f"--ema_rate must be in [0, 1), got {args.ema_rate}")
    for name in ("num_parallel_workers", "visualize_interval"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.ckpt_save_interval is not None and args.ckpt_save_interval < 1:
        raise TrainError(f"--ckpt_save_interval must be >= 1, got {args.ckpt_save_interval}")
    if args.visualize and not args.validation_prompts:
        raise TrainError("--visualize true needs --validation_prompts")
    if args.validation_negative_prompts and len(args.validation_negative_prompts) != len(args.validation_prompts or []):
        raise TrainError(f"--validation_negative_prompts: {len(args.validation_negative_prompts)} given for "
                         f"{len(args.validation_prompts or [])} validation prompt(s); give one each")
    if args.controlnet:
        check_controlnet_training_args(args)
    check_training_data(args, warn=warn)


def run(args) -> dict:
    """train.py: full fine-tuning, or a ControlNet with --controlnet."""
    check_args(args)
    return Trainer(args, ControlNetMethod() if args.controlnet else Method(), mode_name(args)).run()
