"""tools/convert.py: a PixArt transformer checkpoint from any format to any other (see `pixart.models.convert`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pixart.cli.options import ArgumentParser
from pixart.io import CheckpointError
from pixart.models.convert import (TARGETS, NotAControlNetError, NotATransformerError, convert_controlnet_file,
                                   convert_pixart_file)

_DEFAULT_SUFFIX = {"ckpt": ".ckpt", "original": ".pth", "diffusers": "-diffusers"}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", "--source", required=True,
                        help="original .pth / .safetensors, our .ckpt, or a diffusers folder (transformer or pipeline)")
    parser.add_argument("-t", "--target", default=None,
                        help="output: a .ckpt, an original .pth / .safetensors, or a diffusers transformer folder "
                             "(default: next to the source, named after it: <stem>.ckpt, <stem>.pth, <stem>-diffusers)")
    parser.add_argument("--to", choices=TARGETS, default=None,
                        help="output format; by default what --target's name says (.ckpt, .pth / .safetensors, else "
                             "a diffusers folder), or ckpt without --target")
    parser.add_argument("--model", default=None,
                        help="preset the weights are (or are a reduced copy of): decides what the source leaves open")
    parser.add_argument("--preset", default=None, help="as --model, and require the preset's exact size")
    parser.add_argument("--input_size", type=int, default=None,
                        help="latent size the model was trained at, when the source does not say (image size / 8)")
    parser.add_argument("--model_max_length", type=int, default=None,
                        help="caption tokens (120 α, 300 Σ) for the null caption diffusers files lack")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads, when the source does not say and its width is no multiple of 72")
    parser.add_argument("--base_target", default=None,
                        help="ControlNet sources that also hold their base model (the official PixArt-δ .pth): write "
                             "the base there too (.ckpt, .pth / .safetensors, or a diffusers folder)")
    return parser


def default_target(source, to: str) -> Path:
    """Where the reference port writes when no target is given: next to the source, its stem plus the format's
    suffix."""
    source = Path(source)
    stem = source.parent / (source.name if source.is_dir() else source.stem)
    target = Path(f"{stem}{_DEFAULT_SUFFIX[to]}")
    if target.resolve() == source.resolve():
        raise CheckpointError(f"the default target {target} is the source itself; pass --target")
    return target


def run(args) -> None:
    to = args.to or ("ckpt" if args.target is None else None)
    target = args.target or default_target(args.source, to)
    if Path(target).exists():
        print(f"note: {target} will be overwritten")
    if args.base_target:  # only a ControlNet file holds a base beside its own weights
        return convert_controlnet(args, target, to)
    try:
        convert_pixart_file(args.source, target, preset=args.preset, model=args.model, input_size=args.input_size,
                            model_max_length=args.model_max_length, num_heads=args.num_heads, to=to)
    except NotATransformerError as not_transformer:
        try:
            convert_controlnet(args, target, to)
        except NotAControlNetError:
            raise not_transformer from None


def convert_controlnet(args, target, to) -> None:
    """A PixArt-δ ControlNet source: its control branch converts to our .ckpt (the base, if it holds one, to
    --base_target)."""
    if to not in (None, "ckpt") or (to is None and not str(target).endswith(".ckpt")):
        raise CheckpointError(f"{args.source} is a ControlNet, which converts to our .ckpt only; pass a --target "
                              f"ending in .ckpt (got {target})")
    convert_controlnet_file(args.source, target, model=args.model or args.preset, num_heads=args.num_heads,
                            base_target=args.base_target)
