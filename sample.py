"""Generate images with PixArt-α / Σ (the reference MindSpore port's flags and configs).

    python sample.py -c configs/inference/pixart-sigma-512-MS.yaml --prompt "your magic prompt"
    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt_path prompts.txt --batch_size 4
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
