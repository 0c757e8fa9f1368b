"""Generate images with PixArt-α / Σ.

    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "a cat wearing sunglasses"
    python sample.py -c configs/inference/demo.yaml --prompt "a red square"     # offline demo bundle (noise)

Flags override the YAML; a YAML key that is not a flag is an error.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.sample import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
