"""Denoiser step: ours (MindSpore) vs diffusers' PixArtTransformer2DModel (PyTorch), full PixArt-XL/2, fp32.

    python bench/bench_denoiser.py --size 256 --runs 3 --steps 3

Each run is a fresh child process (so peak RSS is per side), alternating ours / reference; each child builds the
model with random weights, warms up (graph compile for ours, reported separately), then times `--steps` forward
passes of a CFG batch of 2. Prints medians, min-max, peak RSS and the ratio ours / reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def child(side: str, size: int, steps: int, depth: int, mode: str, threads: int) -> dict:
    n, tokens, latent = 2, 120, size // 8
    g = np.random.default_rng(0)
    x = g.standard_normal((n, 4, latent, latent)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    y = g.standard_normal((n, tokens, 4096)).astype(np.float32)
    mask = np.ones((n, tokens), np.int32)
    mask[:, 20:] = 0
    if side == "ours":
        import mindspore as ms
        from pixart import backend
        from pixart.models.pixart import PixArt, preset_config
        backend.setup("CPU", mode, threads=threads or None)
        model = PixArt(preset_config("PixArt-Sigma-XL-2-1024-MS" if size > 512 else "PixArt-XL-2-512x512"
                                     if size == 512 else "PixArt-XL-2-256x256", depth=depth))
        model.set_train(False)
        args = (ms.Tensor(x), ms.Tensor(t), ms.Tensor(y[:, None]), ms.Tensor(mask))

        def step():
            return model(*args).asnumpy()
    else:
        import torch
        from diffusers import PixArtTransformer2DModel
        if threads:
            torch.set_num_threads(threads)
        model = PixArtTransformer2DModel(num_layers=depth, sample_size=latent, caption_channels=4096,
                                         norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                         activation_fn="gelu-approximate", attention_bias=True,
                                         num_embeds_ada_norm=1000, out_channels=8,
                                         use_additional_conditions=False).eval()
        args = dict(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y),
                    timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})

        def step():
            with torch.no_grad():
                return model(**args).sample.numpy()
    t0 = time.perf_counter()
    step()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # GB (ru_maxrss is KiB on Linux)
    return {"side": side, "warmup_s": warmup, "times": times, "peak_rss_gb": rss}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    p.add_argument("--runs", type=int, default=3, help="child processes per side, alternating")
    p.add_argument("--steps", type=int, default=3, help="timed forward passes per child")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for both sides (0: library default)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.size, a.steps, a.depth, a.mode, a.threads)))
        return
    results = {"ours": [], "torch": []}
    for r in range(a.runs):
        for side in ("ours", "torch"):
            cmd = [sys.executable, __file__, "--child", side, "--size", str(a.size), "--steps", str(a.steps),
                   "--depth", str(a.depth), "--mode", a.mode, "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{side} run failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(res)
            print(f"run {r} {side:5s}: step {statistics.median(res['times']):.3f}s  warmup {res['warmup_s']:.1f}s  "
                  f"rss {res['peak_rss_gb']:.2f} GB", flush=True)
    summary = {}
    for side, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        summary[side] = dict(median=statistics.median(times), lo=min(times), hi=max(times),
                             warmup=statistics.median(r["warmup_s"] for r in runs),
                             rss=max(r["peak_rss_gb"] for r in runs))
    o, t = summary["ours"], summary["torch"]
    print(f"\nPixArt-XL/2 depth {a.depth}, {a.size}px, batch 2 (CFG), fp32, mode {a.mode}")
    print("| side | step median (min-max) s | first call (compile) s | peak RSS GB |")
    print("|---|---|---|---|")
    for side, s in summary.items():
        print(f"| {side} | {s['median']:.3f} ({s['lo']:.3f}-{s['hi']:.3f}) | {s['warmup']:.1f} | {s['rss']:.2f} |")
    print(f"ratio ours/torch: time {o['median'] / t['median']:.2f}x, peak RSS {o['rss'] / t['rss']:.2f}x")


if __name__ == "__main__":
    main()
