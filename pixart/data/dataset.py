"""Training data: a label JSON plus an image folder, grouped into aspect-ratio buckets, batched per bucket, sharded.

The label file is the reference port's (and the official InternData) format:

    [{"path": "sub/0001.png", "prompt": "a red square", "sharegpt4v": "a long caption ...",   # sharegpt4v optional
      "height": 768, "width": 1024, "ratio": 0.75}, ...]

`path` is relative to the image folder; `height`/`width` are the original image size, which picks the bucket
(nearest ratio of the resolution's training table) and is α-1024's micro-condition. Each image is resized to
cover its bucket and centre-cropped (`pixart.data.buckets`).

Batches: every epoch shuffles the usable entries with a generator seeded by (seed, epoch), walks them in that
order into per-bucket lists and emits a global batch whenever a bucket holds `batch_size * world_size` entries
(left-overs are dropped, as the official AspectRatioBatchSampler with drop_last). Rank r trains on slice r of each
global batch, so every rank sees the same bucket at the same step, and one process with batch 2b sees exactly the
union of two ranks with batch b. The position in this stream is one integer (global batches consumed), which is
all a checkpoint needs to resume the data exactly.

Unusable entries are skipped, counted and reported, never fatal: a missing or unreadable image (header check when
the dataset is built), an image that fails to decode later (replaced, deterministically, by the first good image
of the same bucket), or in cache mode an entry without cached features.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pixart.data.buckets import TRAIN_ASPECT_RATIOS, bucket_for_image, resize_and_center_crop

REQUIRED_FIELDS = ("path", "prompt", "height", "width", "ratio")
SHUFFLE_STREAM = 1  # first word after the seed in every generator key; pixart.training.batch uses 2


class DataError(ValueError):
    """Bad training data or data options; the message is one line for the user."""


@dataclass
class Entry:
    index: int                  # position in the label file
    path: str                   # relative to the image folder
    prompt: str
    sharegpt4v: str             # "" when the entry has none
    height: float               # original size (label)
    width: float
    bucket: str                 # ratio key of the training table, e.g. "0.57"
    size: tuple[int, int]       # bucket (height, width) in pixels


@dataclass
class Skipped:
    path: str
    reason: str


def load_labels(json_path) -> list[dict]:
    """Read and validate the label JSON: a list of objects with every required field of the right type."""
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        items = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"label file {path} is not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"label file {path} must be a non-empty JSON list of entries")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"label file {path}: entry {i} is not an object")
        missing = [k for k in REQUIRED_FIELDS if k not in item]
        if missing:
            raise DataError(f"label file {path}: entry {i} ({item.get('path', '?')}) is missing field "
                            f"{', '.join(repr(m) for m in missing)} (required: {', '.join(REQUIRED_FIELDS)})")
        if not isinstance(item["path"], str) or not item["path"]:
            raise DataError(f"label file {path}: entry {i} has a bad 'path': {item['path']!r}")
        for key in ("prompt", "sharegpt4v"):
            if key in item and not isinstance(item[key], str):
                raise DataError(f"label file {path}: entry {i} ({item['path']}) has a non-string {key!r}")
        for key in ("height", "width", "ratio"):
            v = item[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise DataError(f"label file {path}: entry {i} ({item['path']}) has a bad {key!r}: {v!r} "
                                "(a positive number is required)")
    return items


def load_image(path, size: tuple[int, int], flip: bool = False, resample: str = "bicubic") -> np.ndarray:
    """Decode, resize to cover `size` (h, w), centre-crop, optionally mirror; (3, h, w) float32 in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    im = resize_and_center_crop(im, size[0], size[1], resample)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(im, np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


class BucketDataset:
    """The usable entries of a label file, each with its bucket, and the per-epoch batch plan."""

    def __init__(self, json_path, resolution: int, image_dir=None, multi_scale: bool = True,
                 check_images: bool = True, available=None):
        """`image_dir` may be None when every feature comes from the cache; `available(entry) -> reason or None`
        lets the caller drop entries (e.g. missing cache files)."""
        if resolution not in TRAIN_ASPECT_RATIOS:
            raise DataError(f"--resolution must be one of {sorted(TRAIN_ASPECT_RATIOS)}, got {resolution}")
        self.json_path = Path(json_path)
        self.resolution, self.multi_scale = resolution, multi_scale
        self.image_dir = Path(image_dir) if image_dir is not None else None
        if self.image_dir is not None and not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        self.resample = "lanczos" if resolution >= 2048 else "bicubic"
        items = load_labels(self.json_path)
        self.num_labels = len(items)
        self.entries: list[Entry] = []
        self.skipped: list[Skipped] = []
        self.decode_failures: list[Skipped] = []
        self._bad: set[int] = set()
        for i, item in enumerate(items):
            if multi_scale:
                key, size = bucket_for_image(item["height"], item["width"], resolution)
            else:  # fixed-size models: every image is resized and cropped to the square
                key, size = "1.0", TRAIN_ASPECT_RATIOS[resolution]["1.0"]
            e = Entry(i, item["path"], item["prompt"].strip(), (item.get("sharegpt4v") or "").strip(),
                      float(item["height"]), float(item["width"]), key, tuple(size))
            reason = self._check_image(e) if (check_images and self.image_dir is not None) else None
            if reason is None and available is not None:
                reason = available(e)
            if reason is not None:
                self.skipped.append(Skipped(e.path, reason))
                continue
            self.entries.append(e)
        if not self.entries:
            raise DataError(f"no usable entries in {self.json_path}: all {self.num_labels} were skipped (first: "
                            f"{self.skipped[0].path}: {self.skipped[0].reason})")
        self.buckets: dict[str, list[int]] = {}
        for pos, e in enumerate(self.entries):
            self.buckets.setdefault(e.bucket, []).append(pos)

    def _check_image(self, e: Entry) -> str | None:
        p = self.image_dir / e.path
        if not p.is_file():
            return "missing"
        try:
            with Image.open(p) as im:
                im.size  # the header parses
        except Exception as err:  # PIL raises many types for bad files
            return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        return None

    def __len__(self) -> int:
        return len(self.entries)

    # -- reporting -------------------------------------------------------------------------------------------
    def summary(self) -> str:
        sizes = ", ".join(f"{k} {self.entries[v[0]].size[0]}x{self.entries[v[0]].size[1]}: {len(v)}"
                          for k, v in sorted(self.buckets.items(), key=lambda kv: float(kv[0])))
        line = f"data: {self.num_labels} labels, {len(self.entries)} usable in {len(self.buckets)} bucket(s) [{sizes}]"
        if self.skipped:
            line += f"; skipped {len(self.skipped)}: " + "; ".join(f"{s.path} ({s.reason})" for s in self.skipped[:5])
            if len(self.skipped) > 5:
                line += f"; ... (+{len(self.skipped) - 5} more)"
        return line

    def check_batch_size(self, global_batch: int, what: str) -> None:
        """At least one bucket must fill a global batch, or no step could ever run."""
        largest = max(self.buckets, key=lambda k: len(self.buckets[k]))
        if len(self.buckets[largest]) < global_batch:
            raise DataError(f"{what} = {global_batch} is larger than every aspect-ratio bucket: the largest "
                            f"(ratio {largest}) holds {len(self.buckets[largest])} images")

    def unused_buckets(self, global_batch: int) -> list[str]:
        return [k for k, v in self.buckets.items() if len(v) < global_batch]

    # -- batches ---------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, global_batch: int, seed: int) -> list[list[int]]:
        """The global batches of one epoch: lists of entry positions, all in one bucket."""
        order = np.random.default_rng([seed, SHUFFLE_STREAM, epoch]).permutation(len(self.entries))
        open_batches: dict[str, list[int]] = {}
        batches = []
        for pos in order.tolist():
            b = open_batches.setdefault(self.entries[pos].bucket, [])
            b.append(pos)
            if len(b) == global_batch:
                batches.append(b[:])
                b.clear()
        return batches

    def batches_per_epoch(self, global_batch: int) -> int:
        return sum(len(v) // global_batch for v in self.buckets.values())

    # -- images ----------------------------------------------------------------------------------------------
    def image(self, pos: int, flip: bool = False) -> tuple[np.ndarray, int]:
        """The preprocessed image of entry `pos`: (array, position actually used). An image that fails to decode
        is recorded and replaced by the first image of the same bucket that decodes (deterministic)."""
        if self.image_dir is None:
            raise DataError("--image_dir is needed to encode images on the fly (no cached latents)")
        e = self.entries[pos]
        candidates = [pos] + [p for p in self.buckets[e.bucket] if p != pos]
        for cand in candidates:
            if cand in self._bad:
                continue
            c = self.entries[cand]
            try:
                return load_image(self.image_dir / c.path, e.size, flip, self.resample), cand
            except Exception as err:
                self._bad.add(cand)
                self.decode_failures.append(Skipped(c.path, f"{type(err).__name__}: {str(err).splitlines()[0]}"
                                                    if str(err) else type(err).__name__))
        raise DataError(f"no image of bucket {e.bucket} can be decoded (last failure: {self.decode_failures[-1].path})")


@dataclass
class BatchRef:
    """One rank's part of one global batch."""
    index: int                  # global batch counter since the start of training
    epoch: int
    positions: list[int]        # entry positions of this rank's samples
    slots: list[int]            # their places in the global batch (keys of the per-sample random draws)
    bucket: str
    entries: list = field(default_factory=list)


class BatchStream:
    """Global batches from `start` on, epoch after epoch; each rank takes its contiguous slice."""

    def __init__(self, dataset: BucketDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.per_epoch = dataset.batches_per_epoch(self.global_batch)
        if self.per_epoch == 0:
            dataset.check_batch_size(self.global_batch, "batch size x ranks")
        self.next_index = start
        self._plan_epoch, self._plan = None, None

    def position(self, index: int) -> tuple[int, int]:
        return divmod(index, self.per_epoch)

    def __iter__(self):
        return self

    def __next__(self) -> BatchRef:
        epoch, i = self.position(self.next_index)
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.dataset.epoch_batches(epoch, self.global_batch, self.seed), epoch
        batch = self._plan[i]
        lo = self.rank * self.batch_size
        positions = batch[lo:lo + self.batch_size]
        ref = BatchRef(self.next_index, epoch, positions, list(range(lo, lo + self.batch_size)),
                       self.dataset.entries[positions[0]].bucket, [self.dataset.entries[p] for p in positions])
        self.next_index += 1
        return ref
