"""PixArt-α / Σ in MindSpore.

Importing `pixart` makes runs quiet by default: MindSpore logs errors only (GLOG_v=3) and the deprecation notices of
the libraries around it are hidden, so a run prints its own progress and results. `PIXART_VERBOSE=1` in the
environment, or `logging_setup(verbose=True)` (the entry points' `--verbose`), keeps MindSpore's default logging
(warnings, GLOG_v=2) and shows deprecation warnings. A GLOG_v set by the user is always kept.
"""
from __future__ import annotations

import os
import sys
import warnings

# OpenMP's wait policy is the user's (libgomp's default, as PyTorch users have it: threads spin briefly between
# parallel regions, then sleep): on a quiet host spinning made a bf16 denoiser step ~5-20% and a T5-XXL encode ~4%
# faster than OMP_WAIT_POLICY=PASSIVE, which wins only where other busy processes share the cores (a GEMM of
# milliseconds then takes tens). Measurements: docs/benchmarks.md, 'Why these numbers (design)'.

VERBOSE_ENV = "PIXART_VERBOSE"
_GLOG_QUIET, _GLOG_VERBOSE = "3", "2"  # MindSpore's levels: 0 debug, 1 info, 2 warning, 3 error
_USER_GLOG = os.environ.get("GLOG_v")  # read before anything of ours sets it
_QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def verbose_from_env() -> bool:
    """Whether PIXART_VERBOSE asks for verbose logging ("1", "true", "yes", "on")."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def logging_setup(verbose: bool | None = None) -> None:
    """Quiet (verbose=False) or MindSpore's default logging (True); None reads PIXART_VERBOSE.

    MindSpore's C++ side reads GLOG_v once, when `mindspore` is first imported; its Python logger and Python's
    warning filters follow this call at any time. Importing `pixart` calls it with None before mindspore is loaded.
    """
    if verbose is None:
        verbose = verbose_from_env()
    if _USER_GLOG is None:
        level = _GLOG_VERBOSE if verbose else _GLOG_QUIET
        os.environ["GLOG_v"] = level
        ms_log = sys.modules.get("mindspore.log")
        if ms_log is not None and getattr(ms_log, "GLOBAL_LOGGER", None) is not None:
            ms_log.GLOBAL_LOGGER.setLevel(ms_log._gloglevel_to_name[level])
    for category in _QUIET_CATEGORIES:
        warnings.filterwarnings("default" if verbose else "ignore", category=category)


logging_setup()


# The public API, diffusers' names. Exported lazily (PEP 562): `import pixart` stays cheap and imports no MindSpore,
# so the logging set-up above runs before MindSpore reads GLOG_v, and entry points that need little load little.
_EXPORTS = {
    "PixArtPipeline": "pixart.pipelines.text_to_image",
    "PixArtAlphaPipeline": "pixart.pipelines.text_to_image",
    "PixArtSigmaPipeline": "pixart.pipelines.text_to_image",
    "PipelineOutput": "pixart.pipelines.text_to_image",
    "PixArtTransformer2DModel": "pixart.pipelines.transformer",
    "AutoencoderKL": "pixart.models.vae",
    "T5EncoderModel": "pixart.models.t5",
}
__all__ = ["logging_setup", "verbose_from_env", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pixart' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
