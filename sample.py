"""Generate images with PixArt-α / Σ.

    python sample.py -c configs/inference/pixart-sigma-1024-ms.yaml --prompt "a cat wearing sunglasses"
    python sample.py -c configs/inference/demo.yaml --prompt "a red square"     # offline demo bundle (noise)

Flags override the YAML; a YAML key that is not a flag is an error.
"""
import sys

from pixart.config import ConfigError, parse_args
from pixart.pipelines.sample_run import SampleError, build_parser, run


def main(argv=None) -> int:
    try:
        run(parse_args(build_parser(__doc__), argv))
    except (ConfigError, SampleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
