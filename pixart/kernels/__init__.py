"""CPU kernels as MindSpore `ops.Custom` AOT operators: fused fp32 kernels (fused_cpu.cc) and, on CPUs with Intel
AMX, the fp32 matmul as three bf16 tile products (amx_gemm.cc).

Each library is built once per machine with the system C++ compiler into a cache folder (`$PIXART_KERNEL_CACHE`,
default ~/.cache/pixart-mindspore), keyed by the source, the flags and the CPU, written atomically. Where there is no
compiler, the build fails, or `PIXART_FUSED_KERNELS=0`, `available()` is False and pixart/backend.py keeps its
unfused MindSpore ops, which compute the same functions. `amx_gemm()` says whether Linear layers use the AMX
matmul: opt-in with `PIXART_CPU_GEMM=bf16x3`, where the CPU has AMX and the kernel grants the tile state (default:
strict fp32 MindSpore MatMul; on the 2-core VM measured, the AMX kernel was 1.3x faster per step in one A/B and 1.12x
slower in another, see docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("fused_cpu.cc")
AMX_SOURCE = Path(__file__).with_name("amx_gemm.cc")
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


def build(compiler: str | None = None, source: Path = SOURCE) -> Path:
    """Compile `source` (or reuse the cached build); returns the shared library's path. Raises on failure."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (g++ / c++ / $CXX)")
    key = hashlib.sha1("\0".join([source.read_text(), compiler, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(source), "-o", str(out)], capture_output=True, text=True)
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


def amx_gemm() -> bool:
    """Whether Linear layers use the AMX bf16x3 matmul in this process (PIXART_CPU_GEMM=bf16x3, AMX, fused kernels)."""
    if "amx" not in _STATE:
        _STATE["amx"] = False
        gemm = os.environ.get("PIXART_CPU_GEMM", "fp32")
        if gemm not in ("fp32", "bf16x3"):
            raise ValueError(f"PIXART_CPU_GEMM must be 'fp32' or 'bf16x3', got {gemm!r}")
        if gemm == "bf16x3" and available() and "amx_bf16" in _cpu_id():
            try:
                path = build(source=AMX_SOURCE)
                if ctypes.CDLL(str(path)).AmxAvailable() == 1:  # the kernel granted this process the tile state
                    _STATE["amx_path"], _STATE["amx"] = path, True
            except (OSError, RuntimeError) as err:
                warnings.warn(f"AMX matmul unavailable, using MindSpore's fp32 MatMul: {err}", stacklevel=2)
    return _STATE["amx"]


def _same(*shapes):
    return shapes[0]


def op(name: str, out_shape=_same, out_dtype=_same, library: str = "path"):
    """The `ops.Custom` primitive running kernel `name` of the fused library (call only when `available()`), or of
    the AMX one with library="amx_path" (only when `amx_gemm()`)."""
    from mindspore import ops
    return ops.Custom(f"{_STATE[library]}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def linear_bf16x3():
    """x (M, K), W (N, K) [, b (N)] -> x W^T [+ b] (M, N) on AMX tiles."""
    return op("LinearBf16x3", out_shape=lambda x, w, *b: (x[0], w[0]), library="amx_path")


def to_heads(num_heads: int):
    """(B, S, H*d), scale (1,) -> (B, H, S, d) times scale."""
    return op("ToHeads", out_shape=lambda x, s: (x[0], num_heads, x[1], x[2] // num_heads))


def from_heads():
    """(B, H, S, d) -> (B, S, H*d)."""
    return op("FromHeads", out_shape=lambda x: (x[0], x[2], x[1] * x[3]))
