"""VAE decode: ours (MindSpore `AutoencoderKL.decode`) vs diffusers' AutoencoderKL (PyTorch), the SD VAE
(PixArt-α; the SDXL VAE of Σ has the same architecture), fp32, random weights, one image, both in one process tree.

    python bench/bench_vae.py --size 256
    python bench/bench_vae.py --size 1024 --runs 2 --steps 1
    python bench/bench_vae.py --size 2048 --tiled --runs 1 --steps 1    # tiled decode: bounded memory

`--tiled` decodes in 64 x 64 latent tiles with 16 latents of overlap on both sides (ours: `decode_tiled`, which the
pipeline uses above the VAE's sample size; diffusers: `enable_tiling()` with the same tile and overlap).
"""
from __future__ import annotations

import argparse

import numpy as np

from common import machine, parse_or_run_child, run_children, summary, table, timed

TILE, OVERLAP = 64, 16


def child(side: str, a) -> dict:
    latent = a.size // 8
    z = np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)
    if side == "ours":
        import mindspore as ms
        from pixart import backend, cpu
        from pixart.models.vae import AutoencoderKL, VAEConfig
        backend.setup("CPU", a.mode, threads=a.threads or None)
        vae = cpu.accelerate(AutoencoderKL(VAEConfig(sample_size=TILE * 8)))
        vae.set_train(False)
        zt = ms.Tensor(z)

        def step():
            out = vae.decode_tiled(zt, TILE, OVERLAP) if a.tiled else vae.decode(zt)
            return out.asnumpy()
    else:
        import torch
        from diffusers import AutoencoderKL
        if a.threads:
            torch.set_num_threads(a.threads)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=TILE * 8).eval()
        if a.tiled:
            vae.enable_tiling()
            vae.tile_latent_min_size = TILE
            vae.tile_sample_min_size = TILE * 8
            vae.tile_overlap_factor = OVERLAP / TILE
        zt = torch.from_numpy(z)

        def step():
            with torch.no_grad():
                return vae.decode(zt).sample.numpy()
    first, times = timed(step, a.steps)
    return dict(side=side, first_s=first, times=times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    p.add_argument("--tiled", action="store_true", help="tiled decode (64-latent tiles, overlap 16)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed decodes per child, after the first")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="ours: MindSpore mode")
    p.add_argument("--threads", type=int, default=0)
    a = parse_or_run_child(p, child)
    if a is None:
        return
    forward = ["--size", str(a.size), "--steps", str(a.steps), "--mode", a.mode, "--threads", str(a.threads)]
    forward += ["--tiled"] if a.tiled else []
    sides = tuple(a.sides.split(","))
    results = run_children(__file__, sides, a.runs, forward)
    rows = [(side, summary(results[side])) for side in sides]
    title = f"VAE decode, SD VAE, {a.size} px{' tiled' if a.tiled else ''}, fp32 (ours: {a.mode})"
    print()
    print(table(title, rows))
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
