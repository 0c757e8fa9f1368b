"""Cache T5 caption features and VAE latents for training without T5 / VAE in memory.

    python tools/extract_features.py --json_path data/labels.json --image_dir data/images --output_dir cache/ \
        --resolution 512 --vae_root models/.../vae --text_encoder_root models/.../text_encoder --max_length 300
    python train.py ... --feature_dir cache/

Any data source train.py reads works here too (--dataset_name, --train_data_dir, with the same options), and
training must then name the same source.

Run it again to add what is missing (e.g. after new images); unreadable images are skipped and listed.
Shards (`--num_shards N --shard_id i`, one process each) may run at the same time on one --output_dir.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.extract_features import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
