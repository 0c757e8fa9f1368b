"""Where training images and captions come from: every format behind one interface, `Source`.

A source lists its samples once (`records()`: a name, the captions and, where the format stores it, the original
size) and opens one image on demand (`open(name)`). `pixart.data.dataset.BucketDataset` turns the records into
aspect-ratio buckets and batches, so buckets, caption dropout, `--real_prompt_ratio`, corrupt-image skipping, rank
sharding and exact resume are the same code for every format.

Formats (`open_source` picks one from the data options):

* label JSON (`--json_path`, `--image_dir`), the reference port's and the official repos' format:
  `[{"path", "prompt", "sharegpt4v"?, "height"?, "width"?, "ratio"?}]`; a missing size is read from the image header.
* a Hugging Face `datasets` dataset (`--dataset_name`): a `save_to_disk` folder, or anything `load_dataset` reads
  (a local `imagefolder` with `metadata.jsonl` / `metadata.csv`, parquet or arrow files; a Hub name when online),
  with `--image_column`, `--caption_column`, `--dataset_config_name`, `--train_data_dir`, `--max_train_samples` as
  diffusers' training scripts name them. Images are read as encoded bytes; sizes come from their headers.
* an image folder with a same-named `.txt` or `.caption` file beside each image, searched recursively (kohya style;
  `--train_data_dir`).
* webdataset `.tar` shards (`--train_data_dir` or `--dataset_name`: a folder of shards, a `*.tar` glob or a brace
  pattern `shards-{000..009}.tar`): the tar headers are indexed (names and offsets; captions are read, images are
  not) and each image is read from its shard at its offset when a batch needs it, so shards are never unpacked and
  memory holds only the index. Under data parallelism each rank indexes and reads only its own shards
  (`pixart.data.dataset.RankShards`).

Records come in a fixed order (label order, dataset row order, sorted file names, shard then member order), so the
same images and captions give the same batches from every format.
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image


class DataError(ValueError):
    """Bad training data or data options; the message is one line for the user."""


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")
CAPTION_COLUMNS = ("text", "en_text")     # a dataset's caption column when none is named: diffusers', the reference's
LABEL_FIELDS = ("path", "prompt")          # required in a label JSON entry
SIZE_FIELDS = ("height", "width", "ratio")  # optional: read from the image header when absent


@dataclass
class Record:
    path: str                   # the image's name in its source (keys the feature cache and error messages)
    prompt: str
    sharegpt4v: str = ""        # the long caption, "" when none
    height: float | None = None  # original size when the source stores it
    width: float | None = None


@dataclass
class Skipped:
    path: str
    reason: str


def header_size(fp) -> tuple[int, int]:
    """(height, width) from an image's header: PIL parses the header on open and decodes pixels only on load."""
    with Image.open(fp) as im:
        w, h = im.size
    return h, w


def first_line(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Source:
    """The samples of one data set: `records()` once, then `open(path)` per image."""
    name = "data"
    skipped: list[Skipped]
    max_samples: int | None = None  # --max_train_samples: the first N records

    def records(self) -> list[Record]:
        raise NotImplementedError

    def check(self) -> None:
        """The structural checks of `records()` that need no image read (run before anything is written)."""

    def open(self, path: str):
        """Something `PIL.Image.open` reads: a file path or a binary file object."""
        raise NotImplementedError

    def size(self, path: str) -> tuple[int, int]:
        return header_size(self.open(path))


# ---------------------------------------------------------------------------------------------------------------
# Label JSON + image folder
# ---------------------------------------------------------------------------------------------------------------
def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def load_labels(json_path) -> list[dict]:
    """Read and validate the label JSON: a non-empty list of objects with a `path` and a `prompt`, and sizes, where
    given, positive numbers."""
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        items = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        hint = " (a .jsonl metadata file is read with --train_data_dir / --dataset_name)" \
            if path.suffix == ".jsonl" else ""
        raise DataError(f"label file {path} is not valid JSON ({e}){hint}") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"label file {path} must be a non-empty JSON list of entries")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"label file {path}: entry {i} is not an object")
        missing = [k for k in LABEL_FIELDS if k not in item]
        if missing:
            raise DataError(f"label file {path}: entry {i} ({item.get('path', '?')}) is missing field "
                            f"{', '.join(repr(m) for m in missing)} (required: {', '.join(LABEL_FIELDS)}; "
                            f"optional: sharegpt4v, {', '.join(SIZE_FIELDS)})")
        if not isinstance(item["path"], str) or not item["path"]:
            raise DataError(f"label file {path}: entry {i} has a bad 'path': {item['path']!r}")
        for key in ("prompt", "sharegpt4v"):
            if key in item and not isinstance(item[key], str):
                raise DataError(f"label file {path}: entry {i} ({item['path']}) has a non-string {key!r}")
        for key in SIZE_FIELDS:
            if key in item and not _positive(item[key]):
                raise DataError(f"label file {path}: entry {i} ({item['path']}) has a bad {key!r}: {item[key]!r} "
                                "(a positive number is required)")
        if ("height" in item) != ("width" in item):
            raise DataError(f"label file {path}: entry {i} ({item['path']}) gives only one of 'height' and 'width'")
    return items


def path_inside(root: Path, path: str) -> Path:
    """`root / path` if it stays inside `root` (no `..` above it, not absolute), else FileNotFoundError: a label
    such as `../../etc/hostname` is skipped like a missing image and never read. Checked on the names, so a
    symlink inside the folder still works."""
    base = os.path.abspath(root)
    if os.path.commonpath([os.path.abspath(os.path.join(base, path)), base]) != base:
        raise FileNotFoundError(f"{path}: outside the image folder")
    return Path(root) / path


class LabelSource(Source):
    """A label JSON; `path` is relative to `image_dir` (None: no images, e.g. every latent is cached)."""

    def __init__(self, json_path, image_dir=None):
        self.json_path = Path(json_path)
        self.name = str(self.json_path)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        if self.image_dir is not None and not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        self.skipped = []

    def check(self) -> None:
        load_labels(self.json_path)

    def records(self) -> list[Record]:
        return [Record(it["path"], it["prompt"], it.get("sharegpt4v") or "", it.get("height"), it.get("width"))
                for it in load_labels(self.json_path)]

    def open(self, path: str):
        if self.image_dir is None:
            raise DataError("--image_dir is needed to read images (no cached latents, or labels without sizes)")
        p = path_inside(self.image_dir, path)
        if not p.is_file():
            raise FileNotFoundError("missing")
        return p


# ---------------------------------------------------------------------------------------------------------------
# Image folder with a caption file beside each image
# ---------------------------------------------------------------------------------------------------------------
class CaptionFolderSource(Source):
    """Every image under `root` (recursively, sorted by path) with the same-named `.txt` / `.caption` file."""

    def __init__(self, root):
        self.root = Path(root)
        self.name = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.skipped = []

    def check(self) -> None:
        self._pairs()

    def _pairs(self) -> tuple[dict, dict]:
        """({stem: image}, {stem: caption file}) with every caption file's image present."""
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        images = {p.with_suffix(""): p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
        captions = {}
        for p in files:
            if p.suffix.lower() in CAPTION_EXTENSIONS:
                stem = p.with_suffix("")
                if stem not in images:
                    raise DataError(f"{p}: a caption file without an image (expected {stem.name} with one of "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
                captions.setdefault(stem, p)
        if not images:
            raise DataError(f"no images in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
        return images, captions

    def records(self) -> list[Record]:
        images, captions = self._pairs()
        out = []
        for stem, img in sorted(images.items(), key=lambda kv: kv[1].relative_to(self.root).as_posix()):
            rel = img.relative_to(self.root).as_posix()
            if stem not in captions:
                self.skipped.append(Skipped(rel, f"no caption file ({' or '.join(CAPTION_EXTENSIONS)})"))
                continue
            out.append(Record(rel, captions[stem].read_text(encoding="utf-8", errors="replace").strip()))
        return out

    def open(self, path: str):
        return self.root / path


# ---------------------------------------------------------------------------------------------------------------
# webdataset .tar shards, read in place
# ---------------------------------------------------------------------------------------------------------------
def expand_shards(spec: str) -> list[Path]:
    """A folder of .tar files, a glob, or a brace pattern (`a-{000..009}.tar`, `{a,b}.tar`) -> shard paths."""
    p = Path(spec)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    paths = []
    for pattern in braceexpand(spec):
        paths += sorted(Path(m) for m in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    return paths


def is_shard_spec(spec: str | None) -> bool:
    if not spec:
        return False
    p = Path(spec)
    if p.is_dir():
        return any(p.glob("*.tar")) and not any(p.glob("*.arrow")) and not (p / "dataset_info.json").exists()
    return spec.endswith(".tar") or (".tar" in spec and ("{" in spec or glob.has_magic(spec)))


class ShardSource(Source):
    """webdataset shards: samples are the members that share a key (`<key>.jpg` + `<key>.txt`, ...)."""

    def __init__(self, spec: str):
        self.name = spec
        self.shards = expand_shards(spec)
        if not self.shards:
            raise DataError(f"no .tar shards match {spec}")
        for s in self.shards:
            if not s.is_file():
                raise DataError(f"shard not found: {s}")
        self.where: dict[str, tuple[Path, int, int]] = {}  # path -> (shard, data offset, size)
        self.skipped = []

    def subset(self, indices) -> "ShardSource":
        """The same source restricted to the shards at `indices` (a rank's shards under data parallelism); nothing
        is read."""
        part = object.__new__(ShardSource)
        part.name, part.shards, part.where, part.skipped = self.name, [self.shards[i] for i in indices], {}, []
        return part

    def check(self) -> None:
        for shard in self.shards:
            if not tarfile.is_tarfile(shard):
                raise DataError(f"{shard} is not a tar file (webdataset shards are .tar archives)")

    @staticmethod
    def _index(shard: Path) -> dict[str, dict]:
        """{key: {"image": (data offset, size), "caption": text}} of one shard, from its headers."""
        samples: dict[str, dict] = {}
        with tarfile.open(shard, "r:") as tar:  # uncompressed: member data is read in place, by offset
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)
                key, _, ext = base[-1].partition(".")
                key = "/".join(base[:-1] + [key])
                s = samples.setdefault(key, {})
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    s["image"] = (m.offset_data, m.size)
                elif ext in CAPTION_EXTENSIONS:
                    s["caption"] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
        return samples

    def records(self) -> list[Record]:
        self.check()
        out = []
        for shard in self.shards:
            try:
                samples = self._index(shard)
            except tarfile.ReadError as e:
                raise DataError(f"{shard}: cannot be read in place as an uncompressed tar ({first_line(e)}); "
                                "compressed shards (.tar.gz) must be decompressed") from None
            for key, s in samples.items():
                path = f"{shard.name}/{key}"
                if "image" not in s:
                    if "caption" in s:
                        self.skipped.append(Skipped(path, "no image in the shard"))
                    continue
                if "caption" not in s:
                    self.skipped.append(Skipped(path, "no caption (.txt) in the shard"))
                    continue
                self.where[path] = (shard, *s["image"])
                out.append(Record(path, s["caption"]))
        if not out:
            raise DataError(f"no samples (an image and a .txt caption per key) in the shards of {self.name}")
        return out

    def open(self, path: str):
        shard, offset, size = self.where[path]
        with open(shard, "rb") as f:
            f.seek(offset)
            return io.BytesIO(f.read(size))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


class HFDatasetSource(Source):
    """A `datasets` dataset's train split: an image column and a caption column."""

    def __init__(self, name: str | None, config: str | None = None, data_dir: str | None = None,
                 image_column: str = "image", caption_column: str | None = None, max_samples: int | None = None):
        try:
            import datasets
        except ImportError:
            raise DataError("reading a Hugging Face dataset needs the `datasets` package (pip install datasets)") \
                from None
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        name, data_dir = (str(name) if name else None), (str(data_dir) if data_dir else None)
        self.name = name or data_dir
        ds = self._load(datasets, name, config, data_dir)
        columns = list(ds.column_names)
        if caption_column is None:  # diffusers' default, then the reference port's
            caption_column = next((c for c in CAPTION_COLUMNS if c in columns), CAPTION_COLUMNS[0])
        for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
            if col not in columns:
                raise DataError(f"{flag} {col!r} is not a column of {self.name}; its columns: {', '.join(columns)}")
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # encoded bytes: sizes from headers
            self.kind = "image"
        elif ds.features[image_column].dtype == "string":
            self.kind = "path"  # file names, relative to the dataset's folder
        else:
            raise DataError(f"--image_column {image_column!r} of {self.name} holds {ds.features[image_column]}, "
                            "not images or image paths")
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.base = Path(data_dir or name or ".")
        self.rows: dict[str, int] = {}
        self.skipped = []

    def _load(self, datasets, name, config, data_dir):
        local = Path(name) if name else None
        try:
            if local is not None and local.is_dir() and ((local / "dataset_info.json").is_file()
                                                          or (local / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(local))
            elif name is None:
                ds = datasets.load_dataset("imagefolder", data_dir=data_dir)
            else:
                if not local.exists() and not _hub_reachable():
                    raise DataError(f"--dataset_name {name}: not a local folder, and the Hugging Face Hub cannot be "
                                    "reached (offline?); give a local dataset folder")
                ds = datasets.load_dataset(name, config, data_dir=data_dir)
        except DataError:
            raise
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            raise DataError(f"cannot load dataset {self.name}: {first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"dataset {self.name} has no 'train' split; its splits: {', '.join(ds)}")
            ds = ds["train"]
        if len(ds) == 0:
            raise DataError(f"dataset {self.name} is empty")
        return ds

    def records(self) -> list[Record]:
        """Captions only: image bytes stay in the memory-mapped Arrow files until a batch or a header needs them."""
        out = []
        captions = self.ds[self.caption_column]
        names = self.ds[self.image_column] if self.kind == "path" else [f"row{i:06d}" for i in range(len(captions))]
        for i, (path, cap) in enumerate(zip(names, captions)):
            if not path:
                self.skipped.append(Skipped(f"row{i:06d}", "no image path"))
                continue
            self.rows[path] = i
            out.append(Record(path, cap.strip() if isinstance(cap, str) else str(cap or "").strip()))
        return out

    def open(self, path: str):
        if self.kind == "path":
            return self.base / path
        img = self.ds[self.rows[path]][self.image_column]
        if img is None:
            raise ValueError("no image in this row")
        if img.get("bytes") is not None:
            return io.BytesIO(img["bytes"])
        return Path(img["path"])


# ---------------------------------------------------------------------------------------------------------------
# Choosing the source from the options
# ---------------------------------------------------------------------------------------------------------------
def has_metadata(folder: Path) -> bool:
    return any((folder / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv", "parquet"))


def open_source(json_path=None, image_dir=None, dataset_name=None, dataset_config_name=None, train_data_dir=None,
                image_column="image", caption_column=None, max_train_samples=None) -> Source:
    """The source the data options name; raises DataError (one line) for a wrong combination."""
    if json_path and (dataset_name or train_data_dir):
        raise DataError("give one data source: --json_path or --dataset_name / --train_data_dir")
    if max_train_samples is not None and max_train_samples < 1:
        raise DataError(f"--max_train_samples must be >= 1, got {max_train_samples}")
    source = _open_source(json_path, image_dir, dataset_name, dataset_config_name, train_data_dir, image_column,
                          caption_column, max_train_samples)
    source.max_samples = max_train_samples
    return source


def _open_source(json_path, image_dir, dataset_name, dataset_config_name, train_data_dir, image_column,
                 caption_column, max_train_samples) -> Source:
    if json_path:
        return LabelSource(json_path, image_dir)
    for spec in (dataset_name, train_data_dir if not dataset_name else None):
        if is_shard_spec(spec):
            return ShardSource(spec)
    if dataset_name:
        return HFDatasetSource(dataset_name, dataset_config_name, train_data_dir, image_column, caption_column,
                               max_train_samples)
    if train_data_dir:
        root = Path(train_data_dir)
        if not root.is_dir():
            raise DataError(f"--train_data_dir not found: {train_data_dir}")
        if has_metadata(root):
            return HFDatasetSource(None, None, train_data_dir, image_column, caption_column, max_train_samples)
        return CaptionFolderSource(root)
    raise DataError("no training data: give --json_path (+ --image_dir), --dataset_name or --train_data_dir")


def source_from_args(args) -> Source:
    """`open_source` with the data options of a parsed command line."""
    return open_source(args.json_path, args.image_dir, getattr(args, "dataset_name", None),
                       getattr(args, "dataset_config_name", None), getattr(args, "train_data_dir", None),
                       getattr(args, "image_column", "image"), getattr(args, "caption_column", None),
                       getattr(args, "max_train_samples", None))


def check_data_args(args, flag=lambda dest: f"--{dest}", images_needed: bool | None = None) -> None:
    """The data options' checks that need no listing of the data (before anything loads); DataError names the flag.
    `images_needed` (default: no --feature_dir) asks for --image_dir with a label JSON."""
    json_path, dataset_name = args.json_path, getattr(args, "dataset_name", None)
    train_data_dir = getattr(args, "train_data_dir", None)
    if json_path and (dataset_name or train_data_dir):
        raise DataError(f"give one data source: {flag('json_path')} or {flag('dataset_name')} / "
                        f"{flag('train_data_dir')}")
    if not (json_path or dataset_name or train_data_dir):
        raise DataError(f"no training data: give {flag('json_path')} (the label JSON, with {flag('image_dir')}), "
                        f"{flag('dataset_name')} or {flag('train_data_dir')}")
    if json_path and not Path(json_path).is_file():
        raise DataError(f"{flag('json_path')} not found: {json_path}")
    if args.image_dir and not Path(args.image_dir).is_dir():
        raise DataError(f"{flag('image_dir')} not found: {args.image_dir}")
    feature_dir = getattr(args, "feature_dir", None)
    if feature_dir and not Path(feature_dir).is_dir():
        raise DataError(f"{flag('feature_dir')} not found: {feature_dir}")
    if images_needed is None:
        if json_path and not feature_dir and not args.image_dir:
            raise DataError(f"{flag('image_dir')} is required unless {flag('feature_dir')} holds cached latents")
    elif images_needed and json_path and not args.image_dir:
        raise DataError(f"{flag('image_dir')} is required (the folder the label paths are relative to)")
    if train_data_dir and not is_shard_spec(train_data_dir) and not Path(train_data_dir).is_dir():
        raise DataError(f"{flag('train_data_dir')} not found: {train_data_dir}")
    n = getattr(args, "max_train_samples", None)
    if n is not None and n < 1:
        raise DataError(f"{flag('max_train_samples')} must be >= 1, got {n}")
    source_from_args(args).check()  # the source is opened again, and listed, when training sets up its data


# ---------------------------------------------------------------------------------------------------------------
# A caption CSV, and writing a label JSON (tools/make_labels.py)
# ---------------------------------------------------------------------------------------------------------------
CSV_IMAGE_COLUMNS = ("file_name", "path", "image")
CSV_CAPTION_COLUMNS = ("text", "caption", "prompt")


class CSVSource(LabelSource):
    """A CSV with an image-path column (file_name / path / image) and a caption column (text / caption / prompt),
    paths relative to `image_dir`."""

    def check(self) -> None:
        self.records()

    def records(self) -> list[Record]:
        return csv_records(self.json_path)


def csv_records(csv_path) -> list[Record]:
    import csv
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"caption CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        image = next((c for c in CSV_IMAGE_COLUMNS if c in columns), None)
        caption = next((c for c in CSV_CAPTION_COLUMNS if c in columns), None)
        if image is None or caption is None:
            raise DataError(f"{path}: needs an image column ({' / '.join(CSV_IMAGE_COLUMNS)}) and a caption column "
                            f"({' / '.join(CSV_CAPTION_COLUMNS)}); its columns: {', '.join(columns) or 'none'}")
        rows = [Record(r[image], (r[caption] or "").strip()) for r in reader if r.get(image)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def label_items(source: Source) -> tuple[list[dict], list[Skipped]]:
    """The label JSON entries of a source's records, sizes read from the image headers; unreadable images are
    left out and returned with why."""
    items, skipped = [], list(source.skipped)
    for r in source.records():
        try:
            h, w = source.size(r.path)
        except Exception as err:  # PIL raises many types for bad files
            skipped.append(Skipped(r.path, "missing" if isinstance(err, FileNotFoundError) else first_line(err)))
            continue
        item = {"path": r.path, "prompt": r.prompt, "height": h, "width": w, "ratio": h / w}
        if r.sharegpt4v:
            item["sharegpt4v"] = r.sharegpt4v
        items.append(item)
    return items, skipped
