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

import errno
import sys
from typing import Callable

from pixart.cli.options import parse_args


def main(run: Callable, build_parser: Callable, description: str | None = None, argv=None) -> int:
    """Parse `argv` with `build_parser(description)` and its YAML config, then `run(args)`; the exit status.

    Bad input (every error class of the project derives from ValueError: ConfigError, SampleError, TrainError,
    DemoError, CheckpointError, DataError, FeatureError, and the library's own argument checks raise ValueError)
    ends as one line `error: <message>` on stderr and status 1; Ctrl+C as one line and status 130 (128 + SIGINT,
    as a shell reports it). A fault of the machine rather than of the code, an OSError (a full disk, a read-only
    or missing folder, no permission) or running out of memory, is one line and status 1 too: the writers remove
    their partial files (`pixart.io.atomic`), so nothing half-written stays. Anything else is a bug and keeps its
    traceback.
    """
    try:
        run(parse_args(build_parser(description), argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (try a smaller image size, batch or model)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


_OS_HINTS = {errno.ENOSPC: "free some space or choose another output folder",
             errno.EDQUOT: "free some space or choose another output folder",
             errno.EROFS: "choose an output folder on a writable file system",
             errno.EACCES: "choose a folder you may write to", errno.EPERM: "choose a folder you may write to"}


def describe_os_error(e: OSError) -> str:
    """One line for a file-system fault: what failed, on which file, and what to do."""
    what = e.strerror or str(e) or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    hint = _OS_HINTS.get(e.errno)
    return f"{what.lower() if what[:1].isupper() and what[1:2].islower() else what}{where}" + (f" ({hint})" if hint else "")
