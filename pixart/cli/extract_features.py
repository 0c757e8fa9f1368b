"""What `tools/extract_features.py` does: cache T5 caption features and VAE latents of a data set (any source of
pixart.data.sources: label JSON, Hugging Face dataset, image folder with captions, webdataset shards)."""
from __future__ import annotations

from pixart import backend
from pixart.cli.options import ArgumentParser, DEVICES, DTYPES, add_source_options, str2bool
from pixart.data.features import extract_features
from pixart.data.sources import check_data_args, source_from_args


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description)
    add_source_options(p.add_argument_group("data"))
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
    p.add_argument("--text_encoder_dtype", default="fp32", choices=DTYPES)
    p.add_argument("--vae_dtype", default="fp32", choices=DTYPES)
    p.add_argument("--num_shards", type=int, default=1, help="split the work over processes: entry i goes to i %% N; "
                   "each shard lists its skipped images in skipped.shard<i>-of-<N>.json (training merges them)")
    p.add_argument("--shard_id", type=int, default=0)
    p.add_argument("--device_target", default="CPU", choices=DEVICES)
    return p


def run(args) -> None:
    if not 0 <= args.shard_id < args.num_shards:
        raise ValueError(f"--shard_id must be in [0, {args.num_shards}), got {args.shard_id}")
    check_data_args(args, images_needed=args.latents)
    source = source_from_args(args)
    backend.setup(args.device_target, "pynative")
    extract_features(source, args.output_dir, args.resolution, args.image_dir, args.multi_scale,
                     args.vae_root, args.text_encoder_root, args.tokenizer_root, args.max_length,
                     tuple(args.captions), args.flip, args.dtype, args.batch_size, args.text, args.latents,
                     args.text_encoder_dtype, args.vae_dtype, (args.shard_id, args.num_shards))
