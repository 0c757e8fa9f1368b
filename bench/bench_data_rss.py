"""Peak memory of training from a webdataset source as its size grows: N small synthetic images in .tar shards,
trained with train.py's code path (a tiny PixArt, the demo bundle's VAE and T5 encoding every batch: no feature
cache) for the same number of steps at every N, each N in a fresh process.

    python bench/bench_data_rss.py --sizes 500 2000

With the same steps, the model, optimizer, graphs and batch sizes are the same at every N, so the difference in
peak RSS is what grows with the data set: the shard index and the dataset's entries. `--data_only` measures the
data pipeline alone instead (one epoch, every image decoded and preprocessed).
"""
import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def data_child(spec: str, batch: int) -> dict:
    from pixart.data.dataset import BatchStream, BucketDataset
    from pixart.data.sources import open_source
    ds = BucketDataset(open_source(train_data_dir=spec), 256)
    stream = BatchStream(ds, batch, seed=0)
    for _ in range(stream.per_epoch):
        ref = next(stream)
        np.stack([ds.image(p)[0] for p in ref.positions])
    return {"images": len(ds), "batches": stream.per_epoch}


def train_child(spec: str, batch: int, steps: int, demo_dir: Path, out: Path) -> dict:
    from pixart import demo_bundle as demo
    from pixart.cli import main, train
    comp = demo_dir / demo.COMPONENTS
    argv = ["--model", "PixArt-XL-2-256x256", "--multi_scale", "true", "--depth", "2", "--hidden_size", "72",
            "--vae_root", comp / "vae", "--text_encoder_root", comp / "text_encoder", "--tokenizer_root",
            comp / "tokenizer", "--max_length", "120", "--batch_size", batch, "--max_steps", steps,
            "--save_every", 10 * steps, "--log_every", steps, "--use_ema", "false", "--train_data_dir", spec,
            "--output_dir", out]
    if main(train.run, train.build_parser, None, [str(a) for a in argv]) != 0:
        raise SystemExit("training failed")
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps_logged = [r for r in rows if "step" in r]
    return {"steps": len(steps_logged), "epochs_seen": steps_logged[-1]["epoch"] + 1,
            "step_time_s": round(float(np.median([r["step_time"] for r in steps_logged[1:]])), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="training steps at every size")
    p.add_argument("--data_only", action="store_true", help="the data pipeline alone, one epoch, no model")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--demo", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        t = time.time()
        if args.data_only:
            result = data_child(args.child, args.batch_size)
        else:
            result = train_child(args.child, args.batch_size, args.steps, Path(args.demo),
                                 Path(args.child.split("{")[0]).parent / "run")
        print(json.dumps({"images": int(Path(args.child).parent.name), **result,
                          "seconds": round(time.time() - t, 1), "peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        demo_dir = Path(tmp) / "demo"
        if not args.data_only:
            from pixart import demo_bundle as demo
            demo.build(demo_dir, log=lambda *_: None)
        for n in args.sizes:
            spec = write_shards(Path(tmp) / str(n), n)
            cmd = [sys.executable, __file__, "--child", spec, "--batch_size", str(args.batch_size), "--steps",
                   str(args.steps), "--demo", str(demo_dir)] + (["--data_only"] if args.data_only else [])
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
