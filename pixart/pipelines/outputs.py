"""Writing generated images: PNGs that carry their settings as text metadata, a grid, and prompts.json.

Every file is written to a temporary name and renamed (`pixart.io.atomic`), so an interrupted run or a full disk never
leaves a half-written file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from PIL import Image, PngImagePlugin

from pixart.io.atomic import atomic_path, write_text


def save_png(image: Image.Image, path, settings: dict) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("parameters", json.dumps(settings))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def provenance(model: str, checkpoint, lora_path=None, lora_scale: float = 1.0) -> dict:
    """What a generated PNG records beside its generation settings: the model preset and weights it came from,
    and the LoRA and its scale when one is applied."""
    out = dict(model=model, checkpoint=str(checkpoint))
    if lora_path:
        out.update(lora=str(lora_path), lora_scale=lora_scale)
    return out


def save_images(result, path_for: Callable[[int, dict], Path], extra: dict | None = None, log=None) -> list[Path]:
    """Save every image of a pipeline `result` as a PNG at `path_for(j, settings)` (j: its index in the result),
    its settings, with `extra` added (in place, so `result.settings` says what the files say), as metadata."""
    written = []
    for j, (image, settings) in enumerate(zip(result.images, result.settings)):
        settings.update(extra or {})
        path = Path(path_for(j, settings))
        save_png(image, path, settings)
        written.append(path)
        if log is not None:
            log(f"saved {path}")
    return written


def image_grid(images: list, ncols: int | None = None) -> Image.Image:
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * w, nrows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % ncols) * w, (i // ncols) * h))
    return grid


def write_json(data, path) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def read_png_settings(path) -> dict:
    """The settings a PNG written by `save_png` carries."""
    with Image.open(path) as im:
        return json.loads(im.text["parameters"])
