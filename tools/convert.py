"""Convert a PixArt-α/Σ transformer checkpoint (original .pth, or diffusers folder / .safetensors) to MindSpore.

    python tools/convert.py --source PixArt-Sigma-XL-2-1024-MS.pth --target models/PixArt-Sigma-XL-2-1024-MS.ckpt
    python tools/convert.py --source PixArt-Sigma-XL-2-1024-MS/transformer --target models/sigma-1024.ckpt
"""
import argparse
import sys

from pixart.checkpoints import CheckpointError, convert_pixart_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="original .pth/.safetensors/.ckpt or a diffusers folder")
    parser.add_argument("--target", required=True, help="output MindSpore .ckpt")
    parser.add_argument("--preset", default=None, help="require the weights to match this preset exactly")
    parser.add_argument("--input_size", type=int, default=None,
                        help="latent size the model was trained at, when the source does not say (image size / 8)")
    parser.add_argument("--model_max_length", type=int, default=None,
                        help="caption tokens (120 α, 300 Σ) for the null caption diffusers files lack")
    args = parser.parse_args(argv)
    try:
        convert_pixart_file(args.source, args.target, preset=args.preset, input_size=args.input_size,
                            model_max_length=args.model_max_length)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
