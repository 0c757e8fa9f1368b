"""The demo's synthetic world: one flat shape on a flat background, described by a caption.

A scene is a shape (circle, square, triangle) of one colour (red, green, blue) on the left or right half of an image
of one background colour (white, black, yellow), at one of two aspect ratios of the 256 px bucket table. Its caption
names all four attributes: "a red circle on the left, black background". Drawing is deterministic from a seed (the
shape's exact size and position and the shades jitter a little, so no two images are equal).

`measure` reads the attributes back from pixels (the dominant shape colour, the half the shape lies in, the
background colour): it scores how well an image follows its caption, for the demo's tests and docs.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pixart.data.buckets import TRAIN_ASPECT_RATIOS

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "yellow": (240, 210, 50)}
SIDES = ("left", "right")
RATIOS = ("1.0", "0.5")  # square 256 x 256 and wide 176 x 352: left / right stay clear in both
SIZES = {r: TRAIN_ASPECT_RATIOS[256][r] for r in RATIOS}  # ratio -> (height, width)
PALETTE = {**COLOURS, **BACKGROUNDS}
ATTRIBUTES = ("colour", "side", "background")  # what `measure` reads back (the shape's kind is not scored)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    side: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.side}, {self.background} background"

    @classmethod
    def parse(cls, caption: str) -> "Scene":
        """The scene a world caption describes; ValueError naming the caption if it is not one."""
        words = caption.strip().rstrip(".").replace(",", "").split()
        try:
            a, colour, shape, on, the, side, background, last = words
            scene = cls(shape, colour, side, background)
            if (a, on, the, last) != ("a", "on", "the", "background") or scene not in set(scenes()):
                raise ValueError
        except ValueError:
            raise ValueError(f"not a caption of the demo world: {caption!r} (expected e.g. "
                             f"{scenes()[0].caption!r})") from None
        return scene


def scenes() -> list[Scene]:
    """Every scene of the world (3 shapes x 3 colours x 2 sides x 3 backgrounds = 54), in a fixed order."""
    return [Scene(s, c, p, b) for s, c, p, b in itertools.product(SHAPES, COLOURS, SIDES, BACKGROUNDS)]


def probe_scenes(n: int = 16) -> list[tuple[Scene, str]]:
    """`n` (scene, ratio) pairs spread over every colour, side, background, shape and ratio (fixed order)."""
    all_scenes = scenes()
    rng = np.random.default_rng(2024)
    order = rng.permutation(len(all_scenes))
    return [(all_scenes[i], RATIOS[k % len(RATIOS)]) for k, i in enumerate(order[:n])]


def _jitter(rgb, rng, amount: int = 10) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def draw(scene: Scene, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image: the shape about 0.55 of the short side across, centred in its half."""
    im = Image.new("RGB", (width, height), _jitter(BACKGROUNDS[scene.background], rng))
    d = ImageDraw.Draw(im)
    r = min(height, width) * 0.28 * rng.uniform(0.85, 1.1)
    half = width / 2
    cx = (half / 2 if scene.side == "left" else 1.5 * half) + rng.uniform(-0.08, 0.08) * half
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    fill = _jitter(COLOURS[scene.colour], rng)
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r * 1.1, cy + r * 0.8), (cx + r * 1.1, cy + r * 0.8)], fill=fill)
    return im


def make_dataset(root, per_scene: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Write `per_scene` images of every scene at every ratio under root/images and root/labels.json (the label
    format of train.py and tools/extract_features.py); returns (labels.json, images/)."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for ratio in RATIOS:
        h, w = SIZES[ratio]
        for k, scene in enumerate(scenes()):
            for i in range(per_scene):
                rel = f"{ratio}_{k:02d}_{i}.png"
                draw(scene, h, w, rng).save(images / rel)
                labels.append({"path": rel, "prompt": scene.caption, "height": h, "width": w, "ratio": h / w})
    (root / "labels.json").write_text(json.dumps(labels, indent=1))
    return root / "labels.json", images


def random_images(n: int, seed: int, ratio: str | None = None) -> np.ndarray | list[np.ndarray]:
    """`n` random scenes as uint8 arrays (H, W, 3); one array (n, H, W, 3) when `ratio` is given."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = ratio or RATIOS[i % len(RATIOS)]
        scene = scenes()[rng.integers(len(scenes()))]
        out.append(np.asarray(draw(scene, *SIZES[r], rng)))
    return np.stack(out) if ratio else out


def measure(image) -> dict[str, str | None]:
    """The attributes an image shows: background (the commonest palette colour on its border), colour (the
    commonest shape colour inside, at least 2% of the pixels, else None) and side (the half holding most of
    that colour's pixels)."""
    x = np.asarray(image, np.float32)[..., :3]
    h, w = x.shape[:2]
    names = list(PALETTE)
    centres = np.array([PALETTE[n] for n in names], np.float32)
    cls = np.argmin(((x[:, :, None, :] - centres) ** 2).sum(-1), axis=-1)  # (H, W) nearest palette colour
    b = max(2, min(h, w) // 32)
    border = np.concatenate([cls[:b].ravel(), cls[-b:].ravel(), cls[:, :b].ravel(), cls[:, -b:].ravel()])
    background = names[int(np.bincount(border, minlength=len(names)).argmax())]
    counts = np.bincount(cls.ravel(), minlength=len(names))
    shape_ids = [names.index(c) for c in COLOURS]
    best = max(shape_ids, key=lambda i: counts[i])
    if counts[best] < 0.02 * h * w:
        return {"colour": None, "side": None, "background": background}
    xs = np.nonzero(cls == best)[1]
    side = "left" if np.mean(xs < w / 2) > 0.5 else "right"
    return {"colour": names[best], "side": side, "background": background}


def score(image, scene: Scene) -> int:
    """How many of the caption's measured attributes (colour, side, background) the image shows: 0 to 3."""
    m = measure(image)
    return sum(m[a] == getattr(scene, a) for a in ATTRIBUTES)
