"""Input images and masks for image-to-image and inpainting: read, check, and bring to the generated size.

Sizes: the image is scaled to cover the size being generated (the resolution-binning bucket, or height x width
without binning) and centre-cropped, with Lanczos resampling; the mask goes through the same scale-and-crop to the
same size, so a mask of another size than the image is stretched or shrunk onto it, not refused. The output is then
resized back to the requested size as text-to-image is.

Masks follow diffusers: white (>= 0.5 after conversion to grey) = repaint, black = keep. `mask_blur` (pixels, a
Gaussian radius) softens the edge after that threshold. In latent space a latent pixel is repainted as much as the
most-repainted image pixel of its 8 x 8 cell, so the kept region never takes in repainted pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

VAE_FACTOR = 8


def load_image(value, name: str = "image") -> Image.Image:
    """A PIL image in RGB from a path, a PIL image or an (H, W[, C]) array (uint8, or float in [0, 1]); ValueError
    naming `name` for a missing file, one that is not an image, or an array of another shape."""
    return _open(value, name).convert("RGB")


def load_mask(value, name: str = "mask_image") -> Image.Image:
    """The mask as a single-channel (L) PIL image; an RGBA mask uses its colour, not its alpha."""
    return _grey(_open(value, name), name)


def _open(value, name: str) -> Image.Image:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name} not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{name} {path} is not a readable image ({type(e).__name__}: {e})") from None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        a = value
        if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
            a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or min(a.shape[:2]) < 1:
            raise ValueError(f"{name} must be an (H, W) or (H, W, 3) array, got shape {value.shape}")
        if np.issubdtype(a.dtype, np.floating):
            a = (np.clip(a, 0, 1) * 255).round()
        return Image.fromarray(a.astype(np.uint8))
    raise ValueError(f"{name} must be a path, a PIL image or a numpy array, got {type(value).__name__}")


def _grey(im: Image.Image, name: str) -> Image.Image:
    if im.mode in ("L", "1"):
        return im.convert("L")
    if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
        return im.convert("RGB").convert("L")
    raise ValueError(f"{name} has mode {im.mode!r}, which cannot be read as a single-channel mask; save it as a "
                     "grey or RGB image (white = repaint, black = keep)")


def cover_and_crop(im: Image.Image, height: int, width: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """`im` scaled to cover height x width (keeping its aspect ratio) and centre-cropped to exactly that size."""
    w0, h0 = im.size
    if (h0, w0) == (height, width):
        return im
    scale = max(height / h0, width / w0)
    rw, rh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    im = im.resize((rw, rh), resample)
    left, top = (rw - width) // 2, (rh - height) // 2
    return im.crop((left, top, left + width, top + height))


def image_tensor(im: Image.Image, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1], the VAE's input."""
    a = np.asarray(cover_and_crop(im, height, width), np.float32) / 127.5 - 1.0
    return a.transpose(2, 0, 1)[None]


def pixel_mask(mask: Image.Image, height: int, width: int, blur: float = 0.0) -> np.ndarray:
    """(height, width) float32 in [0, 1], 1 = repaint: thresholded at 0.5, then blurred by `blur` pixels."""
    m = np.asarray(cover_and_crop(mask, height, width, Image.Resampling.BILINEAR), np.float32) / 255.0
    m = (m >= 0.5).astype(np.float32)
    if blur > 0:
        im = Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        m = np.asarray(im, np.float32) / 255.0
    return m


def latent_mask(mask: Image.Image, height: int, width: int, blur: float = 0.0) -> np.ndarray:
    """(1, 1, height / 8, width / 8) float32: per latent pixel, the largest repaint weight of its 8 x 8 cell."""
    m = pixel_mask(mask, height, width, blur)
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    return m[:h * VAE_FACTOR, :w * VAE_FACTOR].reshape(h, VAE_FACTOR, w, VAE_FACTOR).max(axis=(1, 3))[None, None]
