"""Fused fp32 CPU kernels (fused_cpu.cc) as MindSpore `ops.Custom` AOT operators.

Built once per machine with the system C++ compiler into a cache folder (`$PIXART_KERNEL_CACHE`, default
~/.cache/pixart-mindspore), keyed by the source, the flags and the CPU, written atomically. Where there is no
compiler, the build fails, or `PIXART_FUSED_KERNELS=0`, `available()` is False and pixart/backend.py keeps its
unfused MindSpore ops, which compute the same functions.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("fused_cpu.cc")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]  # fast-math: libmvec expf
_STATE: dict = {}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def cache_dir() -> Path:
    return Path(os.environ.get("PIXART_KERNEL_CACHE", Path.home() / ".cache" / "pixart-mindspore"))


def build(compiler: str | None = None) -> Path:
    """Compile fused_cpu.cc (or reuse the cached build); returns the shared library's path. Raises on failure."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (g++ / c++ / $CXX)")
    key = hashlib.sha1("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"fused_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: concurrent processes each build, the last rename wins, all equal
    return target


def available() -> bool:
    """Whether the fused kernels can be used in this process (built once, remembered)."""
    if "ok" not in _STATE:
        _STATE["ok"] = False
        if os.environ.get("PIXART_FUSED_KERNELS", "1") != "0":
            try:
                _STATE["path"] = build()
                _STATE["ok"] = True
            except (OSError, RuntimeError) as err:
                warnings.warn(f"fused CPU kernels unavailable, using plain MindSpore ops (slower): {err}",
                              stacklevel=2)
    return _STATE["ok"]


def _same(*shapes):
    return shapes[0]


def op(name: str, out_shape=_same, out_dtype=_same):
    """The `ops.Custom` primitive running kernel `name` of the library (call only when `available()`)."""
    from mindspore import ops
    return ops.Custom(f"{_STATE['path']}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def to_heads(num_heads: int):
    """(B, S, H*d), scale (1,) -> (B, H, S, d) times scale."""
    return op("ToHeads", out_shape=lambda x, s: (x[0], num_heads, x[1], x[2] // num_heads))


def from_heads():
    """(B, H, S, d) -> (B, S, H*d)."""
    return op("FromHeads", out_shape=lambda x: (x[0], x[2], x[1] * x[3]))
