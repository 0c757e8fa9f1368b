"""Write the label JSON for an image folder with captions, sizes filled in from the image headers.

    python tools/make_labels.py --image_dir data/images --output data/labels.json       # a .txt beside each image
    python tools/make_labels.py --image_dir data/images --captions_csv data/captions.csv --output data/labels.json
    python train.py ... --json_path data/labels.json --image_dir data/images

train.py also reads such a folder directly (--train_data_dir); the label JSON adds what a folder cannot hold: a
second caption per image (`sharegpt4v`, for --real_prompt_ratio), and a fixed list to edit.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.make_labels import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
