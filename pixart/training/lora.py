"""LoRA fine-tuning as a method of the one trainer (`pixart.training.trainer`): everything else (data, feature cache,
IDDPM loss, train step, exact resume, msrun data parallel, logs) is the trainer's own.

* the model: the pretrained transformer, frozen, with fresh LoRA branches (`pixart.models.lora.inject_lora`) on the
  target layers; AdamW updates the LoRA matrices only, so the base weights stay bit-identical;
* the files: `<output_dir>/pytorch_lora_weights.safetensors` at the end, in diffusers' / peft's layout (loads
  with `sample.py --lora_path`, `tools/merge_lora.py`, diffusers' `load_lora_adapter`), and checkpoints named as
  diffusers names them, `<output_dir>/checkpoint-N/` (the LoRA file, optimizer state, state.json).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from pixart.io import CheckpointError, read_ckpt, write_ckpt
from pixart.models.convert import convert_pixart, match_preset
from pixart.models import lora as L
from pixart.training import checkpoint as ckpt
from pixart.training.setup import TrainError
from pixart.training.trainer import Method

def lora_settings(args) -> dict:
    """What a LoRA checkpoint must agree on with the run that resumes it."""
    return {"rank": args.rank, "alpha": float(args.lora_alpha or args.rank), "targets": list(args.lora_targets),
            "rslora": bool(args.use_rslora), "dropout": args.lora_dropout}


def target_names(spec: list[str], model) -> tuple[str, ...]:
    """--lora_targets -> module-name suffixes for `inject_lora` ('blocks' and 'all' expanded)."""
    names: list[str] = []
    for item in spec:
        expanded = L.BLOCK_TARGETS if item == "blocks" else tuple(L.linear_layers(model)) if item == "all" \
            else (item,)
        names += [n for n in expanded if n not in names]
    return tuple(names)


# Checkpoints: <output_dir>/checkpoint-N/{pytorch_lora_weights.safetensors, train_state.ckpt, state.json}
def load_checkpoint(path) -> dict:
    path = Path(path)
    for name in (L.LORA_WEIGHT_NAME, ckpt.TRAIN_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is not a LoRA training checkpoint: no {name}")
    return {"lora": path / L.LORA_WEIGHT_NAME, "train_state": read_ckpt(path / ckpt.TRAIN_STATE),
            "state": ckpt.read_state(path)}


def write_lora(model, folder) -> Path:
    """`<folder>/pytorch_lora_weights.safetensors`, written to a temporary name and renamed (never half a file)."""
    folder = Path(folder)
    tmp = L.save_lora(model, folder / f".{L.LORA_WEIGHT_NAME}.tmp.safetensors")
    final = folder / L.LORA_WEIGHT_NAME
    os.replace(tmp, final)
    return final


def check_resumable(state: dict, path, args, log) -> None:
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


def preset_of(weights_cfg, path) -> str:
    name, diff = match_preset(weights_cfg)
    if name is None:
        raise TrainError(f"cannot tell which PixArt preset {path} is ({'; '.join(diff)}); pass --model")
    return name


class LoRAMethod(Method):
    """LoRA on frozen pretrained weights (--load_from), AdamW on the LoRA matrices, no EMA."""

    script = "train_pixart_lora.py"
    layout = ckpt.LORA

    def __init__(self):
        self._pretrained = None

    def checkpoint_root(self, args) -> Path:
        return Path(args.output_dir)

    def load_checkpoint(self, path) -> dict:
        return load_checkpoint(path)

    def begin(self, args) -> None:
        self._pretrained = convert_pixart(args.load_from)
        args.model = args.model or preset_of(self._pretrained[1], args.load_from)

    def describe(self, args, ctx, mode: str, resolution: int, multi_scale: bool) -> str:
        return (f"{self.script}: LoRA on {args.model} ({args.load_from}) at {resolution} px "
                f"({'multi-aspect buckets' if multi_scale else 'square'}), {ctx.world_size} rank(s), {mode} mode on "
                f"{args.device_target}")

    def pretrained(self, args):
        pretrained, self._pretrained = self._pretrained, None  # the model holds the weights from here on
        return pretrained

    def trainable(self, model, args, log) -> list:
        try:
            params = L.inject_lora(model, args.rank, args.lora_alpha, args.lora_dropout,
                                   target_names(args.lora_targets, model), freeze_base=True, rslora=args.use_rslora)
        except ValueError as e:
            raise TrainError(f"--lora_targets: {e}") from None
        L.initialize_lora(params, args.seed)
        return params

    def report_model(self, model, params, data, args) -> str:
        n_lora = sum(int(np.prod(p.shape)) for p in params)
        n_base = sum(int(v.size) for v in L.base_state_dict(model).values())
        settings = lora_settings(args)
        return (f"LoRA: rank {args.rank}, alpha {settings['alpha']:g}{' (rsLoRA)' if args.use_rslora else ''}, "
                f"dropout {args.lora_dropout:g} on {len(L.lora_layers(model))} layers "
                f"({' '.join(args.lora_targets)}): {n_lora / 1e6:.3f} M trainable parameters, "
                f"{100 * n_lora / n_base:.2f}% of the frozen {n_base / 1e6:.2f} M")

    def use_ema(self, args) -> bool:
        return False

    def restore(self, resumed, path, model, opt, args, log) -> None:
        check_resumable(resumed["state"], path, args, log)
        L.copy_lora_weights(model, resumed["lora"], log=log.info)

    def validation(self, args, steps_per_epoch: int) -> tuple[list | None, int] | None:
        if not args.validation_prompts:
            return None
        prompts = [p for p in args.validation_prompts for _ in range(args.num_validation_images)]
        return prompts, args.validation_every or args.validation_epochs * max(1, steps_per_epoch)

    def save(self, root: Path, step: int, model, opt, train_state: dict, state: dict, args) -> Path:
        state = {**state, "lora": lora_settings(args)}

        def write(folder: Path) -> None:
            L.save_lora(model, folder)
            write_ckpt(train_state, folder / ckpt.TRAIN_STATE)
            ckpt.write_state(folder, state)
        return ckpt.save_folder(root, step, write, args.keep_last, ckpt.LORA)

    def schedule(self, args, opt) -> str:
        return (f"adamw lr {opt.lr:.3g} ({args.lr_scheduler}, warm-up {args.warmup_steps}), clip "
                f"{args.clip_grad or 'off'}")

    def end(self, model, args, ctx, log, validate: Callable[[int], None] | None, validate_every: int,
            start_step: int, max_steps: int) -> None:
        if not ctx.is_main:
            return
        out_dir = Path(args.output_dir)
        path = write_lora(model, out_dir)
        log.info(f"saved LoRA {path} ({path.stat().st_size / 1e6:.2f} MB): sample.py --lora_path {out_dir}")
        if validate is not None and max_steps > start_step and max_steps % validate_every:
            validate(max_steps)  # the final LoRA's images, as diffusers' script ends

    def digests(self, model) -> list[tuple[str, dict]]:
        return [("parameter digest", L.lora_state_dict(model)), ("base weights digest", L.base_state_dict(model))]
