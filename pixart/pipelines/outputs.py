"""Writing generated images: PNGs that carry their settings as text metadata, a grid, and prompts.json.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, PngImagePlugin


def save_png(image: Image.Image, path, settings: dict) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("parameters", json.dumps(settings))
    tmp = Path(f"{path}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def image_grid(images: list, ncols: int | None = None) -> Image.Image:
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * w, nrows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % ncols) * w, (i // ncols) * h))
    return grid


def write_json(data, path) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def read_png_settings(path) -> dict:
    """The settings a PNG written by `save_png` carries."""
    with Image.open(path) as im:
        return json.loads(im.text["parameters"])
