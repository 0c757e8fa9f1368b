"""The matmuls of a PixArt-XL/2 step (256 px, CFG batch 2: 512 tokens x 1152 wide) three ways: PyTorch's F.linear
(MKL, fp32), MindSpore's MatMul (graph mode, fp32) and this port's Linear on CPU (graph mode: the AVX-512 GEMM kernel
pixart/cpu/kernels/gemm_cpu.cc by default, the AMX bf16x3 kernel with PIXART_CPU_GEMM=bf16x3); plus the machine's fp32
FMA peak (bench/fma_peak.c, compiled here) and what it means for a whole step. Each side runs in its own child process (thread pools of different libraries in one process
spin against each other), sides alternate, `--runs` times.

    python bench/bench_matmul.py               # 3 runs per side, 20 calls per shape
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, parse_or_run_child, run_children, start_side  # noqa: E402

# (M, K, N) of one block's Linear layers at 256 px, with how often each runs per block
SHAPES = [((512, 1152, 3456), 1, "attn.qkv"), ((512, 1152, 1152), 3, "attn.proj, cross_attn.q_linear / proj"),
          ((512, 1152, 4608), 1, "mlp.fc1"), ((512, 4608, 1152), 1, "mlp.fc2")]
STEP_GFLOP = 557  # one 256 px step, caption K/V once per prompt: 28 blocks x ~19.9 GFLOP (Linear + attention)


def fma_peak(threads: int) -> float:
    source = Path(__file__).with_name("fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", str(source), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True,
                             capture_output=True, text=True).stdout
    return float(out.split()[0])


def child(side: str, a) -> dict:
    """Median seconds per shape for one side."""
    rng = np.random.default_rng(0)
    start_side(side, "graph")
    if side == "torch":
        import torch
    else:
        from pixart import cpu, nn
        import mindspore as ms
        from pixart.cpu import kernels

        class Plain(ms.nn.Cell):
            def __init__(self, w):
                super().__init__()
                self.w, self.mm = ms.Parameter(ms.Tensor(w)), ms.ops.MatMul(transpose_b=True)

            def construct(self, x):
                return self.mm(x, self.w)
    medians = []
    for (m, k, n), _, _ in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        if side == "torch":
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            fn = lambda: torch.nn.functional.linear(xt, wt)  # noqa: E731
        elif side == "mindspore":
            plain, xm = Plain(w), ms.Tensor(x)
            fn = lambda: plain(xm).asnumpy()  # noqa: E731
        else:
            ours, xm = cpu.accelerate(nn.Linear(k, n, bias=False)), ms.Tensor(x)
            ours.weight.set_data(ms.Tensor(w))
            ours.set_train(False)
            fn = lambda: ours(xm).asnumpy()  # noqa: E731
        fn(), fn()  # graph compilation, warm caches
        times = []
        for _ in range(a.calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(float(np.median(times)))
    result = dict(side=side, medians=medians, times=[sum(medians)])
    if side == "ours":
        result["gemm"] = kernels.cpu_gemm()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    a = parse_or_run_child(p, child)
    if a is None:
        return
    sides = ("ours", "mindspore", "torch")
    results = run_children(__file__, sides, a.runs, ["--calls", str(a.calls)])
    med = {s: [float(np.median([r["medians"][i] for r in results[s]])) for i in range(len(SHAPES))] for s in sides}
    gemm = results["ours"][0].get("gemm")
    threads = os.cpu_count() or 1
    peaks = {t: fma_peak(t) for t in sorted({1, threads})}
    print(f"\n**Step matmuls, fp32 in and out, {threads} threads (median over {a.runs} runs x {a.calls} calls per "
          f"side); ours = Linear with PIXART_CPU_GEMM's choice: {gemm}**\n")
    print("| (M, K, N) | layers | torch GFLOP/s | MindSpore MatMul GFLOP/s | ours GFLOP/s | ours / torch time |")
    print("|---|---|---|---|---|---|")
    for i, ((m, k, n), _, names) in enumerate(SHAPES):
        gflop = 2 * m * k * n / 1e9
        r = [gflop / med[s][i] for s in ("torch", "mindspore", "ours")]
        ratio = med["ours"][i] / med["torch"][i]
        print(f"| {(m, k, n)} | {names} | {r[0]:.0f} | {r[1]:.0f} | {r[2]:.0f} | {ratio:.2f}x |")
    block = {s: sum(count * med[s][i] for i, (_, count, _) in enumerate(SHAPES)) for s in sides}
    print("\none block's Linear layers, s: " + ", ".join(f"{s} {v:.4f}" for s, v in block.items())
          + f"; ours / torch {block['ours'] / block['torch']:.2f}x, ours / MindSpore MatMul "
          f"{block['ours'] / block['mindspore']:.2f}x")
    print("fp32 FMA peak (bench/fma_peak.c): " + ", ".join(f"{t} thread(s) {v:.0f} GFLOP/s" for t, v in peaks.items()))
    print(f"a 256 px step is ~{STEP_GFLOP} GFLOP: at the fp32 FMA peak it takes >= {STEP_GFLOP / peaks[threads]:.2f} s")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
