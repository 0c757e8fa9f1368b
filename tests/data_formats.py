"""One small synthetic image-caption set written in every training-data format the data layer reads: label JSON
with and without sizes, a `datasets` save_to_disk folder, an imagefolder with metadata.jsonl, an image folder with
a .txt caption beside each image, and webdataset .tar shards. Every format lists the same images in the same order
(sorted by file name), so each must give the same batches."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from tests.synthetic import make_dataset


def write_formats(root, per_kind_and_ratio: int = 4, shards: int = 2) -> dict:
    """16 images (by default) in every format under `root`; returns {format: data options (flag: value)}."""
    root = Path(root)
    labels, images = make_dataset(root / "base", per_kind_and_ratio=per_kind_and_ratio, sharegpt4v=False)
    items = sorted(json.loads(labels.read_text()), key=lambda it: it["path"])
    out = {}

    sized = root / "labels.json"
    sized.write_text(json.dumps(items))
    out["json"] = {"--json_path": sized, "--image_dir": images}
    unsized = root / "labels_nosize.json"
    unsized.write_text(json.dumps([{"path": it["path"], "prompt": it["prompt"]} for it in items]))
    out["json_nosize"] = {"--json_path": unsized, "--image_dir": images}

    folder = root / "captions"
    for it in items:
        dst = folder / it["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / it["path"], dst)
        dst.with_suffix(".txt").write_text(it["prompt"] + "\n")
    out["txt_folder"] = {"--train_data_dir": folder}

    imagefolder = root / "imagefolder"
    for it in items:
        dst = imagefolder / "train" / it["path"].replace("/", "_")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / it["path"], dst)
    (imagefolder / "train" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": it["path"].replace("/", "_"), "text": it["prompt"]}) + "\n" for it in items))
    out["imagefolder"] = {"--dataset_name": imagefolder}

    import datasets
    datasets.disable_progress_bars()
    saved = root / "saved"
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": (images / it["path"]).read_bytes(), "path": None} for it in items],
         "en_text": [it["prompt"] for it in items], "zh_text": ["" for _ in items]},
        features=datasets.Features({"image": datasets.Image(), "en_text": datasets.Value("string"),
                                    "zh_text": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(saved))
    out["save_to_disk"] = {"--dataset_name": saved, "--caption_column": "en_text"}

    shard_dir = root / "shards"
    shard_dir.mkdir()
    per = -(-len(items) // shards)
    for s in range(shards):
        with tarfile.open(shard_dir / f"shard-{s:03d}.tar", "w") as tar:
            for k, it in enumerate(items[s * per:(s + 1) * per]):
                key = f"{s * per + k:06d}"
                for name, data in ((f"{key}.png", (images / it["path"]).read_bytes()),
                                   (f"{key}.txt", it["prompt"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out["webdataset"] = {"--train_data_dir": str(shard_dir / ("shard-{000..%03d}.tar" % (shards - 1)))}
    return out


def as_argv(options: dict) -> list[str]:
    return [str(x) for kv in options.items() for x in kv]
