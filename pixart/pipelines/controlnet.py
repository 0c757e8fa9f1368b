"""PixArt-δ ControlNet sampling: the control image -> an edge map -> VAE latents -> the control branch at every step.

    pipe = PixArtControlNetPipeline.from_pretrained("models/PixArt-XL-2-1024-MS", controlnet="models/controlnet.ckpt")
    image = pipe("a leather sofa", control_image="edges.png", controlnet_conditioning_scale=1.0, generator=0)[0][0]

The condition, as the official demo makes it: the control image is resized to cover the generated size (the bucket
resolution binning picks, else --image_height x --image_width) and centre-cropped to it; then, by `control_type`,
- "hed": the image is already a HED edge map (the official checkpoint's condition): made gray, used as it is. The
  HED network itself is not ported; make the map beforehand (e.g. with controlnet_aux's HEDdetector);
- "canny": Canny edges computed here (NumPy, no download) from the image;
- "none": the image used as it is (RGB), for a ControlNet trained on another condition (depth, pose, ...);
and the map, in [-1, 1] with 3 channels, is VAE-encoded: the posterior mean times the scaling factor (the official
demo draws a sample from the posterior; the mean is its deterministic centre). The control branch gets the same
condition in both halves of classifier-free guidance, as in the official demo.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters
from PIL import Image, UnidentifiedImageError

from pixart import backend, cpu
from pixart.data.buckets import resize_and_crop_array
from pixart.io import load_into
from pixart.models.controlnet import ControlPixArt
from pixart.models.convert import check_controlnet_base, read_controlnet, resolve_controlnet
from pixart.models.pixart import PixArt
from pixart.pipelines.loading import dtype_name
from pixart.pipelines.text_to_image import PixArtPipeline

CONTROL_TYPES = ("hed", "canny", "none")
CANNY_THRESHOLDS = (100, 200)  # low, high on 0..255 gradients: the usual ControlNet Canny settings


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_controlnet(path, base: PixArt, base_preset: str | None = None, log=print) -> ControlPixArt:
    """`base` steered by the ControlNet at `path` (our .ckpt or any format tools/convert.py reads): a CheckpointError
    naming every difference when the ControlNet was made for another base (`check_controlnet_base`)."""
    weights = read_controlnet(path)
    cfg, _ = resolve_controlnet(weights.config, None, path)
    check_controlnet_base(cfg, base.config, base_preset, f"ControlNet {path}")
    with no_init_parameters():
        net = ControlPixArt(base, cfg.copy_blocks_num)
    load_into(net.controlnet, weights.state, what="ControlNet branch", share=True)
    backend.cast_parameters(net.controlnet, dtype_name(base.t_block[1].weight.dtype))  # the base's precision
    log(f"loaded ControlNet {path}: {cfg.copy_blocks_num} copied blocks")
    return cpu.accelerate(net)


def read_control_image(path) -> Image.Image:
    """The control image at `path` as RGB; a ValueError naming it when it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"control image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"control image {path} is not a readable image ({e.__class__.__name__})") from None


# ----------------------------------------------------------------------------------------------------------------
# The condition
# ----------------------------------------------------------------------------------------------------------------
def canny(gray: np.ndarray, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edges of a gray image (H, W) in 0..255 -> (H, W) uint8, 255 on edges: 3x3 Sobel gradients (L1
    magnitude, as OpenCV's default), non-maximum suppression across the gradient direction, and hysteresis: weak
    pixels (>= low) are kept where connected (8-neighbourhood) to a strong one (>= high)."""
    g = np.pad(np.asarray(gray, np.float32), 1, mode="edge")
    gx = (g[:-2, 2:] + 2 * g[1:-1, 2:] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[1:-1, :-2] + g[2:, :-2])
    gy = (g[2:, :-2] + 2 * g[2:, 1:-1] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[:-2, 1:-1] + g[:-2, 2:])
    mag = np.abs(gx) + np.abs(gy)
    # the gradient direction, quantised to 0, 45, 90, 135 degrees; a pixel must beat both neighbours along it
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = ((angle + 22.5) // 45).astype(np.int64) % 4
    m = np.pad(mag, 1)
    h, w = mag.shape
    shifted = lambda dy, dx: m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    steps = [(0, 1), (1, 1), (1, 0), (1, -1)]  # along x, the diagonal, y, the anti-diagonal
    peak = np.zeros_like(mag, bool)
    for s, (dy, dx) in enumerate(steps):
        here = sector == s
        peak |= here & (mag >= shifted(dy, dx)) & (mag > shifted(-dy, -dx))
    weak = peak & (mag >= low)
    strong = weak & (mag >= high)
    return np.where(_connected_to(weak, strong), 255, 0).astype(np.uint8)


def _connected_to(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of `mask` in an 8-connected component of `mask` that holds a pixel of `seeds`: component labels by
    min-label propagation with pointer jumping (a few passes, not one per pixel of the longest edge)."""
    h, w = mask.shape
    big = h * w
    label = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(label, 1, constant_values=big)
        low = label.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                low = np.minimum(low, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
        low = np.where(mask, low, big)
        flat = low.ravel()
        inside = flat < big
        flat[inside] = flat[flat[inside]]  # pointer jumping: a label's own label
        if np.array_equal(low, label):
            break
        label = low
    keep = np.unique(label[seeds])
    return mask & np.isin(label, keep)


def condition_image(image: Image.Image, control_type: str, height: int, width: int) -> np.ndarray:
    """The control image as the condition the VAE encodes: resized to cover height x width and centre-cropped, then
    per `control_type` (see the module doc) -> (1, 3, height, width) float32 in [-1, 1]."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"control_type must be one of {', '.join(CONTROL_TYPES)}, got {control_type!r}")
    rgb = np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255.0  # (1, 3, H, W) in [0, 1]
    rgb = np.clip(resize_and_crop_array(rgb, height, width), 0.0, 1.0)
    if control_type == "none":
        return (rgb * 2 - 1).astype(np.float32)
    gray = rgb[0, 0] * 0.299 + rgb[0, 1] * 0.587 + rgb[0, 2] * 0.114  # ITU-R 601 luma, as PIL's "L"
    if control_type == "canny":
        gray = canny(gray * 255.0) / 255.0
    return np.broadcast_to(gray * 2 - 1, (1, 3, height, width)).astype(np.float32)


def encode_condition(vae, condition: np.ndarray, scaling_factor: float) -> np.ndarray:
    """The condition image (N, 3, H, W) in [-1, 1] -> its latents (N, 4, H/8, W/8) in the transformer's space."""
    with backend.eager():
        mean, _ = vae.encode(Tensor(np.ascontiguousarray(condition, np.float32)))
    shift = vae.config.shift_factor or 0.0
    return ((mean.asnumpy() - shift) * scaling_factor).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------
class PixArtControlNetPipeline(PixArtPipeline):
    """Text-to-image steered by a control image: `PixArtPipeline` whose transformer is a `ControlPixArt`, with
    `control_image=` (a path, PIL image or (H, W, 3) uint8 array), `control_type` and
    `controlnet_conditioning_scale` (0: the base model exactly) beside diffusers' arguments."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, controlnet=None, model: str | None = None,
                        log=None, **kwargs) -> "PixArtControlNetPipeline":
        """`PixArtPipeline.from_pretrained` (the same arguments), its transformer steered by the ControlNet
        checkpoint `controlnet` (required)."""
        if controlnet is None:
            raise ValueError("PixArtControlNetPipeline.from_pretrained needs controlnet= (a ControlNet checkpoint)")
        pipe = PixArtPipeline.from_pretrained(pretrained_model_name_or_path, model=model, log=log, **kwargs)
        return cls.from_pipeline(pipe, controlnet, model, log or (lambda *_: None))

    @classmethod
    def from_pipeline(cls, pipe: PixArtPipeline, controlnet, base_preset: str | None = None,
                      log=print) -> "PixArtControlNetPipeline":
        """`pipe`'s components with its transformer steered by the ControlNet checkpoint `controlnet` (a path) or
        model (a ControlPixArt on that transformer)."""
        net = controlnet if isinstance(controlnet, ControlPixArt) else \
            load_controlnet(controlnet, pipe.transformer, base_preset, log)
        out = cls(transformer=net, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  scaling_factor=pipe.scaling_factor, max_sequence_length=pipe.max_sequence_length,
                  sampler=pipe.sampler)
        out.tiled_decode_from = pipe.tiled_decode_from
        return out

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.transformer, ControlPixArt):
            raise TypeError(f"PixArtControlNetPipeline needs a ControlPixArt transformer, got "
                            f"{type(self.transformer).__name__} (see PixArtControlNetPipeline.from_pipeline)")
        self._control = None  # (image, type, scale) during a call

    def __call__(self, prompt=None, control_image=None, controlnet_conditioning_scale: float = 1.0,
                 control_type: str = "hed", **kwargs):
        """`PixArtPipeline.__call__` with the control image (see the class doc); without one, the base model."""
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {', '.join(CONTROL_TYPES)}, got {control_type!r}")
        scale = float(controlnet_conditioning_scale)
        if not np.isfinite(scale):
            raise ValueError(f"controlnet_conditioning_scale must be a finite number, got "
                             f"{controlnet_conditioning_scale!r}")
        if isinstance(control_image, (str, Path)):
            control_image = read_control_image(control_image)
        elif isinstance(control_image, np.ndarray):
            if control_image.ndim != 3 or control_image.shape[-1] not in (1, 3, 4):
                raise ValueError(f"control_image as an array must be (H, W, 3), got {control_image.shape}")
            control_image = Image.fromarray(np.asarray(control_image, np.uint8).squeeze(-1)
                                            if control_image.shape[-1] == 1 else np.asarray(control_image, np.uint8))
        elif control_image is not None and not isinstance(control_image, Image.Image):
            raise ValueError(f"control_image must be a path, a PIL image or an (H, W, 3) array, got "
                             f"{type(control_image).__name__}")
        self._control = None if control_image is None else (control_image, control_type, scale)
        try:
            return super().__call__(prompt, **kwargs)
        finally:
            self._control = None

    def condition_latents(self, image, control_type: str, height: int, width: int) -> np.ndarray:
        """The control image's latents (1, 4, height/8, width/8) for images of height x width."""
        return encode_condition(self.vae, condition_image(image, control_type, height, width), self.scaling_factor)

    def denoiser_parts(self, height: int, width: int):
        """The transformer's (encode_caption, denoise), its denoise given the condition of this call."""
        encode_caption, denoise = self.transformer.sampler_parts()
        if self._control is None or self._control[2] == 0:
            return encode_caption, denoise
        image, control_type, scale = self._control
        condition = Tensor(self.condition_latents(image, control_type, height, width))

        def controlled(x, t, caption_kv, mask=None, data_info=None):
            return denoise(x, t, caption_kv, mask, data_info, condition, scale)
        return encode_caption, controlled
