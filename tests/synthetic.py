"""A tiny synthetic image-caption set for the training tests: red squares and blue circles in two aspect ratios."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CAPTIONS = {"square": "a red square", "circle": "a blue circle"}
SIZES = {"1.0": (64, 64), "0.5": (48, 96)}  # (height, width) of the originals -> buckets 1.0 and 0.5 at 256 px


def draw(kind: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """A large centred shape on a light background whose shade varies a little, so no two images are equal."""
    im = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(226, 234, 3)))
    d = ImageDraw.Draw(im)
    r = min(height, width) * 0.42
    cx, cy = width / 2, height / 2
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "square":
        d.rectangle(box, fill=(220, 30, 30))
    else:
        d.ellipse(box, fill=(30, 50, 220))
    return im


def make_dataset(root, per_kind_and_ratio: int = 4, seed: int = 0, ratios=("1.0", "0.5"),
                 sharegpt4v: bool = True) -> tuple[Path, Path]:
    """Write images/ and labels.json under root; returns (labels.json, images/)."""
    root = Path(root)
    images = root / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for ratio in ratios:
        h, w = SIZES[ratio]
        for kind, caption in CAPTIONS.items():
            for i in range(per_kind_and_ratio):
                rel = f"sub/{kind}_{ratio}_{i}.png"
                draw(kind, h, w, rng).save(images / rel)
                item = {"path": rel, "prompt": caption, "height": h, "width": w, "ratio": h / w}
                if sharegpt4v:
                    item["sharegpt4v"] = f"{caption} on a light grey background, centred"
                labels.append(item)
    (root / "labels.json").write_text(json.dumps(labels, indent=1))
    return root / "labels.json", images
