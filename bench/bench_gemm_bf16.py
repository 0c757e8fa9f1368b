"""The bf16 products of a T5-XXL encode, alone: this port's bf16 GEMM (`kernels.half_linear_product`: x fp32 (M, K)
rounded to bf16, W (N, K) stored in bf16, fp32 accumulation; pixart/cpu/kernels/gemm_cpu.cc) against PyTorch's
`F.linear` on bf16 tensors (oneDNN), on T5 v1.1 XXL's shapes at a 120- and a 300-token prompt. Each side runs in
its own child process (two libraries' thread pools in one process spin against each other), sides alternate,
`--runs` times; GFLOP/s from the median call's wall time and, as a figure that a loaded machine moves less, GFLOP
per second of the process's CPU time (median call; for PyTorch this counts its threads' spinning too).

    python bench/bench_gemm_bf16.py                  # 3 runs per side, 15 calls per shape
    python bench/bench_gemm_bf16.py --rows 120 --runs 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, parse_or_run_child, run_children, start_side  # noqa: E402

# (K, N) of T5-XXL's Linear layers: q / k / v / o, wi_0 / wi_1, wo
SHAPES = [((4096, 4096), "q, k, v, o"), ((4096, 10240), "wi_0, wi_1"), ((10240, 4096), "wo")]


def child(side: str, a) -> dict:
    """Median seconds per (rows, shape) for one side."""
    rng = np.random.default_rng(0)
    start_side(side, "pynative")
    if side == "torch":
        import torch
    else:
        import mindspore as ms
        from pixart.cpu import kernels
        if not kernels.half_weights("bf16"):
            sys.exit("this CPU lacks AVX512_BF16 (or the kernels did not build): no bf16 product to measure")
        product = kernels.half_linear_product(False)
    medians, cpu = {}, {}
    for m in a.rows:
        for (k, n), _ in SHAPES:
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
            if side == "torch":
                xt, wt = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
                fn = lambda: torch.nn.functional.linear(xt, wt)  # noqa: E731
            else:
                xm, wm = ms.Tensor(x), ms.Tensor(w).astype(ms.bfloat16)
                fn = lambda: product(xm, wm).asnumpy()  # noqa: E731
            fn(), fn()  # warm caches (and PyNative's shape inference)
            times, cpus = [], []
            for _ in range(a.calls):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            medians[f"{m}x{k}x{n}"], cpu[f"{m}x{k}x{n}"] = statistics.median(times), statistics.median(cpus)
    return dict(side=side, medians=medians, cpu=cpu, times=[sum(medians.values())])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[120, 300],
                   help="rows of x (prompt tokens), comma-separated")
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--runs", type=int, default=3)
    a = parse_or_run_child(p, child)
    if a is None:
        return
    sides = tuple(a.sides.split(","))
    results = run_children(__file__, sides, a.runs,
                           ["--calls", str(a.calls), "--rows", ",".join(map(str, a.rows))])
    print(f"\n**bf16 x bf16 -> fp32 products, {os.cpu_count()} threads: GFLOP/s of the median call over {a.runs} "
          f"runs x {a.calls} calls per side, sides alternating**\n")
    print("| M x K by N (layers) | " + " | ".join(f"{s} GFLOP/s" for s in sides) + " | ours / torch time | "
          + " | ".join(f"{s} GFLOP per CPU-s" for s in sides) + " |")
    print("|---|" + "---|" * (2 * len(sides) + 1))
    for m in a.rows:
        for (k, n), names in SHAPES:
            key, gflop = f"{m}x{k}x{n}", 2 * m * k * n / 1e9
            med = {s: statistics.median(r["medians"][key] for r in results[s]) for s in sides}
            cpu = {s: statistics.median(r["cpu"][key] for r in results[s]) for s in sides}
            ratio = med["ours"] / med["torch"] if {"ours", "torch"} <= set(sides) else float("nan")
            print(f"| {m} x {k} by {n} ({names}) | " + " | ".join(f"{gflop / med[s]:.0f}" for s in sides)
                  + f" | {ratio:.2f}x | " + " | ".join(f"{gflop / cpu[s]:.0f}" for s in sides) + " |")
    load = max(r["load_before"] for rs in results.values() for r in rs)
    print(f"\nmax 1-minute load before a run: {load:.1f} on {os.cpu_count()} cores")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
