"""Convert a PixArt-α/Σ transformer checkpoint (original .pth, diffusers folder / .safetensors, or .ckpt) to a
MindSpore .ckpt that records its architecture.

    python tools/convert.py --source PixArt-Sigma-XL-2-1024-MS.pth --target models/PixArt-Sigma-XL-2-1024-MS.ckpt
    python tools/convert.py --source PixArt-Sigma-XL-2-1024-MS/transformer --target models/sigma-1024.ckpt

What the source does not say (a diffusers folder has no caption length, so α-512 and Σ-512-MS look alike) is taken
from --model, or left for sample.py's --model / the config's `model:` to decide when the file is loaded.
"""
import argparse
import sys

from pixart.io import CheckpointError
from pixart.models.convert import convert_pixart_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="original .pth/.safetensors/.ckpt or a diffusers folder")
    parser.add_argument("--target", required=True, help="output MindSpore .ckpt")
    parser.add_argument("--model", default=None,
                        help="preset the weights are (or are a reduced copy of): decides what the source leaves open")
    parser.add_argument("--preset", default=None, help="as --model, and require the preset's exact size")
    parser.add_argument("--input_size", type=int, default=None,
                        help="latent size the model was trained at, when the source does not say (image size / 8)")
    parser.add_argument("--model_max_length", type=int, default=None,
                        help="caption tokens (120 α, 300 Σ) for the null caption diffusers files lack")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads, when the source does not say and its width is no multiple of 72")
    args = parser.parse_args(argv)
    try:
        convert_pixart_file(args.source, args.target, preset=args.preset, model=args.model,
                            input_size=args.input_size, model_max_length=args.model_max_length,
                            num_heads=args.num_heads)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
