"""Build the offline demo bundle under models/demo (a tiny, untrained PixArt-Σ with tiny T5 and VAE).

    python tools/make_demo_bundle.py [--root models/demo] [--force]
"""
import argparse

from pixart import demo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(demo.ROOT))
    p.add_argument("--force", action="store_true", help="rebuild even if the bundle exists")
    args = p.parse_args(argv)
    if demo.is_built(args.root) and not args.force:
        print(f"demo bundle already in {args.root} (use --force to rebuild)")
        return 0
    demo.build(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
