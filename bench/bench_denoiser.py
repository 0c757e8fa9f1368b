"""Denoiser step: ours (MindSpore) vs diffusers' PixArtTransformer2DModel (PyTorch); full PixArt-XL/2, fp32, random
weights, a classifier-free-guidance batch of 2, both in this one process tree.

    python bench/bench_denoiser.py --size 256            # 3 runs per side, 3 timed steps each
    python bench/bench_denoiser.py --size 512 --runs 2 --steps 2
    python bench/bench_denoiser.py --size 256 --dtype bf16   # both sides' weights in bf16 (ours: Linear weights)

`--dtype bf16`: ours stores the Linear weights in bf16 (`backend.cast_parameters`; products through the CPU bf16
GEMM, the rest fp32), PyTorch the whole model and its inputs (`model.to(torch.bfloat16)`, what a diffusers user
picks with `torch_dtype=torch.bfloat16`). Both build fp32 random weights and cast them: the peak RSS reported is
the steps' (reset after loading), the loading's apart.

Ours runs as the sampling pipeline does (`PixArt.sampler_parts`: the caption's work once per prompt, timed apart
(on CPU the caption MLP; the blocks project its tokens to keys/values in the step), then the compiled denoiser: on
CPU graph mode embedders, one graph shared by the blocks, final layer); `--entry call` times the whole forward pass
(caption work included in every call) instead, `--mode pynative` PyNative. Each run is a fresh child process (its own peak RSS), sides alternate. More sides of ours:
`ours_whole` (the whole denoiser as one graph, PIXART_BLOCKS_PER_GRAPH=0), `ours_matmul` (MindSpore's MatMul for
Linear layers instead of the AVX-512 GEMM kernel, PIXART_CPU_GEMM=matmul) and `ours_amx` (the opt-in AMX bf16x3
matmul, `PIXART_CPU_GEMM=bf16x3`, where the CPU has AMX) and `ours_bmm` (attention as BatchMatMul + softmax
instead of the one-kernel attention), e.g. `--sides ours,ours_matmul,torch`. The first call
(ours: graph compilation) is reported apart from the timed steps, with the number of graphs compiled (it must not
grow across steps).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import (machine, parse_or_run_child, reset_peak_rss, run_children, summary, table, timed,
                    torch_pixart, without_attention_kernel)

PRESET = {256: "PixArt-XL-2-256x256", 512: "PixArt-XL-2-512x512"}


def inputs(size: int, tokens: int = 120):
    n, latent = 2, size // 8
    g = np.random.default_rng(0)
    x = g.standard_normal((n, 4, latent, latent)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    y = g.standard_normal((n, tokens, 4096)).astype(np.float32)
    mask = np.ones((n, tokens), np.int32)
    mask[0, 20:] = 0  # a short negative prompt next to a full-length one
    return x, t, y, mask


def child(side: str, a) -> dict:
    x, t, y, mask = inputs(a.size)
    extra = {}
    if side.startswith("ours"):
        import os
        if side in ("ours_amx", "ours_matmul"):  # another product for Linear layers than the default (AVX-512)
            os.environ["PIXART_CPU_GEMM"] = {"ours_amx": "bf16x3", "ours_matmul": "matmul"}[side]
        if side == "ours_whole":  # the whole denoiser as one graph instead of graphs shared by runs of blocks
            os.environ["PIXART_BLOCKS_PER_GRAPH"] = "0"
        from pixart import backend, cpu  # before mindspore: sets the OpenMP wait policy
        import mindspore as ms
        from pixart.models.pixart import PixArt, preset_config
        backend.setup("CPU", a.mode, threads=a.threads or None)
        if side == "ours_bmm":
            without_attention_kernel()
        model = cpu.accelerate(backend.cast_parameters(PixArt(preset_config(PRESET[a.size], depth=a.depth)),
                                                       a.dtype))
        model.set_train(False)
        extra["load_peak_rss_gb"] = reset_peak_rss()
        x, t, y, mask = ms.Tensor(x), ms.Tensor(t), ms.Tensor(y[:, None]), ms.Tensor(mask)
        if a.entry == "sample":
            encode, denoise = model.sampler_parts()
            t0 = time.perf_counter()
            caption_kv = encode(y)
            extra["caption_first_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            caption_kv = encode(y)
            extra["caption_s"] = time.perf_counter() - t0

            def step():
                return denoise(x, t, caption_kv, mask).asnumpy()
        else:
            def step():
                return model(x, t, y, mask).asnumpy()
    else:
        import torch
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
        model = torch_pixart(a.depth, a.size, a.threads).eval().to(dt)
        extra["load_peak_rss_gb"] = reset_peak_rss()
        args = dict(hidden_states=torch.from_numpy(x).to(dt), encoder_hidden_states=torch.from_numpy(y).to(dt),
                    timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})

        def step():
            with torch.no_grad():
                return model(**args).sample.float().numpy()
    first, times = timed(step, a.steps)
    if side.startswith("ours"):
        extra["compiles_after_first"] = model.compile_count()
        step()
        extra["compiles_after_all"] = model.compile_count()
    return dict(side=side, first_s=first, times=times, **extra)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, choices=sorted(PRESET), help="image side in pixels")
    p.add_argument("--runs", type=int, default=3, help="child processes per side, alternating")
    p.add_argument("--steps", type=int, default=3, help="timed forward passes per child, after the first")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="ours: MindSpore mode")
    p.add_argument("--entry", default="sample", choices=["sample", "call"],
                   help="ours: the pipeline's (caption K/V once, then the denoiser) or model(...) (whole forward)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for both sides (0: library default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="both sides' weights (see above)")
    a = parse_or_run_child(p, child)
    if a is None:
        return
    forward = ["--size", str(a.size), "--steps", str(a.steps), "--depth", str(a.depth), "--mode", a.mode,
               "--entry", a.entry, "--threads", str(a.threads), "--dtype", a.dtype]
    sides = tuple(a.sides.split(","))
    results = run_children(__file__, sides, a.runs, forward)
    rows = [(side, summary(results[side])) for side in sides]
    title = (f"Denoiser step, PixArt-XL/2 depth {a.depth}, {a.size} px, CFG batch 2, {a.dtype} "
             f"(ours: {a.mode}, {a.entry})")
    print()
    print(table(title, rows))
    if "ours_amx" in results:
        o, f = summary(results["ours_amx"])["median"], summary(results["ours"])["median"]
        print(f"ours_amx (AMX bf16x3 matmul) / ours (AVX-512 GEMM): {o / f:.2f}x")
    for side in (s for s in sides if s.startswith("ours")):
        c = [(r["compiles_after_first"], r["compiles_after_all"]) for r in results[side]]
        print(f"graphs compiled ({side}) after the first step / after all steps: {c}")
        if a.entry == "sample":
            cap = [(round(r["caption_first_s"], 2), round(r["caption_s"], 3)) for r in results[side]]
            print(f"{side}, caption work once per prompt (first call incl. compile, second) s: {cap}")
    for side in sides:
        print(f"{side}: peak RSS while loading GiB: {[round(r['load_peak_rss_gb'], 2) for r in results[side]]}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
