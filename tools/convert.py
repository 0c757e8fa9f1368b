"""Convert a PixArt-α/Σ transformer checkpoint between every format: original .pth / .safetensors, diffusers folder,
and our MindSpore .ckpt (which records its architecture).

    python tools/convert.py -s PixArt-Sigma-XL-2-1024-MS.pth -t models/PixArt-Sigma-XL-2-1024-MS.ckpt
    python tools/convert.py -s PixArt-Sigma-XL-2-1024-MS/transformer -t models/sigma-1024.ckpt
    python tools/convert.py -s output/model.ckpt -t export/transformer --to diffusers
    python tools/convert.py -s output/model.ckpt -t export/PixArt-finetuned.pth --to original
    python tools/convert.py -s PixArt-XL-2-1024-ControlNet.pth -t models/controlnet-hed.ckpt   (PixArt-δ ControlNet)

What the source does not say (a diffusers folder has no caption length, so α-512 and Σ-512-MS look alike) is taken
from --model, or left for sample.py's --model / the config's `model:` to decide when the file is loaded.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.convert import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
