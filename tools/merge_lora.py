"""Merge a LoRA into a PixArt-α/Σ transformer checkpoint (W + scale * alpha/r * B A), or take it out again.

    python tools/merge_lora.py --checkpoint models/PixArt-Sigma-XL-2-512-MS.ckpt \
        --lora_path output/my-lora/pytorch_lora_weights.safetensors --target models/sigma-512-my-lora.ckpt
    python tools/merge_lora.py --checkpoint models/sigma-512-my-lora.ckpt --lora_path output/my-lora \
        --target models/sigma-512-base.ckpt --unmerge

The checkpoint may be anything tools/convert.py reads (.ckpt, original .pth, diffusers folder); the LoRA a diffusers
`pytorch_lora_weights.safetensors`, a peft adapter folder, or one saved by this project. The output is a MindSpore
.ckpt with the original names, loadable by sample.py --checkpoint.
"""
import argparse
import sys

from pixart.io import CheckpointError
from pixart.models.lora import merge_lora_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="base transformer weights")
    parser.add_argument("--lora_path", required=True, help="LoRA file or folder")
    parser.add_argument("--target", required=True, help="output MindSpore .ckpt")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="merge strength (1 = as trained)")
    parser.add_argument("--unmerge", action="store_true",
                        help="subtract the LoRA (from a checkpoint it was merged into at --lora_scale)")
    args = parser.parse_args(argv)
    try:
        merge_lora_file(args.checkpoint, args.lora_path, args.target, args.lora_scale, args.unmerge)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
