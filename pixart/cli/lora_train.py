"""What `pixart/lora-finetuning/train_pixart_lora.py` does: LoRA fine-tuning of a pretrained PixArt-α / Σ, the one
trainer (`pixart.training.trainer`) with the LoRA method (`pixart.training.lora`).

The flags are those of diffusers' `train_text_to_image_lora.py` and PixArt's LoRA example
(`--pretrained_model_name_or_path`, `--rank`, `--train_batch_size`, `--checkpointing_steps`, ...), with train.py's
names accepted as aliases (`--batch_size`, `--save_every`, ...) and train.py's data flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pixart.cli.options import ArgumentParser, add_kv_compress_group, flag_namer, mode_name, str2bool
from pixart.cli.train import (add_dreambooth_options, add_model_options, add_precision_options,
                              add_training_data_options, add_training_execution_options, check_common_args,
                              device_fallbacks, warn)
from pixart.data.dreambooth import check_training_data
from pixart.pipelines.loading import resolve_pipeline_folder, resolve_pretrained
from pixart.training.lora import LoRAMethod
from pixart.training.optimizers import add_lr_schedule_options
from pixart.training.setup import TrainError
from pixart.training.trainer import Trainer



def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_model_options(p, None)
    g.add_argument("--pretrained_model_name_or_path", "--checkpoint", "--load_from", dest="load_from", default=None,
                   help="the base model: a diffusers pipeline folder (transformer/, vae/, text_encoder/, "
                        "tokenizer/; sets --model and the encoder folders) or its hub id when it is in the local "
                        "Hugging Face cache (nothing is downloaded), or transformer weights (.pth, .ckpt, "
                        ".safetensors, a diffusers transformer folder)")
    p.set_defaults(model=None)  # --model: default the preset of a pipeline folder, or the one the weights match

    add_kv_compress_group(p, scale_factor=2)
    add_training_data_options(p)
    p.set_defaults(class_dropout_prob=0.0)  # diffusers' --proportion_empty_prompts default

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "--lorarank", dest="rank", type=int, default=16, help="rank r of the low-rank updates")
    g.add_argument("--lora_alpha", type=float, default=None, help="alpha; updates are scaled by alpha / r "
                   "(default: alpha = rank, scale 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branches' input")
    g.add_argument("--lora_targets", nargs="+", default=["all"],
                   help="all: every linear layer and the patch embedding's convolution (default; the reference "
                        "LoRA script's targets); blocks: the attention and MLP linears of every block; or module "
                        "names, matched as suffixes: "
                        "attn.qkv attn.proj cross_attn.q_linear cross_attn.kv_linear cross_attn.proj mlp.fc1 "
                        "mlp.fc2 t_block.1 y_embedder.y_proj.fc1 final_layer.linear ...")
    g.add_argument("--use_rslora", type=str2bool, nargs="?", const=True, default=False,
                   help="rank-stabilised scaling alpha / sqrt(r)")

    g = p.add_argument_group("optimisation (AdamW on the LoRA weights only)")
    g.add_argument("--learning_rate", type=float, default=1e-6)
    g.add_argument("--train_batch_size", "--batch_size", dest="batch_size", type=int, default=16, help="per rank")
    g.add_argument("--gradient_accumulation_steps", "--grad_accumulation", dest="grad_accumulation", type=int,
                   default=1)
    g.add_argument("--num_train_epochs", "--epochs", dest="epochs", type=int, default=100)
    g.add_argument("--max_train_steps", "--max_steps", dest="max_steps", type=int, default=None,
                   help="optimizer steps (overrides --num_train_epochs)")
    add_lr_schedule_options(g, "constant")
    g.add_argument("--lr_warmup_steps", "--warmup_steps", dest="warmup_steps", type=int, default=500,
                   help="linear warm-up (not used by --lr_scheduler constant, as in diffusers)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", "--clip_grad", dest="clip_grad", type=float, default=1.0,
                   help="global gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=42, help="every random draw (the reference's default None is an "
                   "unseeded run; here ranks must agree on the data order, so there is always a seed)")
    add_precision_options(p)
    add_training_execution_options(p)

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
    add_refused_options(p)
    add_dreambooth_options(p)
    # what the trainer reads and this script fixes
    p.set_defaults(optimizer="adamw", use_ema=False, ema_rate=0.0, auto_lr="none")
    return p


# The reference LoRA script's options (not data options) that this trainer does not have: accepted by the parser so
# that the refusal names the reason, never silently ignored. flag -> (argparse keywords, default, reason).
REFUSED = {
    "--revision": ({}, None, "weights come from a local folder here, not the hub"),
    "--variant": ({}, None, "weights come from a local folder here, not the hub"),
    "--push_to_hub": ({"action": "store_true"}, False, "this script does not upload; copy --output_dir"),
    "--hub_token": ({}, None, "this script does not upload; copy --output_dir"),
    "--hub_model_id": ({}, None, "this script does not upload; copy --output_dir"),
    "--scale_lr": ({"action": "store_true"}, False, "not implemented; scale --learning_rate yourself"),
    "--prediction_type": ({"choices": ["epsilon", "v_prediction"]}, None,
                          "PixArt predicts epsilon (and its variance) only"),
    "--enable_xformers_memory_efficient_attention": ({"action": "store_true"}, False,
                                                     "no xformers in MindSpore; --enable_flash_attention is Ascend's"),
    "--micro_conditions": ({"action": "store_true"}, False,
                           "micro-conditions follow the preset (on for PixArt-XL-2-1024-MS)"),
}
ALLOWED = {"--prediction_type": "epsilon"}  # the value that is what this trainer does anyway


def add_refused_options(p) -> None:
    g = p.add_argument_group("reference options not supported here (each refused with its reason)")
    for name, (kwargs, default, reason) in REFUSED.items():
        g.add_argument(name, default=default, help=reason, **kwargs)


def check_refused(args) -> None:
    for name, (_, default, reason) in REFUSED.items():
        value = getattr(args, name.lstrip("-"))
        if value not in (default, ALLOWED.get(name)):
            raise TrainError(f"{name} {value if not isinstance(value, bool) else ''}".rstrip() + f": {reason}")


FLAG = flag_namer(build_parser())


# ----------------------------------------------------------------------------------------------------------------
# Options -> what the trainer reads; checks that need no model
# ----------------------------------------------------------------------------------------------------------------
def is_hub_id(name: str) -> bool:
    """`owner/name`, as a Hugging Face hub id is written (`PixArt-alpha/PixArt-XL-2-512x512`)."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith(
        (".ckpt", ".pth", ".safetensors", ".bin"))


def complete_args(args) -> None:
    """Fill in what the flags imply: a pipeline folder's components and preset, a checkpoint named relative to
    --output_dir (as diffusers resolves it), AdamW's settings, the lr schedule."""
    base = Path(args.load_from) if args.load_from else None
    if base is not None and not base.exists() and is_hub_id(args.load_from):  # in the local Hugging Face cache
        base = resolve_pretrained(args.load_from)
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
    check_refused(args)
    device_fallbacks(args, FLAG)
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
    check_training_data(args, FLAG, warn)


def run(args) -> dict:
    complete_args(args)
    check_args(args)
    return Trainer(args, LoRAMethod(), mode_name(args), FLAG).run()
