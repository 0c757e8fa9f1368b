r"""Fine-tune PixArt-α / Σ on an image-caption set.

    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path data/labels.json --image_dir data/images
    python train.py ... --checkpoint models/other.ckpt --output_path output/my-run    # other weights / output
    python train.py ... --feature_dir cache/          # captions / latents from tools/extract_features.py
    python train.py ... --resume latest               # continue exactly where the last checkpoint stopped
    msrun --worker_num=8 --local_worker_num=8 train.py ... --use_parallel True    # data parallel

The configs read the weights from models/ as the reference MindSpore port lays them out; its flags and YAML keys
are accepted (-h lists both names where ours differ). Checkpoints go to <output_dir>/checkpoints/step_XXXXXXXX/.
Flags override the YAML; a YAML key that is not a flag is an error. Bad input exits 1 with one line.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.train import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
