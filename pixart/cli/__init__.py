"""What each entry point does once its options are parsed, one module per script:

    sample.py                                      pixart.cli.sample
    train.py                                       pixart.cli.train
    gradio_demo.py                                 pixart.cli.gradio
    pixart/lora-finetuning/train_pixart_lora.py    pixart.cli.lora_train
    pixart/lora-finetuning/inference_pixart_lora.py  pixart.cli.lora_inference
    tools/extract_features.py                      pixart.cli.extract_features
    tools/make_labels.py                           pixart.cli.make_labels

The options they share (and YAML loading) are in `pixart.cli.options`; `main` is every script's error handling.
"""
from __future__ import annotations

import sys
from typing import Callable

from pixart.cli.options import parse_args


def main(run: Callable, build_parser: Callable, description: str | None = None, argv=None) -> int:
    """Parse `argv` with `build_parser(description)` and its YAML config, then `run(args)`; the exit status.

    Bad input (every error class of the project derives from ValueError: ConfigError, SampleError, TrainError,
    DemoError, CheckpointError, DataError, FeatureError, and the library's own argument checks raise ValueError)
    ends as one line `error: <message>` on stderr and status 1; Ctrl+C as one line and status 130 (128 + SIGINT,
    as a shell reports it). Anything else is a bug and keeps its traceback.
    """
    try:
        run(parse_args(build_parser(description), argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
