"""The self-check's data-parallel part: the training check's step on two ranks under `msrun --worker_num=2`, each
rank on its half of the batch, gradients all-reduced as train.py does; the result must equal the one-process step
(the same stored reference).

    python -m pixart.selfcheck.parallel --device_target CPU --dtype fp32 --mode pynative --out DIR   (per rank)
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_under_msrun(device_target: str, dtype: str, mode: str, timeout: float = 600) -> dict:
    """Launch the two ranks and return rank 0's outputs; a failed launch raises RuntimeError with the log's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # msrun starts `python` from PATH: this interpreter's; its workers import this checkout's pixart
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
               f"--log_dir={tmp / 'logs'}", "--join=True", str(Path(__file__).resolve()),
               "--device_target", device_target, "--dtype", dtype, "--mode", mode, "--out", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        result = tmp / "rank0.npz"
        if proc.returncode != 0 or not result.exists():
            logs = "".join(p.read_text()[-1500:] for p in sorted((tmp / "logs").glob("worker_*.log")))
            raise RuntimeError(f"msrun exited {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]} {logs}")
        with np.load(result) as f:
            return {k: f[k] for k in f.files}


def worker(argv=None) -> None:
    """One rank: the training check's step with this rank's half of the batch, all-reduced over the two ranks."""
    p = argparse.ArgumentParser()
    p.add_argument("--device_target", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from pixart import backend
    from pixart.selfcheck.checks import train_step
    from pixart.training import distributed
    backend.setup(args.device_target, args.mode)
    ctx = distributed.init(True)
    out = train_step(args.dtype, False, ctx)
    np.savez(Path(args.out) / f"rank{ctx.rank}.npz", **out)


if __name__ == "__main__":
    worker()
