"""CPU kernels as MindSpore `ops.Custom` AOT operators: fused fp32 kernels (fused_cpu.cc), a strict fp32 GEMM and
attention on AVX-512 with the products of Linear layers whose weights are stored in bf16 (vdpbf16ps, on CPUs with
AVX512_BF16) or fp16 (widened per panel) (gemm_cpu.cc) and, on CPUs with Intel AMX, the fp32 matmul as three bf16
tile products (amx_gemm.cc); softmax.h and gelu.h are shared by the first two. convert.cc (called through ctypes,
not an operator) converts fp16 / fp32 weights to bf16 as they load.

Each library is built once per machine with the system C++ compiler into a cache folder (`$PIXART_KERNEL_CACHE`,
default ~/.cache/pixart-mindspore), keyed by the source, the headers beside it, the flags and the CPU, written
atomically. Where there is no compiler, the build fails, or `PIXART_FUSED_KERNELS=0`, `available()` is False and
`pixart.cpu.accelerate` leaves the layers of `pixart.nn` on their plain MindSpore ops, which compute the same
functions. `cpu_gemm()` says which product
Linear layers use, chosen by `PIXART_CPU_GEMM`: "auto" (default) = the AVX-512 GEMM where the CPU has AVX-512, else
MindSpore's MatMul; "matmul" = MindSpore's MatMul; "bf16x3" = the AMX kernel where the CPU has AMX (opt-in: it was
not reliably faster per step; measurements: docs/benchmarks.md, 'Design measurements'), else as "auto".

Primitives are cached by MindSpore per kernel name and input shapes and dtypes (PyNative infers an output shape
once per such key): everything else an output depends on (the head count of `to_heads`) is a primitive attribute,
so that it is part of the key.
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
GEMM_SOURCE = Path(__file__).with_name("gemm_cpu.cc")
CONVERT_SOURCE = Path(__file__).with_name("convert.cc")
GEMMS = ("auto", "matmul", "bf16x3")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]  # fast-math: libmvec expf
# Linking with -ffast-math adds crtfastmath.o: loading the library turns on flush-to-zero for the process. The kernels
# rely on it (without it a training step's gradients can turn NaN on subnormal intermediates), so it stays until they
# set and restore it around their own work.
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
    """Compile `source` (or reuse the cached build); returns the shared library's path. Raises on failure.
    convert.cc is built without -ffast-math (its header comment says why)."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (g++ / c++ / $CXX)")
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what the sources include (softmax.h, ...)
    flags = [f for f in FLAGS if not (source == CONVERT_SOURCE and f == "-ffast-math")]
    parts = [source.read_text(), *headers, compiler, *flags, _cpu_id()]
    key = hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
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


def _library(source: Path, probe: str, instead: str = "MindSpore's fp32 MatMul") -> Path | None:
    """The built library of `source` when its `probe()` returns 1 (the CPU has what it needs), else None (with a
    warning that names what is used `instead` where the build fails)."""
    try:
        path = build(source=source)
        return path if getattr(ctypes.CDLL(str(path)), probe)() == 1 else None
    except (OSError, RuntimeError) as err:
        warnings.warn(f"{source.name} unavailable, using {instead}: {err}", stacklevel=3)
        return None


def cpu_gemm() -> str:
    """The product Linear layers use on CPU in this process: "avx512" (gemm_cpu.cc, strict fp32), "bf16x3" (AMX,
    ~5e-6 relative) or "matmul" (MindSpore's MatMul). Needs the fused kernels (`available()`); see PIXART_CPU_GEMM
    in the module docstring."""
    if "gemm" not in _STATE:
        choice = os.environ.get("PIXART_CPU_GEMM", "auto")
        if choice not in GEMMS:
            raise ValueError(f"PIXART_CPU_GEMM must be one of {', '.join(GEMMS)}; got {choice!r}")
        _STATE["gemm"] = "matmul"
        if choice != "matmul" and available():
            if choice == "bf16x3" and "amx_bf16" in _cpu_id():
                _STATE["amx_path"] = _library(AMX_SOURCE, "AmxAvailable")  # 1 once the kernel granted the tiles
            _STATE["gemm"] = "bf16x3" if _STATE.get("amx_path") else "avx512" if _avx512() else "matmul"
    return _STATE["gemm"]


def _avx512() -> Path | None:
    """The AVX-512 GEMM library, where the CPU has AVX-512 and it builds (remembered)."""
    if "gemm_path" not in _STATE:
        _STATE["gemm_path"] = _library(GEMM_SOURCE, "GemmAvailable") if "avx512f" in _cpu_id() else None
    return _STATE["gemm_path"]


def half_weights(dtype_name: str) -> bool:
    """Whether Linear weights stored in `dtype_name` ('bf16' / 'fp16') have a product here (`half_linear_product`):
    the AVX-512 library built, and for bf16 built with AVX512_BF16 (remembered)."""
    if not available() or not _avx512():
        return False
    if dtype_name == "fp16":
        return True
    if "bf16_ok" not in _STATE:
        _STATE["bf16_ok"] = ctypes.CDLL(str(_STATE["gemm_path"])).GemmBf16Available() == 1
    return dtype_name == "bf16" and _STATE["bf16_ok"]


def to_bf16(arr):
    """`arr` (fp16 / fp32 numpy) as a new array of MindSpore's numpy bfloat16, rounded to nearest even, by
    convert.cc (all threads, at memory speed; MindSpore's own cast of T5-XXL's weights takes ~16 s on one thread);
    None where the CPU lacks AVX-512 or the library does not build (the caller then casts with MindSpore)."""
    import numpy as np
    from mindspore.common.np_dtype import bfloat16
    if arr.dtype not in (np.float16, np.float32) or os.environ.get("PIXART_FUSED_KERNELS", "1") == "0":
        return None
    if "convert" not in _STATE:
        path = _library(CONVERT_SOURCE, "ConvertAvailable", "MindSpore's cast") if "avx512f" in _cpu_id() else None
        _STATE["convert"] = ctypes.CDLL(str(path)).ToBf16 if path else None
        if _STATE["convert"] is not None:
            _STATE["convert"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    if _STATE["convert"] is None:
        return None
    src = np.ascontiguousarray(arr)
    out = np.empty(src.shape, np.uint16)
    if _STATE["convert"](src.ctypes.data, 8 * src.dtype.itemsize, out.ctypes.data, src.size):
        return None
    return out.view(bfloat16)


def half_linear_product(bias: bool = False):
    """Inference product of a Linear layer whose weight is stored in bf16 or fp16: x (M, K) fp32, W (N, K) bf16 /
    fp16 [, b (N) fp32 when `bias`] -> x W^T [+ b] (M, N) fp32, accumulated in fp32 (bf16: x rounded to bf16, as
    a bf16 model's activations are; fp16: W widened to fp32). Call only where `half_weights()` says so."""
    half_weights("fp16")  # builds the library
    return op("LinearXWtHalfBias" if bias else "LinearXWtHalf", out_shape=lambda x, w, *b: (x[0], w[0]),
              out_dtype=lambda x, *rest: x, library="gemm_path")


def mlp_half():
    """Inference Mlp with bf16 weights: x (M, C) fp32, W1 (H, C) bf16, b1 (H) fp32, W2 (O, H) bf16, b2 (O) fp32 ->
    gelu_tanh(x W1^T + b1) W2^T + b2 (M, O) fp32, the hidden layer a block of rows at a time. Call only where
    `half_weights("bf16")` says so."""
    return op("MlpHalf", out_shape=lambda x, w1, b1, w2, b2: (x[0], w2[0]), out_dtype=lambda x, *rest: x,
              library="gemm_path")


def gather_rows_half():
    """Lookup in a table stored in bf16 or fp16: table (V, D), ids (...) int32/int64 -> rows (..., D) fp32 (an
    embedding in half precision; MindSpore's CPU Gather has no bf16). Call only where `half_weights()` says so."""
    half_weights("fp16")  # builds the library
    return op("GatherRowsHalf", out_shape=lambda table, ids: (*ids, table[1]), out_dtype=lambda *_: _float32(),
              library="gemm_path")


def _float32():
    import mindspore as ms
    return ms.float32


def _same(*shapes):
    return shapes[0]


def op(name: str, out_shape=_same, out_dtype=_same, library: str = "path", bprop=None, **attrs):
    """The `ops.Custom` primitive running kernel `name` of the fused library (call only when `available()`), or of
    the GEMM libraries with library="gemm_path" / "amx_path" (only as `cpu_gemm()` says); `bprop(*inputs, out,
    dout)` gives it a gradient. `attrs`: whatever else than the inputs' shapes and dtypes `out_shape` depends on,
    kept as primitive attributes (MindSpore's caches of Custom operators are keyed on them)."""
    from mindspore import ops
    prim = ops.Custom(f"{_STATE[library]}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                      bprop=bprop)
    for key, value in attrs.items():
        prim.add_prim_attr(key, value)
    return prim


def linear_product(strict: bool = False, bias: bool = False):
    """(primitive, has_gradient) for Linear's product on CPU, or (None, False) where Linear keeps MindSpore's MatMul.
    The primitive maps x (M, K), W (N, K) [, b (N) when `bias`] to x W^T [+ b] (M, N) with `cpu_gemm()`'s kernel;
    `strict` refuses the bf16x3 product (then the AVX-512 one, when it builds). The AVX-512 product has a gradient
    from the same kernel: dx = dy W, dW = dy^T x, db = the sum of dy over rows; the bf16x3 one has none."""
    gemm = cpu_gemm()
    if gemm == "bf16x3" and strict:
        gemm = "avx512" if _avx512() else "matmul"
    shape = lambda x, w, *b: (x[0], w[0])  # noqa: E731
    if gemm == "matmul":
        return None, False
    if gemm == "bf16x3":
        return op("LinearBf16x3", out_shape=shape, library="amx_path"), False
    x_w = op("MatMulXW", out_shape=lambda a, b: (a[0], b[1]), library="gemm_path")
    xt_w = op("MatMulXtW", out_shape=lambda a, b: (a[1], b[1]), library="gemm_path")
    if bias:
        def bprop(x, w, b, out, dout):
            return x_w(dout, w), xt_w(dout, x), dout.sum(0)
    else:
        def bprop(x, w, out, dout):
            return x_w(dout, w), xt_w(dout, x)
    # two kernel names: MindSpore treats Custom primitives of one name as one operator with one gradient function
    return op("LinearXWtBias" if bias else "LinearXWt", out_shape=shape, library="gemm_path", bprop=bprop), True


def attention(masked: bool):
    """Attention from the AVX-512 library, or None where it is not built: heads-first q (B, H, Nq, d) (already
    scaled), k (B, H, Nk, d), v (B, H, Nk, dv) [, keep (B, Nk)] -> softmax(q k^T) v (B, H, Nq, dv), a block of
    queries at a time (only a block's scores are ever live). Its gradient (AttendGrad) recomputes the probabilities
    from q and k, one (sample, head) at a time, rather than keeping them from the forward pass."""
    if not available() or not _avx512():
        return None
    shape = lambda q, k, v, *keep: (q[0], q[1], q[2], v[3])  # noqa: E731
    grads = lambda q, k, v, *rest: (q, k, v)  # noqa: E731
    grad = op("AttendMaskedGrad" if masked else "AttendGrad", out_shape=grads, out_dtype=grads, library="gemm_path")
    if masked:
        def bprop(q, k, v, keep, out, dout):
            dq, dk, dv = grad(q, k, v, keep, out, dout)
            return dq, dk, dv, keep * 0
    else:
        def bprop(q, k, v, out, dout):
            return grad(q, k, v, out, dout)
    return op("AttendMasked" if masked else "Attend", out_shape=shape, library="gemm_path", bprop=bprop)


def token_attention():
    """(self-attention, cross-attention, masked cross-attention) primitives from the AVX-512 library on token-major
    operands, inference only (no gradient), or None where it is not built: qkv (B, N, 3C), scale_heads [scale, H]
    -> (B, N, C); q (B, Nq, C), kv (B, Nk, 2C) [, keep (B, Nk)], scale_heads -> (B, Nq, C). Each head's softmax(scale
    q k^T) v read from the projections in place, a block of queries at a time."""
    if not available() or not _avx512():
        return None
    return (op("AttendQKV", out_shape=lambda qkv, sh: (qkv[0], qkv[1], qkv[2] // 3), library="gemm_path"),
            op("AttendKV", out_shape=lambda q, kv, sh: q, library="gemm_path"),
            op("AttendKVMasked", out_shape=lambda q, kv, keep, sh: q, library="gemm_path"))


def t5_attention():
    """T5's attention from the AVX-512 library (inference), or None where it is not built: q, k (B, N, H*d), v (B, N,
    H*dv) as the Linear layers give them, bias (1 or B, H, N, N) (position bias, padding folded in) -> per head
    softmax(q k^T + bias) v as (B, N, H*dv), without the head transposes or the (B, H, N, N) scores."""
    if not available() or not _avx512():
        return None
    return op("AttendBias", out_shape=lambda q, k, v, b: (q[0], q[1], v[2]), library="gemm_path")


def gelu_tanh_mul():
    """Inference: a, b of one shape -> gelu_tanh(a) * b (T5 v1.1's gated feed-forward) in one pass."""
    return op("GeluTanhMul", out_shape=lambda a, b: a, out_dtype=lambda a, b: a)


def bias_gelu_tanh():
    """x (..., C), b (C) -> gelu_tanh(x + b), with its gradient (BiasGeluTanhGrad; b's is summed over rows)."""
    grad = op("BiasGeluTanhGrad", out_shape=lambda x, b, dy: x)

    def bprop(x, b, out, dout):
        dx = grad(x, b, dout)
        return dx, dx.reshape(-1, dx.shape[-1]).sum(0)
    return op("BiasGeluTanh", bprop=bprop)


def rms_norm():
    """T5's RMS norm, inference: x (..., D), w (D), eps (1,) -> w * x / sqrt(mean(x^2) + eps), fp32."""
    return op("RmsNorm", out_shape=lambda x, w, e: x, out_dtype=lambda x, w, e: x)


def layer_norm_modulate():
    """x (N, T, D), shift, scale (N*D elements), eps (1,) -> LayerNorm(x) * (1 + scale) + shift, with its gradient
    (LayerNormModulateGrad: dx, dshift, dscale in one kernel)."""
    grad = op("LayerNormModulateGrad", out_shape=lambda x, sh, sc, e, dy: (x, sh, sc),
              out_dtype=lambda x, sh, sc, e, dy: (x, sh, sc))

    def bprop(x, shift, scale, eps, out, dout):
        dx, dshift, dscale = grad(x, shift, scale, eps, dout)
        return dx, dshift, dscale, eps * 0
    return op("LayerNormModulate", bprop=bprop)


def gated_residual():
    """x, y (N, T, D), gate (N*D elements) -> x + gate * y, with its gradient (GatedResidualGrad: dgate, dy)."""
    grad = op("GatedResidualGrad", out_shape=lambda g, y, d: (g, y), out_dtype=lambda g, y, d: (g, y))

    def bprop(x, gate, y, out, dout):
        dgate, dy = grad(gate, y, dout)
        return dout, dgate, dy
    return op("GatedResidual", bprop=bprop)


def softmax(masked: bool):
    """Softmax over the last axis of (B, H, Nq, Nk) scores [, keys kept where keep (B, Nk) is not 0], with its
    gradient (SoftmaxGrad, from the probabilities)."""
    grad = op("SoftmaxGrad")
    if masked:
        def bprop(x, keep, out, dout):
            return grad(out, dout), keep * 0
        return op("MaskedSoftmax", bprop=bprop)

    def bprop_plain(x, out, dout):
        return (grad(out, dout),)
    return op("Softmax", bprop=bprop_plain)


def to_heads(num_heads: int):
    """(B, S, H*d), scale (1,) -> (B, H, S, d) times scale; its gradient is FromHeadsScaled."""
    back = op("FromHeadsScaled", out_shape=lambda x, s: (x[0], x[2], x[1] * x[3]))

    def bprop(x, scale, out, dout):
        return back(dout, scale), scale * 0
    return op("ToHeads", out_shape=lambda x, s: (x[0], num_heads, x[1], x[2] // num_heads), bprop=bprop,
              num_heads=num_heads)


def patch_embed():
    """Inference: latents (N, C, H, W), the patch convolution's weight (D, C, p, p) and bias (D), position embedding
    (T, D) fp32 -> tokens (N, T, D) = conv(x) + bias + pos (no gradient)."""
    return op("PatchEmbed", out_shape=lambda x, w, b, pos: (x[0], pos[0], w[0]), out_dtype=lambda x, *rest: x)


def from_heads():
    """(B, H, S, d) -> (B, S, H*d); its gradient is ToHeadsAs (heads first, shaped as the input)."""
    import numpy as np
    from mindspore import Tensor
    forth = op("ToHeadsAs", out_shape=lambda x, like, s: like, out_dtype=lambda x, like, s: x)
    one = Tensor(np.ones(1, np.float32))

    def bprop(x, out, dout):
        return (forth(dout, x, one),)
    return op("FromHeads", out_shape=lambda x: (x[0], x[2], x[1] * x[3]), bprop=bprop)
