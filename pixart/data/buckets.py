"""Aspect-ratio tables, used for resolution binning at sampling time and multi-aspect buckets in training.

Two families of tables exist upstream, with identical (height, width) values wherever a ratio appears in both:

* ``ASPECT_RATIOS`` -- the sampling bins.  They equal diffusers' ``ASPECT_RATIO_{256,512,1024,2048}_BIN``
  (``pipeline_pixart_alpha.py`` / ``pipeline_pixart_sigma.py``).  For 256/512/1024 these are the official
  ``ASPECT_RATIO_*_TEST`` tables (33 ratios); for 2048 diffusers uses the full official ``ASPECT_RATIO_2048``
  (40 ratios) -- the official ``ASPECT_RATIO_2048_TEST`` is a different 33-ratio subset (it keeps 0.26 where the
  others keep 0.28), and we follow diffusers.
* ``TRAIN_ASPECT_RATIOS`` -- the official training buckets ``ASPECT_RATIO_{256,512,1024,2048}`` from
  ``diffusion/data/datasets/utils.py`` (40 ratios each), as ``InternalDataMS`` / ``InternalDataMSSigma`` use them.
  They add the ratios 0.26, 0.27, 2.89, 3.11, 3.62, 3.75, 3.88 to the 256/512/1024 sampling bins.

Keys are the nominal ratio height / width as a string ("0.57"), values are (height, width) in pixels.  Every
size is a multiple of ``resolution // 16`` (16 for 256, 32 for 512, 64 for 1024, 128 for 2048), hence always a
multiple of 16 = VAE factor 8 x patch size 2.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Mapping

import numpy as np
from PIL import Image

__all__ = [
    "ASPECT_RATIOS", "TRAIN_ASPECT_RATIOS", "RESOLUTIONS", "closest_bucket", "bucket_for_image",
    "micro_conditions", "resize_and_center_crop", "resize_and_crop_array",
]

# (key, height_in_units, width_in_units) for the full 40-ratio table; one unit is resolution // 16 pixels.
# Written this way the four resolutions share one list: every official table is this list times its unit.
_FULL_UNITS = (
    ("0.25", 8, 32), ("0.26", 8, 31), ("0.27", 8, 30), ("0.28", 8, 29),
    ("0.32", 9, 28), ("0.33", 9, 27), ("0.35", 9, 26), ("0.4", 10, 25),
    ("0.42", 10, 24), ("0.48", 11, 23), ("0.5", 11, 22), ("0.52", 11, 21),
    ("0.57", 12, 21), ("0.6", 12, 20), ("0.68", 13, 19), ("0.72", 13, 18),
    ("0.78", 14, 18), ("0.82", 14, 17), ("0.88", 15, 17), ("0.94", 15, 16),
    ("1.0", 16, 16), ("1.07", 16, 15), ("1.13", 17, 15), ("1.21", 17, 14),
    ("1.29", 18, 14), ("1.38", 18, 13), ("1.46", 19, 13), ("1.67", 20, 12),
    ("1.75", 21, 12), ("2.0", 22, 11), ("2.09", 23, 11), ("2.4", 24, 10),
    ("2.5", 25, 10), ("2.89", 26, 9), ("3.0", 27, 9), ("3.11", 28, 9),
    ("3.62", 29, 8), ("3.75", 30, 8), ("3.88", 31, 8), ("4.0", 32, 8),
)
# Ratios absent from the 33-entry sampling bins of 256 / 512 / 1024 (diffusers' *_BIN, official *_TEST).
_NOT_IN_BIN = frozenset({"0.26", "0.27", "2.89", "3.11", "3.62", "3.75", "3.88"})

RESOLUTIONS = (256, 512, 1024, 2048)


def _table(resolution: int, keep) -> dict[str, tuple[int, int]]:
    unit = resolution // 16
    return {k: (h * unit, w * unit) for k, h, w in _FULL_UNITS if keep(k)}


#: Official training buckets: resolution -> {ratio: (height, width)} (40 ratios each).
TRAIN_ASPECT_RATIOS: dict[int, dict[str, tuple[int, int]]] = {
    r: _table(r, lambda k: True) for r in RESOLUTIONS
}

#: Sampling bins (diffusers' ASPECT_RATIO_*_BIN): resolution -> {ratio: (height, width)}.
ASPECT_RATIOS: dict[int, dict[str, tuple[int, int]]] = {
    256: _table(256, lambda k: k not in _NOT_IN_BIN),
    512: _table(512, lambda k: k not in _NOT_IN_BIN),
    1024: _table(1024, lambda k: k not in _NOT_IN_BIN),
    2048: _table(2048, lambda k: True),
}


# -- validation ----------------------------------------------------------------------------------------------
def _check_size(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (Real, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return v


def _check_pixels(name: str, value) -> int:
    """A target size in pixels: a positive integer (int-valued floats are accepted)."""
    v = _check_size(name, value)
    if not v.is_integer():
        raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
    return int(v)


def _lookup(resolution, train: bool) -> Mapping[str, tuple[int, int]]:
    tables = TRAIN_ASPECT_RATIOS if train else ASPECT_RATIOS
    key = None
    if isinstance(resolution, (Real, np.integer, np.floating)) and not isinstance(resolution, bool):
        if math.isfinite(float(resolution)) and float(resolution).is_integer():
            key = int(resolution)
    if key not in tables:
        raise ValueError(f"unknown resolution {resolution!r}: the aspect-ratio tables cover {sorted(tables)}")
    return tables[key]


# -- bucket lookup -------------------------------------------------------------------------------------------
def closest_bucket(height, width, resolution, *, train: bool = False) -> tuple[int, int, str]:
    """The bucket whose nominal ratio is nearest to ``height / width``: ``(bucket_h, bucket_w, ratio_key)``.

    Uses the sampling bins (``ASPECT_RATIOS``) unless ``train=True`` (``TRAIN_ASPECT_RATIOS``).  Ties go to the
    smaller ratio -- the first minimum in table order, which is what diffusers' ``classify_height_width_bin`` and
    the official ``get_closest_ratio`` do (same float arithmetic: ``abs(float(key) - float(height / width))``).
    """
    h = _check_size("height", height)
    w = _check_size("width", width)
    table = _lookup(resolution, train)
    ar = float(h / w)
    key = min(table, key=lambda k: abs(float(k) - ar))
    bh, bw = table[key]
    return bh, bw, key


def bucket_for_image(height, width, resolution, *, train: bool = True) -> tuple[str, tuple[int, int]]:
    """Training bucket of an image of original size (height, width): ``(ratio_key, (bucket_h, bucket_w))``.

    Defaults to the official 40-ratio training tables; ``train=False`` buckets with the sampling bins instead.
    """
    bh, bw, key = closest_bucket(height, width, resolution, train=train)
    return key, (bh, bw)


def micro_conditions(orig_h, orig_w, bucket_key) -> tuple[np.ndarray, float]:
    """α micro-conditions of a training sample: ``(img_hw, aspect_ratio)``.

    As in the official ``InternalDataMS``: ``img_hw`` is the *original* image size ``[h, w]`` as float32 and
    ``aspect_ratio`` is the bucket's nominal ratio, ``float(bucket_key)`` (e.g. 0.57, not 768 / 1344).
    """
    h = _check_size("orig_h", orig_h)
    w = _check_size("orig_w", orig_w)
    try:
        ar = float(bucket_key)
    except (TypeError, ValueError):
        raise ValueError(f"bucket_key must be a ratio such as '1.0' or 0.57, got {bucket_key!r}") from None
    if isinstance(bucket_key, bool) or not math.isfinite(ar) or ar <= 0:
        raise ValueError(f"bucket_key must be a positive ratio, got {bucket_key!r}")
    return np.array([h, w], dtype=np.float32), ar


# -- resizing ------------------------------------------------------------------------------------------------
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}


def resize_and_center_crop(image: Image.Image, height, width, resample="bicubic") -> Image.Image:
    """Scale ``image`` (keeping its aspect) until it covers ``height x width``, then centre-crop to exactly that.

    Follows the official multi-scale training transform (``T.Resize(cover_size)`` then ``T.CenterCrop``):
    the side that binds is scaled to the target exactly and the other one is ``int(side * scale)``; the crop
    offset is ``round((excess) / 2)`` like torchvision's ``CenterCrop``.  ``resample`` defaults to bicubic,
    which PixArt-α and Σ (<= 1024) training use; Σ's 2K data uses ``"lanczos"``.  PIL filters antialias when
    downscaling, like torchvision on PIL images.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
    th = _check_pixels("height", height)
    tw = _check_pixels("width", width)
    if isinstance(resample, str):
        if resample.lower() not in _RESAMPLE:
            raise ValueError(f"unknown resample {resample!r}; choose from {sorted(_RESAMPLE)}")
        resample = _RESAMPLE[resample.lower()]
    ow, oh = image.size
    if (oh, ow) == (th, tw):
        return image.copy()
    if th / oh > tw / ow:
        rh, rw = th, int(ow * th / oh)
    else:
        rh, rw = int(oh * tw / ow), tw
    rh, rw = max(rh, th), max(rw, tw)  # float rounding must never leave the image short of the target
    if (rh, rw) != (oh, ow):
        image = image.resize((rw, rh), resample)
    top = int(round((rh - th) / 2.0))
    left = int(round((rw - tw) / 2.0))
    return image.crop((left, top, left + tw, top + th))


def _linear_taps(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` on one axis."""
    # The scale is rounded to the compute dtype; the source coordinate is then formed with one rounding, as
    # torch's fused multiply-add does (rounding each step instead drifts by ~1e-4 px on 2K-wide images).
    scale = dtype(in_size) / dtype(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(dtype)
    src = np.maximum(src, dtype(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    w0 = (dtype(1) - w1).astype(dtype)
    return i0, i1, w0, w1


def _bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    n, c, in_h, in_w = x.shape
    dt = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(dt, copy=False)
    if out_h != in_h:
        i0, i1, w0, w1 = _linear_taps(in_h, out_h, dt)
        x = x[:, :, i0, :] * w0[:, None] + x[:, :, i1, :] * w1[:, None]
    if out_w != in_w:
        i0, i1, w0, w1 = _linear_taps(in_w, out_w, dt)
        x = x[..., i0] * w0 + x[..., i1] * w1
    return x


def resize_and_crop_array(x: np.ndarray, height, width) -> np.ndarray:
    """Bring a batch of images ``(N, C, H, W)`` (float) to exactly ``(N, C, height, width)``.

    Matches diffusers' ``PixArtImageProcessor.resize_and_crop_tensor(x, width, height)``: scale by
    ``max(height / H, width / W)`` with sizes ``int(side * scale)``, bilinear resampling with
    ``torch.nn.functional.interpolate(align_corners=False)`` semantics (no antialias), then a centre crop with
    offset ``(excess) // 2``.  One deliberate difference: where diffusers' ``int()`` truncation leaves the
    resized side one pixel short of the target (e.g. 176 * (98 / 176) = 97.99...), we resize to the target
    size, so the output always has the requested shape.  Inputs already at the target size are returned as is.
    Computes in float32 (float64 for float64 input) and returns the input dtype.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    th = _check_pixels("height", height)
    tw = _check_pixels("width", width)
    oh, ow = x.shape[2], x.shape[3]
    if oh == 0 or ow == 0:
        raise ValueError(f"x has an empty spatial size {(oh, ow)}")
    if (oh, ow) == (th, tw):
        return x
    ratio = max(th / oh, tw / ow)
    rh, rw = max(int(oh * ratio), th), max(int(ow * ratio), tw)
    out = _bilinear_resize(x, rh, rw)
    top, left = (rh - th) // 2, (rw - tw) // 2
    return np.ascontiguousarray(out[:, :, top:top + th, left:left + tw]).astype(x.dtype, copy=False)
