"""Training data: the records of a source (`pixart.data.sources`: label JSON, Hugging Face dataset, image folder with
captions, webdataset shards) grouped into aspect-ratio buckets, batched per bucket, sharded.

Each record's original size (from the source, else from its image header) picks the bucket (nearest ratio of the
resolution's training table) and is α-1024's micro-condition. Each image is resized to cover its bucket and
centre-cropped (`pixart.data.buckets`).

Batches: every epoch shuffles the usable entries with a generator seeded by (seed, epoch), walks them in that
order into per-bucket lists and emits a global batch whenever a bucket holds `batch_size * world_size` entries
(left-overs are dropped, as the official AspectRatioBatchSampler with drop_last). Rank r trains on slice r of each
global batch, so every rank sees the same bucket at the same step, and one process with batch 2b sees exactly the
union of two ranks with batch b. The position in this stream is one integer (global batches consumed), which is
all a checkpoint needs to resume the data exactly, whatever the source.

webdataset shards under data parallelism (`RankShards`) are the exception: each rank reads only its own shards.
Every epoch the shards are shuffled by (seed, epoch) and cut into world-size equal runs; rank r indexes and reads
run r only, and buckets and batches those samples by itself (batches of the per-rank batch size, so ranks may train
different buckets at the same step). The shard count must be a multiple of the number of ranks (refused otherwise:
ranks read whole shards). An epoch has as many steps as the fewest batches any rank's epoch-0 shards fill, agreed
between the ranks at set-up; a rank whose shards fill fewer batches in a later epoch starts that epoch's batches
again, one with more leaves the rest. The position is still one integer, so a resume repeats the data exactly; a
single process reads every shard, so its batches are not the ranks' batches side by side.

Unusable entries are skipped, counted and reported, never fatal: a missing or unreadable image (header check when
the dataset is built), an image that fails to decode later (replaced, deterministically, by the first good image
of the same bucket), or in cache mode an entry without cached features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pixart.data.buckets import TRAIN_ASPECT_RATIOS, bucket_for_image, resize_and_center_crop
from pixart.data.sources import (DataError, LabelSource, ShardSource, Skipped, Source, first_line,  # noqa: F401
                                 load_labels)

SHUFFLE_STREAM = 1  # first word after the seed in every generator key; pixart.training.batch uses 2
SHARD_STREAM = 3    # deals webdataset shards to ranks, per epoch


@dataclass
class Entry:
    index: int                  # position in the source's records
    path: str                   # the image's name in the source (relative path for folders and labels)
    prompt: str
    sharegpt4v: str             # "" when the entry has none
    height: float               # original size (label or image header)
    width: float
    bucket: str                 # ratio key of the training table, e.g. "0.57"
    size: tuple[int, int]       # bucket (height, width) in pixels


def load_image(path, size: tuple[int, int], flip: bool = False, resample: str = "bicubic") -> np.ndarray:
    """Decode (a path or a binary file object), resize to cover `size` (h, w), centre-crop, optionally mirror;
    (3, h, w) float32 in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    im = resize_and_center_crop(im, size[0], size[1], resample)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(im, np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


class BucketDataset:
    """The usable entries of a label file, each with its bucket, and the per-epoch batch plan."""

    def __init__(self, source, resolution: int, image_dir=None, multi_scale: bool = True,
                 check_images: bool = True, available=None):
        """`source`: a `Source`, or a label JSON path read with `image_dir` (None: no images, e.g. every latent
        is cached). `check_images`: open every image header now (always done for entries without a size).
        `available(entry) -> reason or None` lets the caller drop entries (e.g. missing cache files)."""
        if resolution not in TRAIN_ASPECT_RATIOS:
            raise DataError(f"--resolution must be one of {sorted(TRAIN_ASPECT_RATIOS)}, got {resolution}")
        if not isinstance(source, Source):
            source = LabelSource(source, image_dir)
            check_images = check_images and image_dir is not None
        self.source = source
        self.resolution, self.multi_scale = resolution, multi_scale
        self.resample = "lanczos" if resolution >= 2048 else "bicubic"
        records = source.records()[:source.max_samples]
        self.num_labels = len(records) + len(source.skipped)
        self.entries: list[Entry] = []
        self.skipped: list[Skipped] = list(source.skipped)
        self.decode_failures: list[Skipped] = []
        self._bad: set[int] = set()
        for i, r in enumerate(records):
            reason, size = None, None
            if check_images or r.height is None:
                reason, size = self._header(r.path)
            if reason is None:
                height, width = (r.height, r.width) if r.height is not None else size
                if multi_scale:
                    key, bucket = bucket_for_image(height, width, resolution)
                else:  # fixed-size models: every image is resized and cropped to the square
                    key, bucket = "1.0", TRAIN_ASPECT_RATIOS[resolution]["1.0"]
                e = Entry(i, r.path, r.prompt.strip(), (r.sharegpt4v or "").strip(), float(height), float(width),
                          key, tuple(bucket))
                if available is not None:
                    reason = available(e)
            if reason is not None:
                self.skipped.append(Skipped(r.path, reason))
                continue
            self.entries.append(e)
        if not self.entries:
            first = f" (first: {self.skipped[0].path}: {self.skipped[0].reason})" if self.skipped else ""
            raise DataError(f"no usable entries in {source.name}: all {self.num_labels} were skipped{first}")
        self.buckets: dict[str, list[int]] = {}
        for pos, e in enumerate(self.entries):
            self.buckets.setdefault(e.bucket, []).append(pos)

    def _header(self, path: str) -> tuple[str | None, tuple[int, int] | None]:
        """(reason the image is unusable or None, its (height, width) from the header)."""
        try:
            return None, self.source.size(path)
        except DataError:
            raise
        except FileNotFoundError:
            return "missing", None
        except Exception as err:  # PIL raises many types for bad files
            return f"unreadable ({first_line(err)})", None

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
    def load(self, e: Entry, flip: bool = False) -> np.ndarray:
        """Entry `e`'s image, preprocessed for its bucket."""
        return load_image(self.source.open(e.path), e.size, flip, self.resample)

    def image(self, pos: int, flip: bool = False) -> tuple[np.ndarray, int]:
        """The preprocessed image of entry `pos`: (array, position actually used). An image that fails to decode
        is recorded and replaced by the first image of the same bucket that decodes (deterministic)."""
        e = self.entries[pos]
        candidates = [pos] + [p for p in self.buckets[e.bucket] if p != pos]
        for cand in candidates:
            if cand in self._bad:
                continue
            c = self.entries[cand]
            try:
                return load_image(self.source.open(c.path), e.size, flip, self.resample), cand
            except DataError:
                raise
            except Exception as err:
                self._bad.add(cand)
                self.decode_failures.append(Skipped(c.path, first_line(err)))
        raise DataError(f"no image of bucket {e.bucket} can be decoded (last failure: {self.decode_failures[-1].path})")


def check_shard_count(num_shards: int, world_size: int) -> None:
    if num_shards % world_size:
        fits = [n for n in range(1, num_shards + 1) if num_shards % n == 0]
        raise DataError(f"{num_shards} webdataset shard(s) cannot be dealt evenly to {world_size} ranks: each rank "
                        f"reads whole shards, so the shard count must be a multiple of the number of ranks "
                        f"(re-shard the data, or run {', '.join(map(str, fits))} rank(s))")


def rank_shards(num_shards: int, world_size: int, rank: int, seed: int, epoch: int) -> list[int]:
    """The shards `rank` reads in `epoch`: all shards shuffled by (seed, epoch), cut into `world_size` equal runs;
    run `rank`, in file order."""
    check_shard_count(num_shards, world_size)
    order = np.random.default_rng([seed, SHARD_STREAM, epoch]).permutation(num_shards)
    k = num_shards // world_size
    return sorted(order[rank * k:(rank + 1) * k].tolist())


class RankShards:
    """webdataset shards under data parallelism: one rank's data. Each epoch this rank indexes and reads only the
    shards `rank_shards` deals it, as a `BucketDataset` of their samples (batched by the per-rank batch size). The
    set-up's summary, checks and entries (the resume fingerprint) are those of epoch 0's shards."""
    rank_local = True

    def __init__(self, source: ShardSource, resolution: int, multi_scale: bool, check_images: bool, available,
                 rank: int, world_size: int, seed: int):
        if source.max_samples is not None:
            raise DataError("--max_train_samples cannot be combined with webdataset shards under msrun (each rank "
                            "reads whole shards); write the subset as its own shards")
        check_shard_count(len(source.shards), world_size)
        self.source, self.rank, self.world_size, self.seed = source, rank, world_size, seed
        self.resolution, self.multi_scale = resolution, multi_scale
        self._options = dict(multi_scale=multi_scale, check_images=check_images, available=available)
        self.first = self._read(0)
        self.current, self._epoch, self._failures = self.first, 0, []

    def shards(self, epoch: int) -> list[int]:
        return rank_shards(len(self.source.shards), self.world_size, self.rank, self.seed, epoch)

    def _read(self, epoch: int) -> BucketDataset:
        return BucketDataset(self.source.subset(self.shards(epoch)), self.resolution, **self._options)

    def view(self, epoch: int) -> BucketDataset:
        """This rank's samples in `epoch` (its shards indexed when the epoch starts)."""
        if epoch != self._epoch:
            self._failures += self.current.decode_failures
            self.current.decode_failures = []
            same = self.shards(epoch) == self.shards(0)
            self.current, self._epoch = (self.first if same else self._read(epoch)), epoch
        return self.current

    # -- what set-up, resume and the checkpoint state read -----------------------------------------------------
    @property
    def entries(self) -> list[Entry]:
        return self.first.entries

    @property
    def buckets(self) -> dict[str, list[int]]:
        return self.first.buckets

    @property
    def skipped(self) -> list[Skipped]:
        return self.first.skipped

    @property
    def num_labels(self) -> int:
        return self.first.num_labels

    @property
    def decode_failures(self) -> list[Skipped]:
        return self._failures + self.current.decode_failures

    def __len__(self) -> int:
        return len(self.first)

    def _names(self, epoch: int) -> str:
        return ", ".join(self.source.shards[i].name for i in self.shards(epoch))

    def summary(self) -> str:
        return (f"rank {self.rank}/{self.world_size} reads {len(self.shards(0))} of {len(self.source.shards)} "
                f"shard(s) per epoch (epoch 0: {self._names(0)}); " + self.first.summary())

    def check_batch_size(self, global_batch: int, what: str) -> None:
        self.first.check_batch_size(global_batch // self.world_size,
                                    f"the per-rank batch ({what}; rank {self.rank}, shards {self._names(0)})")

    def unused_buckets(self, global_batch: int) -> list[str]:
        return self.first.unused_buckets(global_batch // self.world_size)

    def batches_per_epoch(self, batch: int) -> int:
        return self.first.batches_per_epoch(batch)

    def epoch_batches(self, epoch: int, batch: int, seed: int) -> list[list[int]]:
        return self.view(epoch).epoch_batches(epoch, batch, seed)

    def image(self, pos: int, flip: bool = False) -> tuple[np.ndarray, int]:
        return self.current.image(pos, flip)


def open_dataset(source: Source, resolution: int, multi_scale: bool = True, check_images: bool = True,
                 available=None, rank: int = 0, world_size: int = 1, seed: int = 0):
    """The training data of one rank: `RankShards` for webdataset shards under data parallelism, else the whole
    `BucketDataset` (every rank slices the same global batches)."""
    if world_size > 1 and isinstance(source, ShardSource):
        return RankShards(source, resolution, multi_scale, check_images, available, rank, world_size, seed)
    return BucketDataset(source, resolution, multi_scale=multi_scale, check_images=check_images, available=available)


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
    """Global batches from `start` on, epoch after epoch; each rank takes its contiguous slice (with `RankShards`,
    each rank's own batch, from its own shards). `agree(n)` returns the smallest `n` over the ranks: with
    `RankShards` it makes every rank's epoch the same number of steps."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, agree=None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.local = getattr(dataset, "rank_local", False)
        self.plan_batch = batch_size if self.local else self.global_batch
        self.per_epoch = dataset.batches_per_epoch(self.plan_batch)
        if self.per_epoch == 0:
            dataset.check_batch_size(self.global_batch, "batch size x ranks")
        if self.local and agree is not None:
            self.per_epoch = agree(self.per_epoch)
        self.next_index = start
        self._plan_epoch, self._plan = None, None

    def position(self, index: int) -> tuple[int, int]:
        return divmod(index, self.per_epoch)

    def __iter__(self):
        return self

    def __next__(self) -> BatchRef:
        epoch, i = self.position(self.next_index)
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.dataset.epoch_batches(epoch, self.plan_batch, self.seed), epoch
            if not self._plan:
                raise DataError(f"rank {self.rank}'s shards of epoch {epoch} fill no batch of {self.batch_size} "
                                "in any aspect-ratio bucket")
        lo = self.rank * self.batch_size
        if self.local:  # this rank's own batch; when its epoch is short, the epoch's batches start again
            positions = self._plan[i % len(self._plan)]
            entries = [self.dataset.view(epoch).entries[p] for p in positions]
        else:
            positions = self._plan[i][lo:lo + self.batch_size]
            entries = [self.dataset.entries[p] for p in positions]
        ref = BatchRef(self.next_index, epoch, positions, list(range(lo, lo + self.batch_size)), entries[0].bucket,
                       entries)
        self.next_index += 1
        return ref
