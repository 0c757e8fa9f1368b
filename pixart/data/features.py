"""T5 caption features and VAE latent moments: computed on the fly, or cached once by `tools/extract_features.py`.

Both paths produce the same intermediate values, and training turns them into model inputs with the same code,
so the cache and on-the-fly encoding give the same loss for the same sample and noise:

* caption -> T5 features of its real tokens only, (n, C) float32 (n = tokens incl. </s>, <= max_length).
  Padding to max_length happens at batch time with zeros and a 0 mask: padded positions are masked out of the
  cross-attention, so their values never matter (and the cache stays small: Σ's 300 x 4096 floats per caption
  would be 4.9 MB, most of it padding).
* image -> the VAE posterior's mean and std, (C, h, w) float32, for its bucket (and its mirror image when the cache
  is built with --flip). Training draws latents = (mean + std * noise) * scaling_factor with host noise.

Cache layout (one folder per resolution / bucket table):

    features.json                  what was cached: resolution, multi_scale, flip, max_length, channels, ...
    text/<sha1 of caption>.npz     feature (n, C)
    latents/<image path, '/' -> '__'>.npz   mean, std (C, h, w) [flip_mean, flip_std], bucket
    skipped.json                   images the extraction left out, with why (one file per shard with --num_shards:
                                   skipped.shard<i>-of-<N>.json; readers merge them)

Every file is written to a temporary name (unique per process, so shards may run at once) and renamed, so an
interrupted extraction leaves no half files and a second run only does what is missing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pixart.io.atomic import atomic_path
from pixart.io.atomic import write_text as atomic_write_text
from pixart.io.base import refuse_non_finite

META_FILE = "features.json"
VERSION = 1


class FeatureError(ValueError):
    """A cache that is missing or does not fit the training run; the message is one line for the user."""


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def image_key(path: str) -> str:
    return path.replace("\\", "/").strip("/").replace("/", "__")


def _save_npz(path: Path, **arrays) -> None:
    """Atomically, under a name no other process uses (concurrent shards write shared files too); a failed write
    leaves nothing (`pixart.io.atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def skipped_report_name(shard: tuple[int, int] = (0, 1)) -> str:
    """Where one extraction run (or one shard of it) lists the images it left out."""
    shard_id, num_shards = shard
    return "skipped.json" if num_shards == 1 else f"skipped.shard{shard_id}-of-{num_shards}.json"


# ----------------------------------------------------------------------------------------------------------------
# Batching helpers shared by both paths
# ----------------------------------------------------------------------------------------------------------------
def pad_captions(features: list[np.ndarray], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Real-token features [(n_i, C)] -> y (B, 1, L, C) float32 zero-padded and mask (B, L) int32."""
    c = features[0].shape[-1]
    y = np.zeros((len(features), 1, max_length, c), np.float32)
    mask = np.zeros((len(features), max_length), np.int32)
    for i, f in enumerate(features):
        n = min(len(f), max_length)
        y[i, 0, :n] = f[:n]
        mask[i, :n] = 1
    return y, mask


def posterior_latents(mean: np.ndarray, std: np.ndarray, noise: np.ndarray | None, scale: float) -> np.ndarray:
    """A draw from the VAE posterior (its mean when `noise` is None), scaled to the diffusion model's range."""
    z = mean if noise is None else mean + std * noise
    return (z * np.float32(scale)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Encoders (on the fly, and what the extraction tool runs)
# ----------------------------------------------------------------------------------------------------------------
class TextEncoder:
    """T5 + tokenizer -> real-token features per caption."""

    def __init__(self, text_encoder_root, tokenizer_root=None, max_length: int = 120, dtype: str = "fp32"):
        from pixart import cpu
        from pixart.models.t5 import load_t5
        from pixart.models.t5_tokenizer import load_tokenizer
        self.model = cpu.accelerate(load_t5(text_encoder_root, dtype))
        self.tokenizer = load_tokenizer(tokenizer_root or text_encoder_root)
        self.max_length = max_length
        self.channels = self.model.config.d_model

    def __call__(self, captions: list[str]) -> list[np.ndarray]:
        import mindspore as ms
        from mindspore import Tensor
        from pixart.models.t5_tokenizer import encode_prompts
        ids, mask = encode_prompts(self.tokenizer, list(captions), self.max_length)
        out = self.model(Tensor(ids), Tensor(mask)).astype(ms.float32).asnumpy()  # (B, L, C)
        lengths = mask.sum(1)
        return [out[i, :n].copy() for i, n in enumerate(lengths)]


class ImageEncoder:
    """VAE encoder -> posterior mean and std per image."""

    def __init__(self, vae_root, dtype: str = "fp32"):
        from pixart import cpu
        from pixart.models.vae import load_vae
        self.vae = cpu.accelerate(load_vae(vae_root, dtype))
        self.latent_channels = self.vae.config.latent_channels
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mindspore import Tensor
        mean, logvar = self.vae.encode(Tensor(np.ascontiguousarray(images, np.float32)))
        mean, logvar = mean.asnumpy().astype(np.float32), logvar.asnumpy().astype(np.float32)
        return mean, np.exp(np.float32(0.5) * logvar).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
class FeatureCache:
    def __init__(self, root):
        self.root = Path(root)
        meta = self.root / META_FILE
        if not meta.is_file():
            raise FeatureError(f"--feature_dir {self.root} is not a feature cache (no {META_FILE}; build one with "
                               "tools/extract_features.py)")
        self.meta = json.loads(meta.read_text())
        if self.meta.get("version") != VERSION:
            raise FeatureError(f"{meta}: cache version {self.meta.get('version')} is not {VERSION}; re-extract")
        self.skipped = {}  # why the extraction left images out: every shard's report, merged
        for report in sorted(self.root.glob("skipped*.json")):
            for s in json.loads(report.read_text()):
                self.skipped.setdefault(s["path"], s["reason"])

    @classmethod
    def create(cls, root, **meta) -> "FeatureCache":
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / META_FILE
        meta = {"version": VERSION, **meta}
        if path.exists():
            old = json.loads(path.read_text())
            clash = {k: (old.get(k), v) for k, v in meta.items()
                     if k in ("resolution", "multi_scale", "max_length", "text_channels", "latent_channels", "flip",
                              "dtype") and k in old and old.get(k) != v}
            if clash:
                raise FeatureError(f"{root} already caches features with other settings: " +
                                   ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in clash.items()) +
                                   "; use a new --output_dir")
            meta = {**old, **meta, "text": old.get("text") or meta.get("text"),
                    "latents": old.get("latents") or meta.get("latents")}
        atomic_write_text(path, json.dumps(meta, indent=2))
        return cls(root)

    # what is cached
    @property
    def has_text(self) -> bool:
        return bool(self.meta.get("text"))

    @property
    def has_latents(self) -> bool:
        return bool(self.meta.get("latents"))

    def text_path(self, caption: str) -> Path:
        return self.root / "text" / f"{caption_key(caption)}.npz"

    def latent_path(self, path: str) -> Path:
        return self.root / "latents" / f"{image_key(path)}.npz"

    def check_compatible(self, resolution: int, multi_scale: bool, max_length: int, flip: bool) -> None:
        m = self.meta
        if self.has_latents:
            if m.get("resolution") != resolution or bool(m.get("multi_scale")) != bool(multi_scale):
                raise FeatureError(f"--feature_dir {self.root} caches latents for resolution {m.get('resolution')} "
                                   f"(multi_scale {m.get('multi_scale')}), but training uses {resolution} "
                                   f"(multi_scale {multi_scale})")
            if flip and not m.get("flip"):
                raise FeatureError(f"--random_flip needs mirrored latents, but --feature_dir {self.root} was "
                                   "extracted without --flip")
        if self.has_text and m.get("max_length") != max_length:
            raise FeatureError(f"--feature_dir {self.root} caches captions at max_length {m.get('max_length')}, "
                               f"but training uses {max_length}")

    def missing(self, entry, captions: tuple[str, ...]) -> str | None:
        """Why `entry` cannot be trained from the cache (None if it can)."""
        if self.has_latents and not self.latent_path(entry.path).is_file():
            why = self.skipped.get(entry.path)
            return f"not in the feature cache: {why}" if why else "no cached latents"
        if self.has_text:
            for c in captions:
                text = getattr(entry, c)
                if text and not self.text_path(text).is_file():
                    return f"no cached {c} features"
        return None

    # reading
    def text(self, caption: str) -> np.ndarray:
        with np.load(self.text_path(caption)) as f:
            return refuse_non_finite({"feature": f["feature"].astype(np.float32)}, self.text_path(caption))["feature"]

    def latents(self, path: str, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.latent_path(path)) as f:
            prefix = "flip_" if flip else ""
            arrays = refuse_non_finite({k: f[prefix + k].astype(np.float32) for k in ("mean", "std")},
                                       self.latent_path(path))
            return arrays["mean"], arrays["std"]

    # writing
    def write_text(self, caption: str, feature: np.ndarray) -> None:
        _save_npz(self.text_path(caption), feature=feature.astype(self.meta.get("dtype", "float32")))

    def write_latents(self, path: str, bucket: str, mean, std, flip_mean=None, flip_std=None) -> None:
        dt = self.meta.get("dtype", "float32")
        arrays = dict(mean=mean.astype(dt), std=std.astype(dt), bucket=np.array(bucket))
        if flip_mean is not None:
            arrays.update(flip_mean=flip_mean.astype(dt), flip_std=flip_std.astype(dt))
        _save_npz(self.latent_path(path), **arrays)

    def write_skipped(self, skipped: list[dict], shard: tuple[int, int] = (0, 1)) -> Path:
        """This run's (or shard's) report. It replaces the reports of earlier runs, which this run re-checked, but
        not those of the other shards of the same split (--num_shards N), which may be running beside it."""
        path = self.root / skipped_report_name(shard)
        same_split = f"-of-{shard[1]}.json" if shard[1] > 1 else None
        for old in self.root.glob("skipped*.json"):
            if old != path and not (same_split and old.name.startswith("skipped.shard") and
                                    old.name.endswith(same_split)):
                old.unlink(missing_ok=True)
        atomic_write_text(path, json.dumps(skipped, indent=2))
        return path


# ----------------------------------------------------------------------------------------------------------------
# Extraction (tools/extract_features.py)
# ----------------------------------------------------------------------------------------------------------------
def extract_features(source, output_dir, resolution: int, image_dir=None, multi_scale: bool = True,
                     vae_root=None, text_encoder_root=None, tokenizer_root=None, max_length: int = 300,
                     captions=("prompt", "sharegpt4v"), flip: bool = False, dtype: str = "float32",
                     batch_size: int = 8, text: bool = True, latents: bool = True, text_encoder_dtype: str = "fp32",
                     vae_dtype: str = "fp32", shard: tuple[int, int] = (0, 1), log=print) -> dict:
    """Cache T5 features of every caption and VAE moments of every image (in its bucket) of a data source (a
    `pixart.data.sources.Source`, or a label JSON path read with `image_dir`).

    Already cached files are kept; unreadable images are skipped and listed in the returned report.
    """
    import gc
    from pixart.data.dataset import BucketDataset
    from pixart.data.sources import Source
    if not (text or latents):
        raise FeatureError("nothing to extract: both captions and latents are switched off")
    if dtype not in ("float32", "float16"):
        raise FeatureError(f"--dtype must be float32 or float16, got {dtype!r}")
    if latents and not vae_root:
        raise FeatureError("extracting latents needs --vae_root")
    if latents and not (image_dir or isinstance(source, Source)):
        raise FeatureError("extracting latents needs --image_dir (the folder the label paths are relative to)")
    if text and not text_encoder_root:
        raise FeatureError("extracting caption features needs --text_encoder_root")
    shard_id, num_shards = shard
    if isinstance(source, Source):
        dataset = BucketDataset(source, resolution, multi_scale=multi_scale, check_images=latents)
    else:
        dataset = BucketDataset(source, resolution, image_dir if latents else None, multi_scale)
    entries = [e for e in dataset.entries if e.index % num_shards == shard_id]
    log(dataset.summary())
    report = {"skipped": [{"path": s.path, "reason": s.reason} for s in dataset.skipped],
              "text_written": 0, "text_cached": 0, "latents_written": 0, "latents_cached": 0}

    meta = dict(resolution=resolution, multi_scale=multi_scale, flip=flip, max_length=max_length, dtype=dtype,
                text=text, latents=latents)
    text_channels = latent_channels = None
    root = Path(output_dir)
    if text:
        encoder = TextEncoder(text_encoder_root, tokenizer_root, max_length, text_encoder_dtype)
        text_channels = encoder.channels
        cache = FeatureCache.create(root, **meta, text_channels=text_channels,
                                    text_encoder_root=str(text_encoder_root))
        todo = []
        for c in dict.fromkeys(getattr(e, key) for e in entries for key in captions):
            if not c:
                continue
            if cache.text_path(c).is_file():
                report["text_cached"] += 1
            else:
                todo.append(c)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for c, feat in zip(chunk, encoder(chunk)):
                cache.write_text(c, feat)
            report["text_written"] += len(chunk)
        log(f"captions: {report['text_written']} encoded, {report['text_cached']} already cached")
        del encoder
        gc.collect()
    if latents:
        encoder = ImageEncoder(vae_root, vae_dtype)
        latent_channels = encoder.latent_channels
        cache = FeatureCache.create(root, **meta, latent_channels=latent_channels,
                                    vae_factor=encoder.vae.downsample_factor, scaling_factor=encoder.scaling_factor,
                                    vae_root=str(vae_root))
        by_bucket: dict[str, list] = {}
        for e in entries:
            if cache.latent_path(e.path).is_file():
                report["latents_cached"] += 1
            else:
                by_bucket.setdefault(e.bucket, []).append(e)
        for bucket, items in by_bucket.items():
            for i in range(0, len(items), batch_size):
                good, images, mirrored = [], [], []
                for e in items[i:i + batch_size]:
                    try:
                        images.append(dataset.load(e))
                        if flip:
                            mirrored.append(dataset.load(e, flip=True))
                        good.append(e)
                    except Exception as err:
                        report["skipped"].append({"path": e.path, "reason": f"{type(err).__name__}: {err}"})
                if not good:
                    continue
                mean, std = encoder(np.stack(images))
                fm = fs = [None] * len(good)
                if flip:
                    fm, fs = encoder(np.stack(mirrored))
                for k, e in enumerate(good):
                    cache.write_latents(e.path, bucket, mean[k], std[k], fm[k], fs[k])
                report["latents_written"] += len(good)
        log(f"latents: {report['latents_written']} encoded, {report['latents_cached']} already cached")
    if report["skipped"]:
        log(f"skipped {len(report['skipped'])} image(s): " +
            "; ".join(f"{s['path']} ({s['reason']})" for s in report["skipped"][:5]))
    if latents:  # only a run that looked at the images may replace the report on them
        report["skipped_report"] = str(cache.write_skipped(report["skipped"], shard))
    return report
