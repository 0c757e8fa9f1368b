"""Build the offline demo bundle under models/demo: a tiny PixArt-Σ with tiny T5 and VAE, trained on the synthetic
demo world (weights from pixart/demo_weights/, written by tools/train_demo_world.py; docs/demo.md).

    python tools/make_demo_bundle.py [--root models/demo] [--force] [--untrained]
"""
import argparse
import sys

from pixart import demo_bundle
from pixart.cli import main as cli_main
from pixart.cli.options import ArgumentParser


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(demo_bundle.ROOT))
    p.add_argument("--force", action="store_true", help="rebuild even if the bundle exists")
    p.add_argument("--untrained", action="store_true", help="random VAE and transformer weights (images of noise)")
    return p


def run(args) -> None:
    if demo_bundle.is_built(args.root) and not args.force:
        print(f"demo bundle already in {args.root} (use --force to rebuild)")
        return
    demo_bundle.build(args.root, trained=not args.untrained)


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
