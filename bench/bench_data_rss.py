"""Peak memory of reading a webdataset source: N small synthetic images in .tar shards, indexed and read batch by
batch for one epoch (every image decoded and preprocessed, as training does), for several N in fresh processes.

    python bench/bench_data_rss.py --sizes 500 2000

The data pipeline alone (no model), so that what grows with N shows: the shard index and the dataset's entries.
"""
import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_shards(folder: Path, n: int, per_shard: int = 250) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-n // per_shard)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for k in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                h, w = (64, 64) if k % 2 else (48, 96)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
                for name, data in ((f"{k:07d}.png", buf.getvalue()), (f"{k:07d}.txt", f"image {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{00000..{shards - 1:05d}}}.tar")


def child(spec: str, batch: int) -> None:
    from pixart.data.dataset import BatchStream, BucketDataset
    from pixart.data.sources import open_source
    t = time.time()
    ds = BucketDataset(open_source(train_data_dir=spec), 256)
    stream = BatchStream(ds, batch, seed=0)
    for _ in range(stream.per_epoch):
        ref = next(stream)
        np.stack([ds.image(p)[0] for p in ref.positions])
    print(json.dumps({"images": len(ds), "batches": stream.per_epoch, "seconds": round(time.time() - t, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            spec = write_shards(Path(tmp) / str(n), n)
            r = subprocess.run([sys.executable, __file__, "--child", spec, "--batch_size", str(args.batch_size)],
                               capture_output=True, text=True, check=True)
            print(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
