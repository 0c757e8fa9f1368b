"""A web page for PixArt-α / Σ text-to-image, served by Gradio on http://127.0.0.1:7788.

    python gradio_demo.py -c configs/inference/demo.yaml                  # offline demo bundle (noise), no downloads
    python gradio_demo.py -c configs/inference/pixart-sigma-1024-MS.yaml --port 8000 --host 0.0.0.0
    python gradio_demo.py -c configs/inference/pixart-sigma-512-MS.yaml --lora_path my-lora/ --lora_scale 0.8

It takes sample.py's model flags and YAML configs (a YAML key that is not a flag is an error); the per-image
values (prompt, sampler, steps, guidance, seed, size, batch) become the page's defaults; with --lora_path the page
has a LoRA scale slider. The models load once at start; requests are queued and run one at a time.
"""
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

from pixart.cli import main as cli_main  # noqa: E402
from pixart.cli.gradio import build_parser, serve  # noqa: E402


def main(argv=None) -> int:
    return cli_main(serve, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
