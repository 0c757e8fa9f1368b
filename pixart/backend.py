"""The one place that picks kernels per device.

MindSpore's CPU backend lacks many `mint` kernels (LayerNorm, Conv2d, GELU, Embedding, flash attention) and any
bf16 compute; Ascend has all of them and is fastest with them. Every layer below decides at construction time
which kernel it uses, from the device MindSpore is set to, so model code never branches on the device and a
graph-mode compile sees a single path.

Call `setup()` (scripts do) before building models; tests may call it again to switch modes.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import HeUniform, Normal, Uniform, initializer

from pixart import kernels

_STATE = {"flash_attention": None}  # None: on where the device has it (Ascend)

DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def device_target() -> str:
    return ms.get_context("device_target")


def on_ascend() -> bool:
    return device_target() == "Ascend"


def setup(device_target: str = "CPU", mode: str = "pynative", jit_level: str = "O1",
          flash_attention: bool | None = None, threads: int | None = None) -> None:
    """Select device and execution mode once per process. `mode` is "pynative" or "graph"."""
    if mode not in ("pynative", "graph"):
        raise ValueError(f"mode must be 'pynative' or 'graph', got {mode!r}")
    if device_target not in ("CPU", "GPU", "Ascend"):
        raise ValueError(f"device_target must be CPU, GPU or Ascend, got {device_target!r}")
    ms.set_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if device_target == "CPU":
        # PyNative's asynchronous launch pipeline keeps a thread busy beside the kernels' own threads: on 2 cores a
        # PixArt depth-8 forward took 2.2 s async vs 1.15 s with launches blocking (graph mode: no difference)
        ms.runtime.launch_blocking()
    if mode == "graph":
        ms.set_context(jit_config={"jit_level": jit_level})
    if threads:
        ms.set_context(runtime_num_threads=threads)
    configure(flash_attention=flash_attention)


@contextmanager
def eager():
    """Run the body in PyNative mode, then restore the mode. For a model run once per input and freed afterwards
    (T5 in `sample.py`): a Cell run in graph mode keeps its Parameters alive after the Cell is deleted (MindSpore
    2.7.1: its compiled graph holds them; measured, a 1.5 GB T5 stayed resident after `del`, `gc.collect()` and
    `ms.ms_memory_recycle()`), so releasing it would free nothing. Eager, T5 ran ~1.1x its graph-mode time per prompt
    (8 layers, 120 tokens: 2.6 vs 2.3 s) and compiles nothing."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


def configure(flash_attention: bool | None = None) -> None:
    """Ask for flash attention (only Ascend has the kernel; asking for it elsewhere is an error)."""
    if flash_attention and not on_ascend():
        raise ValueError(f"flash attention needs an Ascend device; this process runs on {device_target()}")
    _STATE["flash_attention"] = flash_attention


def host_driven_recompute() -> bool:
    """Whether training's per-block recompute runs block by block from the host (`pixart.training.blockwise`)
    rather than as `Cell.recompute()` inside one graph: on MindSpore's CPU backend in graph mode, whose runtime keeps
    every activation of a graph alive (measured: recompute inside the graph lowered nothing)."""
    return device_target() == "CPU" and ms.get_context("mode") == ms.GRAPH_MODE


def blocks_per_graph(depth: int) -> int | None:
    """How many PixArt blocks sampling compiles into one graph (`shared_graphs.GroupedDenoiser`), or None: the whole
    denoiser as one graph. On MindSpore's CPU backend in graph mode, 4 (`PIXART_BLOCKS_PER_GRAPH` overrides, 0 = all):
    its runtime keeps a graph's intermediates until the graph ends and compiles each block of a graph anew (depth 28,
    256 px, measured: one graph 3.36 GiB peak, ~16 s to compile; 4 blocks per graph 2.90 GiB, ~4 s, the same step
    time; 1 block per graph ~1.3x slower). Elsewhere (Ascend, PyNative) None."""
    if device_target() != "CPU" or ms.get_context("mode") != ms.GRAPH_MODE:
        return None
    value = os.environ.get("PIXART_BLOCKS_PER_GRAPH", "4")
    if not value.isdigit():
        raise ValueError(f"PIXART_BLOCKS_PER_GRAPH must be a whole number of blocks (0: all), got {value!r}")
    size = int(value)
    return None if size == 0 or size >= depth else size


def fused_cpu() -> bool:
    """Whether layers use the fused fp32 CPU kernels (pixart/kernels): on MindSpore's CPU backend, where they build.
    Inference only (a Cell in training mode keeps the plain ops, which have gradients)."""
    return device_target() == "CPU" and kernels.available()


def in_place_kernel(name: str, params):
    """The fused CPU training kernel `name` (SquareSum, AdamWUpdate, EmaUpdate: one dummy (1,) output, the real results
    written in place) where it applies: MindSpore CPU with the kernels built and every one of `params` float32; else
    None (the caller keeps MindSpore ops)."""
    if fused_cpu() and all(p.dtype == ms.float32 for p in params):
        return kernels.op(name, out_shape=lambda *_: (1,))
    return None


def use_flash_attention() -> bool:
    flag = _STATE["flash_attention"]
    return on_ascend() if flag is None else bool(flag)


def dtype(name: str):
    """The MindSpore dtype for 'fp32' / 'fp16' / 'bf16', refusing what the device cannot compute."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "bf16" and device_target() == "CPU":
        raise ValueError("bf16 is not supported on MindSpore's CPU backend (no bf16 matmul); use fp32 or fp16")
    return DTYPES[name]


def cast_parameters(net, name: str):
    """Store every parameter of `net` in dtype `name` ('fp32' / 'fp16' / 'bf16'); returns `net`."""
    target = dtype(name)
    for p in net.get_parameters():
        if p.dtype != target:
            p.set_dtype(target)  # set_data would cast the new data back to the old dtype
    return net


def expand_as(small, x):
    """`small` materialised to `x`'s shape, for a binary op with x. MindSpore's CPU graph mode keeps ~4 output-sized
    buffers alive for every implicitly broadcasting Add/Mul (measured: 16 ops on a 9 MB tensor held 0.6 GB, vs
    0.07 GB with an explicit BroadcastTo); Ascend's compiler fuses the BroadcastTo away."""
    return small.broadcast_to(x.shape)


def chunk(x, chunks: int, axis: int = -1):
    """Split into equal parts; `mint.chunk` has no CPU kernel in graph mode, equal-size `ops.split` does."""
    return ops.split(x, x.shape[axis] // chunks, axis)


class Method(nn.Cell):
    """A method of a Cell as a Cell of its own: in graph mode it compiles on its own (`PixArt.sampler_parts`,
    `TrainStep.update`). auto_prefix=False: the wrapped Cell's parameter names stay as they are."""

    def __init__(self, owner: nn.Cell, name: str):
        super().__init__(auto_prefix=False)
        self.owner = owner
        self.method = name

    def construct(self, *args):
        return getattr(self.owner, self.method)(*args)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class Linear(nn.Cell):
    """y = x W^T + b with PyTorch's names and layout (`weight` (out, in), `bias`); `activation="gelu_tanh"` applies
    GELU (tanh approximation) to the result.

    On CPU a transposed-B MatMul on a 2-D view is ~8x faster in PyNative than mint's Linear kernel (measured at
    64x4096 @ 4096x4096: 0.15 s vs 1.2 s) and as fast in graph mode; bias and activation then run as one fused
    kernel where `fused_cpu()` (measured on (512, 4608): 2.5 ms vs 18 ms for BiasAdd + the six GELU ops). With the
    fused kernels, fp32 inference takes the product (and the bias) from `kernels.linear_product`: the AVX-512 GEMM
    (pixart/kernels/gemm_cpu.cc, strict fp32, ~1.3x MindSpore MatMul's speed on the step's shapes) where the CPU has
    AVX-512, or with PIXART_CPU_GEMM=bf16x3 on CPUs with Intel AMX the bf16x3 kernel (~5e-6 relative error per
    product; `strict=True` refuses it: the T5 encoder runs once per prompt). Training takes the AVX-512 product too
    (its gradient comes from the same kernel); the bf16x3 one is inference only. Ascend uses mint's fused Linear.
    Products of more than `kernel_max_rows` rows keep MindSpore's MatMul: measured on the 2-core VM, whole denoiser
    steps ran 0.86x PyTorch's time with the GEMM vs 0.94x with MatMul at 256 px (512 rows), but 1.22x vs 1.03x at
    512 px (2048 rows).
    """

    kernel_max_rows = 1024

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 strict: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features)), name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_features,)), name="bias") if bias else None
        if activation not in (None, "gelu_tanh"):
            raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
        self.activation = GELU("tanh") if activation else None
        self.use_mint = on_ascend()
        self.matmul = ops.MatMul(transpose_b=True)
        adds_bias = bias and activation is None  # else the epilogue adds it (fused with GELU)
        self.kernel, self.kernel_trains = kernels.linear_product(strict, adds_bias) if fused_cpu() else (None, False)
        self.kernel_adds_bias = self.kernel is not None and adds_bias
        self.fused_gelu = kernels.bias_gelu_tanh() if activation and bias and fused_cpu() else None

    def construct(self, x):
        if self.use_mint:
            y = mint.nn.functional.linear(x, self.weight, self.bias)
            return self.activation(y) if self.activation is not None else y
        return self.epilogue(self.product(x.reshape(-1, self.in_features)), x.shape)

    def on_kernel(self, dtype, rows) -> bool:
        """Whether this call takes the CPU GEMM kernel: one was chosen, fp32, at most `kernel_max_rows` rows (a
        static shape in graph mode), and inference unless it has a gradient."""
        return (self.kernel is not None and (self.kernel_trains or not self.training) and dtype == ms.float32
                and rows <= self.kernel_max_rows)

    def product(self, x2d):
        """x W^T for x (M, in) as (M, out); plus the bias where the kernel adds it (`epilogue` then does not)."""
        if self.on_kernel(x2d.dtype, x2d.shape[0]):
            if self.kernel_adds_bias:
                return self.kernel(x2d, self.weight, self.bias)
            return self.kernel(x2d, self.weight)
        return self.matmul(x2d, self.weight)

    def epilogue(self, y, in_shape):
        """`product`'s (M, out) -> + bias, activation, reshaped to in_shape[:-1] + (out,) (LoRA adds its update to
        the product first, so that LoRA at scale 0 equals the base layer bit for bit)."""
        if self.fused_gelu is not None and y.dtype == ms.float32:  # with its gradient: training takes it too
            y = self.fused_gelu(y, self.bias)
        else:
            if self.bias is not None and not (self.kernel_adds_bias and self.on_kernel(y.dtype, y.shape[0])):
                y = ops.bias_add(y, self.bias.astype(y.dtype))  # BiasAdd: a broadcast Add costs ~4 output buffers
            if self.activation is not None:
                y = self.activation(y)
        return y.reshape(in_shape[:-1] + (self.out_features,))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis; `weight`/`bias` only when elementwise_affine (PyTorch names).
    `modulated(x, shift, scale)` is adaLN's `norm(x) * (1 + scale) + shift`, one fused kernel where `fused_cpu()`."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.dim, self.eps, self.affine = dim, eps, elementwise_affine
        self.use_mint = on_ascend()
        if elementwise_affine:
            self.weight = Parameter(Tensor(np.ones(dim, np.float32)), name="weight")
            self.bias = Parameter(Tensor(np.zeros(dim, np.float32)), name="bias")
        else:
            self.weight = Tensor(np.ones(dim, np.float32))
            self.bias = Tensor(np.zeros(dim, np.float32))
        self.cpu_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.fused = kernels.layer_norm_modulate() if fused_cpu() and not elementwise_affine else None
        self.eps_tensor = Tensor([eps], ms.float32)

    def construct(self, x):
        return self.normalize(x)

    def normalize(self, x):
        weight, bias = self.weight.astype(x.dtype), self.bias.astype(x.dtype)
        if self.use_mint:
            return mint.nn.functional.layer_norm(x, (self.dim,), weight, bias, self.eps)
        return self.cpu_norm(x, weight, bias)[0]

    def modulated(self, x, shift, scale):
        """x (N, T, D), shift and scale (N, 1, D) -> norm(x) * (1 + scale) + shift."""
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, shift, scale, self.eps_tensor)
        return self.normalize(x) * expand_as(1 + scale, x) + expand_as(shift, x)


class GatedResidual(nn.Cell):
    """x + gate * y, gate (N, 1, D) broadcast over the tokens of x, y (N, T, D); one fused kernel where
    `fused_cpu()`, else an explicit broadcast (see `expand_as`)."""

    def __init__(self):
        super().__init__()
        self.fused = kernels.gated_residual() if fused_cpu() else None

    def construct(self, x, gate, y):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, gate, y)
        return x + expand_as(gate, x) * y


class GELU(nn.Cell):
    """GELU; the tanh approximation on CPU as x * sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3) (the same function:
    0.5 (1 + tanh z) = sigmoid(2 z)). Measured on (2, 256, 4608) fp32 in graph mode: `ops.gelu` 106 ms, this 25 ms,
    PyTorch 5.5 ms; max error vs float64 5.7e-7 (`ops.gelu` 4.1e-7; a tanh-based formula 1.9e-4: CPU tanh is coarse)."""

    _C1 = 2.0 * math.sqrt(2.0 / math.pi)
    _C3 = _C1 * 0.044715

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.use_mint = on_ascend()

    def construct(self, x):
        if self.use_mint:
            return mint.nn.functional.gelu(x, approximate=self.approximate)
        if self.approximate == "tanh":
            return x * ops.sigmoid(x * (x * x * self._C3 + self._C1))
        return ops.gelu(x, approximate=self.approximate)


class Conv2d(nn.Cell):
    """2-D convolution with PyTorch parameter names and layout (`weight` (out, in/groups, kh, kw), `bias`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias=True):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding, self.groups = stride, padding, groups
        fan_in = in_channels // groups * k[0] * k[1]
        bound = 1 / math.sqrt(fan_in)
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels // groups, *k)),
                                name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_channels,)), name="bias") if bias else None
        self.use_mint = on_ascend()

    def construct(self, x):
        if self.use_mint:
            return mint.nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        pad_mode = "pad" if self.padding else "valid"
        y = ops.conv2d(x, self.weight, None, self.stride, pad_mode, self.padding, 1, self.groups)
        if self.bias is not None:  # BiasAdd on the channel axis: no broadcast Add (see `expand_as`)
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y


class GroupNorm(mint.nn.GroupNorm):
    """mint's GroupNorm over (N, C, ...) (its kernel exists on CPU and Ascend; `weight`/`bias` (C,));
    `silu(x)` is SiLU(GroupNorm(x)). Both one fused kernel where `fused_cpu()` (mint's CPU GroupNorm took a quarter
    of an SD VAE decode)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.fused = (kernels.op("GroupNorm"), kernels.op("GroupNormSiLU")) if fused_cpu() and affine else None
        self.settings = Tensor([num_groups, eps], ms.float32)

    def construct(self, x):
        if self.fused is not None and not self.training and x.dtype == ms.float32:
            return self.fused[0](x, self.weight, self.bias, self.settings)
        return super().construct(x)

    def silu(self, x):
        if self.fused is not None and not self.training and x.dtype == ms.float32:
            return self.fused[1](x, self.weight, self.bias, self.settings)
        return mint.nn.functional.silu(super().construct(x))


class Embedding(nn.Cell):
    """A lookup table with PyTorch's parameter name `weight` (num, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (num_embeddings, embedding_dim)), name="weight")
        self.use_mint = on_ascend()

    def construct(self, ids):
        if self.use_mint:
            return mint.nn.functional.embedding(ids, self.weight)
        return ops.gather(self.weight, ids, 0)


class Attention(nn.Cell):
    """Scaled dot-product attention over (B, N, heads * head_dim) tensors, "BSH" layout.

    `mask` is an optional (B, Nk) keep-mask (1 = attend, 0 = padding). CPU/GPU: heads first, batched matmul, fp32
    softmax, batched matmul, heads back (the layout changes, scaling and masked softmax are fused kernels where
    `fused_cpu()`). On CPUs with AVX-512 one kernel replaces the two products and the softmax
    (`kernels.attention`: a block of queries at a time, so the (B, H, Nq, Nk) scores never exist; its gradient
    recomputes the probabilities; measured: depth-8 steps ~10% faster at 256 and 512 px, 0.8 GiB less peak memory at
    1024 px, full-depth training steps 0.91x vs 1.09x PyTorch's time with the ops above); other CPUs keep the ops
    above. Ascend: FlashAttentionScore, whose softmax runs in fp32 internally.
    """

    # Without that kernel (CPUs without AVX-512, GPU): from this many query tokens on (512 px and up),
    # `head_group` heads at a time, so that only their (B, g, Nq, Nk) scores are live rather than every head's
    # (2 x 16 x 4096^2 fp32 = 2 GiB at 1024 px)
    per_head_min_tokens = 1024
    head_group = 4

    def __init__(self, num_heads: int, head_dim: int, flash: bool | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.flash = use_flash_attention() if flash is None else flash
        if self.flash and not on_ascend():
            raise ValueError("flash attention needs an Ascend device")
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)
        self.bmm_pv = ops.BatchMatMul()
        self.fused = fused_cpu() and not self.flash
        if self.fused:
            self.to_heads, self.from_heads = kernels.to_heads(num_heads), kernels.from_heads()
            self.masked_softmax, self.softmax = kernels.softmax(masked=True), kernels.softmax(masked=False)
            self.scales = (Tensor([self.scale], ms.float32), Tensor([1.0], ms.float32))
        self.attend = self.attend_masked = None  # attention in one kernel, with its gradient (None: not on this CPU)
        if self.fused:
            self.attend, self.attend_masked = kernels.attention(masked=False), kernels.attention(masked=True)

    def construct(self, q, k, v, mask=None):
        if self.flash:
            drop = None
            if mask is not None:  # FlashAttentionScore masks where the mask is 1
                drop = (1 - mask.astype(ms.uint8)).reshape(mask.shape[0], 1, 1, -1)
                drop = drop.broadcast_to((mask.shape[0], 1, q.shape[1], mask.shape[1]))
            return ops.flash_attention_score(q, k, v, self.num_heads, attn_mask=drop, scalar_value=self.scale,
                                             input_layout="BSH")
        fused = self.fused and q.dtype == ms.float32
        q, k, v = self._heads(q, True, fused), self._heads(k, False, fused), self._heads(v, False, fused)
        keep = None if mask is None else mask.astype(ms.float32)  # (B, Nk)
        h, g = self.num_heads, self.head_group
        if fused and self.attend is not None:
            out = self.attend(q, k, v) if keep is None else self.attend_masked(q, k, v, keep)
        elif q.shape[2] < self.per_head_min_tokens or h % g:
            out = self._attend(q, k, v, keep, fused)
        else:
            out = mint.cat([self._attend(q[:, i:i + g], k[:, i:i + g], v[:, i:i + g], keep, fused)
                            for i in range(0, h, g)], 1)
        if fused:
            return self.from_heads(out)
        b, _, nq, d = out.shape
        return out.transpose(0, 2, 1, 3).reshape(b, nq, h * d)

    def _heads(self, x, is_query: bool, fused: bool):
        """(B, N, H*d) -> (B, H, N, d); queries times 1/sqrt(d)."""
        if fused:
            return self.to_heads(x, self.scales[0] if is_query else self.scales[1])
        b, n, _ = x.shape
        x = x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        return x * self.scale if is_query else x

    def _attend(self, q, k, v, keep, fused: bool):
        """Heads-first q (B, h, Nq, d), k and v (B, h, Nk, d) -> (B, h, Nq, d)."""
        scores = self.bmm_qk(q, k).astype(ms.float32)  # (B, h, Nq, Nk)
        if fused:
            probs = self.softmax(scores) if keep is None else self.masked_softmax(scores, keep)
        else:
            if keep is not None:
                b, nk = keep.shape
                scores = scores + expand_as(((1.0 - keep) * -1e9).reshape(b, 1, 1, nk), scores)
            probs = mint.softmax(scores, -1)
        return self.bmm_pv(probs.astype(v.dtype), v)
