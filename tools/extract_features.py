"""Cache T5 caption features and VAE latents for training without T5 / VAE in memory.

    python tools/extract_features.py --json_path data/labels.json --image_dir data/images --output_dir cache/ \
        --resolution 512 --vae_root models/.../vae --text_encoder_root models/.../text_encoder --max_length 300
    python train.py ... --feature_dir cache/

Run it again to add what is missing (e.g. after new images); unreadable images are skipped and listed.
Shards (`--num_shards N --shard_id i`, one process each) may run at the same time on one --output_dir.
"""
import sys

from pixart.config import ArgumentParser, ConfigError, parse_args, str2bool


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--json_path", required=True)
    p.add_argument("--image_dir", default=None)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=512, help="bucket table: 256/512/1024/2048")
    p.add_argument("--multi_scale", type=str2bool, default=True, help="aspect-ratio buckets (else square crops)")
    p.add_argument("--vae_root", default=None)
    p.add_argument("--text_encoder_root", default=None)
    p.add_argument("--tokenizer_root", default=None)
    p.add_argument("--max_length", type=int, default=300, help="caption tokens: 120 for α, 300 for Σ")
    p.add_argument("--captions", nargs="+", default=["prompt", "sharegpt4v"], choices=["prompt", "sharegpt4v"])
    p.add_argument("--flip", type=str2bool, default=False, help="also cache mirrored latents (for --random_flip)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage precision")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--text", type=str2bool, default=True, help="cache caption features")
    p.add_argument("--latents", type=str2bool, default=True, help="cache VAE latents")
    p.add_argument("--text_encoder_dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--vae_dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--num_shards", type=int, default=1, help="split the work over processes: entry i goes to i %% N; "
                   "each shard lists its skipped images in skipped.shard<i>-of-<N>.json (training merges them)")
    p.add_argument("--shard_id", type=int, default=0)
    p.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    return p


def main(argv=None) -> int:
    try:
        args = parse_args(build_parser(), argv)
        if not 0 <= args.shard_id < args.num_shards:
            raise ValueError(f"--shard_id must be in [0, {args.num_shards}), got {args.shard_id}")
        from pixart import backend
        from pixart.data.features import extract_features
        backend.setup(args.device_target, "pynative")
        extract_features(args.json_path, args.output_dir, args.resolution, args.image_dir, args.multi_scale,
                         args.vae_root, args.text_encoder_root, args.tokenizer_root, args.max_length,
                         tuple(args.captions), args.flip, args.dtype, args.batch_size, args.text, args.latents,
                         args.text_encoder_dtype, args.vae_dtype, (args.shard_id, args.num_shards))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
