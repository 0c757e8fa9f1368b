"""Training step: ours (MindSpore graph mode: `pixart.training.step.TrainStep` = IDDPM loss, value_and_grad, AdamW)
vs diffusers' PixArtTransformer2DModel + torch.optim.AdamW (PyTorch), 256 px, batch 2, fp32, random weights, both in
one process tree.

    python bench/bench_train.py --depth 28 --runs 2 --steps 3
    python bench/bench_train.py --depth 28 --sides ours,ours_blocks,torch  # + ours as train.py --recompute runs it
    python bench/bench_train.py --depth 28 --sides ours,ours_matmul,torch  # + ours with MindSpore's MatMul
    python bench/bench_train.py --depth 28 --sides ours,ours_bmm,torch     # + ours with attention as BatchMatMuls
    python bench/bench_train.py --depth 8                         # a cheaper look

A step is forward, loss (ours: MSE + the learned-variance bound, as train.py; PyTorch: the same MSE plus a squared
term on the variance channels, whose cost is negligible next to the transformer), backward, the gradients clipped to
a global norm of --clip_grad (0.01, as train.py and the official PixArt configs' `gradient_clip`; PyTorch:
`torch.nn.utils.clip_grad_norm_`, as the official train.py; 0: neither side clips, ours still computes the norm it
logs) and one AdamW update.
A watchdog ends a child whose resident memory passes --max_rss_gb (reported as such, not as a time), so a side
that does not fit cannot take the machine down.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

from common import (emit, machine, parse_or_run_child, peak_rss_gb, run_children, summary, table, timed,
                    torch_pixart, without_attention_kernel)


def watchdog(limit_gb: float) -> None:
    def watch():
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024 ** 3
            if rss > limit_gb:
                emit(dict(side="?", exceeded_gb=limit_gb, times=[float("nan")], first_s=float("nan"),
                          peak_rss_gb=rss))
                os._exit(0)
            time.sleep(0.1)
    threading.Thread(target=watch, daemon=True).start()


def batch(size: int, n: int = 2, tokens: int = 120):
    g = np.random.default_rng(0)
    latent = size // 8
    return dict(x0=g.standard_normal((n, 4, latent, latent)).astype(np.float32),
                t=np.array([100, 700], np.int32)[:n],
                noise=g.standard_normal((n, 4, latent, latent)).astype(np.float32),
                y=g.standard_normal((n, 1, tokens, 4096)).astype(np.float32),
                mask=np.ones((n, tokens), np.int32),
                img_hw=np.full((n, 2), size, np.float32), aspect_ratio=np.ones((n, 1), np.float32),
                drop=np.zeros((n,), np.int32))


def child(side: str, a) -> dict:
    watchdog(a.max_rss_gb)
    b = batch(a.size)
    if side.startswith("ours"):
        if side == "ours_matmul":  # MindSpore's MatMul for Linear layers instead of the AVX-512 GEMM kernel
            os.environ["PIXART_CPU_GEMM"] = "matmul"
        from pixart import backend, cpu  # before mindspore: sets the OpenMP wait policy
        import mindspore as ms
        from mindspore import Tensor
        from pixart.diffusion.loss import DiffusionLoss
        from pixart.models.pixart import PixArt, preset_config
        from pixart.training.optimizers import build_optimizer
        from pixart.training.step import TrainStep
        from pixart.cpu.blockwise import BlockwiseTrainStep
        backend.setup("CPU", a.mode, threads=a.threads or None)
        if side == "ours_bmm":
            without_attention_kernel()
        model = cpu.accelerate(PixArt(preset_config("PixArt-XL-2-256x256", depth=a.depth)))
        # ours_blocks: train.py --recompute on CPU graph mode, backpropagation block by block from the host
        host_recompute = (side == "ours_blocks" or a.recompute) and cpu.host_driven_recompute()
        if a.recompute and not host_recompute:
            for block in model.blocks:
                block.recompute()
        optimizer = build_optimizer("adamw", model.trainable_params(), 2e-5, None, None, None)
        step_cell = cpu.accelerate_step(TrainStep(DiffusionLoss(model), optimizer, clip_grad=a.clip_grad))
        step_cell.set_train(True)
        if host_recompute:
            step_cell = BlockwiseTrainStep(step_cell)
        inputs = [Tensor(b[k]) for k in ("x0", "t", "noise", "y", "mask", "img_hw", "aspect_ratio", "drop")]
        lr = Tensor(2e-5, ms.float32)

        def step():
            return step_cell(*inputs, lr)[0].asnumpy()
    else:
        import torch
        model = torch_pixart(a.depth, a.size, a.threads).train()
        if a.recompute:
            model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10)
        ac = torch.linspace(0.9999, 0.01, 1000)
        x0, noise = torch.from_numpy(b["x0"]), torch.from_numpy(b["noise"])
        t = torch.from_numpy(b["t"]).long()
        x_t = ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
        y, mask = torch.from_numpy(b["y"][:, 0]), torch.from_numpy(b["mask"].astype(np.int64))

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(x_t, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            loss = ((out[:, :4] - noise) ** 2).mean() + 1e-3 * (out[:, 4:] ** 2).mean()
            loss.backward()
            if a.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad)
            opt.step()
            return loss.item()
    first, times = timed(step, a.steps)
    return dict(side=side, first_s=first, times=times, peak_rss_gb=peak_rss_gb())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child, after the first")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="ours: MindSpore mode")
    p.add_argument("--recompute", action="store_true",
                   help="both sides: recompute each block in backward (ours in graph mode: block by block)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clip_grad", type=float, default=0.01, help="both sides: global gradient-norm clip (0: off)")
    p.add_argument("--max_rss_gb", type=float, default=20.0, help="a child above this is stopped")
    a = parse_or_run_child(p, child)
    if a is None:
        return
    forward = ["--size", str(a.size), "--depth", str(a.depth), "--steps", str(a.steps), "--mode", a.mode,
               "--threads", str(a.threads), "--clip_grad", str(a.clip_grad), "--max_rss_gb", str(a.max_rss_gb)]
    forward += ["--recompute"] if a.recompute else []
    sides = tuple(a.sides.split(","))
    results = run_children(__file__, sides, a.runs, forward)
    over = [s for s in sides if any("exceeded_gb" in r for r in results[s])]
    rows = [(side, summary(results[side])) for side in sides]
    print()
    print(table(f"Training step, PixArt-XL/2 depth {a.depth}, {a.size} px, batch 2, fp32, AdamW"
                f"{', recompute' if a.recompute else ''}, clip {a.clip_grad or 'off'} (ours: {a.mode})", rows))
    for side in over:
        print(f"{side}: stopped above {a.max_rss_gb} GiB resident (does not fit)")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
