"""The ControlNet (PixArt-δ) options of sample.py and gradio_demo.py: `--controlnet`, `--control_image`,
`--control_scale`, `--control_type`; checked before any model loads, then applied to the loaded pipeline."""
from __future__ import annotations

import math
from pathlib import Path

from pixart.io import CheckpointError
from pixart.models.convert import FAMILY, check_controlnet_base, read_controlnet, resolve_controlnet
from pixart.models.pixart import PixArtConfig, preset_config
from pixart.pipelines.controlnet import CONTROL_TYPES, PixArtControlNetPipeline, read_control_image


def add_controlnet_group(parser) -> None:
    g = parser.add_argument_group("ControlNet (PixArt-δ)")
    g.add_argument("--controlnet", default=None,
                   help="ControlNet checkpoint made for --checkpoint's model (tools/convert.py converts the official "
                        "PixArt-XL-2-1024-ControlNet.pth)")
    g.add_argument("--control_image", default=None,
                   help="condition image, resized to cover the generated size and centre-cropped (needs --controlnet)")
    g.add_argument("--control_scale", type=float, default=1.0,
                   help="strength of the control branch: 0 = the base model exactly, 1 = as trained")
    g.add_argument("--control_type", default="hed", choices=CONTROL_TYPES,
                   help="what --control_image is: hed = an already-made HED edge map (the official checkpoint's "
                        "condition; HED itself is not run here), canny = a picture whose Canny edges are computed, "
                        "none = the condition as it is")


def check_controlnet_args(args, log=print) -> None:
    """Bad ControlNet options as one ValueError before any model loads: a missing or unreadable control image or
    checkpoint, a scale that is no finite number, a ControlNet made for a model of another family than --model.
    `args.model` must be settled already. The control image is read here and kept (`args._control`)."""
    controlnet, image = getattr(args, "controlnet", None), getattr(args, "control_image", None)
    args._control = None
    scale = getattr(args, "control_scale", 1.0)
    if not math.isfinite(scale):
        raise ValueError(f"--control_scale must be a finite number, got {scale}")
    if image and not controlnet:
        raise ValueError("--control_image needs --controlnet (the ControlNet checkpoint it steers the model with)")
    if not controlnet:
        return
    if not Path(controlnet).exists():
        raise ValueError(f"--controlnet not found: {controlnet}")
    if image:
        args._control = read_control_image(image)
    else:
        log("note: --controlnet without --control_image: an image without a control image comes from the base "
            "model alone")
    cfg, _ = resolve_controlnet(read_controlnet(controlnet).config, None, controlnet)
    preset = preset_config(args.model)  # depth and width may be a reduced copy's: they are checked once loaded
    family = PixArtConfig(**{f: getattr(preset, f) if f in FAMILY else None
                             for f in PixArtConfig.__dataclass_fields__ if f != "kv_compress_config"})
    try:
        check_controlnet_base(cfg, family, args.model, f"--controlnet {controlnet}")
    except CheckpointError as e:
        raise ValueError(str(e)) from None


def attach_controlnet(pipe, args, log=print):
    """The loaded pipeline steered by --controlnet (its base checked against the loaded model), or `pipe` as it is."""
    if not getattr(args, "controlnet", None):
        return pipe
    return PixArtControlNetPipeline.from_pipeline(pipe, args.controlnet, args.model, log)


def controlnet_call_options(args) -> dict:
    """The ControlNet keywords of a pipeline call (none without --controlnet)."""
    if not getattr(args, "controlnet", None):
        return {}
    return dict(control_image=args._control, controlnet_conditioning_scale=args.control_scale,
                control_type=args.control_type)
