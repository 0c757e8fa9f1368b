"""The one place that picks kernels per device.

MindSpore's CPU backend lacks many `mint` kernels (LayerNorm, Conv2d, GELU, Embedding, flash attention) and any
bf16 compute; Ascend has all of them and is fastest with them. Every layer below decides at construction time
which kernel it uses, from the device MindSpore is set to, so model code never branches on the device and a
graph-mode compile sees a single path.

Call `setup()` (scripts do) before building models; tests may call it again to switch modes.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import HeUniform, Normal, Uniform, initializer

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
    if mode == "graph":
        ms.set_context(jit_config={"jit_level": jit_level})
    if threads:
        ms.set_context(runtime_num_threads=threads)
    configure(flash_attention=flash_attention)


def configure(flash_attention: bool | None = None) -> None:
    """Ask for flash attention (only Ascend has the kernel; asking for it elsewhere is an error)."""
    if flash_attention and not on_ascend():
        raise ValueError(f"flash attention needs an Ascend device; this process runs on {device_target()}")
    _STATE["flash_attention"] = flash_attention


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


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class Linear(nn.Cell):
    """y = x W^T + b with PyTorch's names and layout (`weight` (out, in), `bias`).

    On CPU a transposed-B MatMul on a 2-D view is ~8x faster in PyNative than mint's Linear kernel (measured at
    64x4096 @ 4096x4096: 0.15 s vs 1.2 s) and as fast in graph mode; Ascend uses mint's fused kernel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features)), name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_features,)), name="bias") if bias else None
        self.use_mint = on_ascend()
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        if self.use_mint:
            return mint.nn.functional.linear(x, self.weight, self.bias)
        y = self.matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:  # BiasAdd, not a broadcast Add: the latter costs ~4 output-sized buffers in graph mode
            y = ops.bias_add(y, self.bias.astype(y.dtype))
        return y.reshape(x.shape[:-1] + (self.out_features,))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis; `weight`/`bias` only when elementwise_affine (PyTorch names)."""

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

    def construct(self, x):
        weight, bias = self.weight.astype(x.dtype), self.bias.astype(x.dtype)
        if self.use_mint:
            return mint.nn.functional.layer_norm(x, (self.dim,), weight, bias, self.eps)
        return self.cpu_norm(x, weight, bias)[0]


class GELU(nn.Cell):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.use_mint = on_ascend()

    def construct(self, x):
        if self.use_mint:
            return mint.nn.functional.gelu(x, approximate=self.approximate)
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
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def GroupNorm(num_groups: int, num_channels: int, eps: float = 1e-6, affine: bool = True) -> nn.Cell:
    """GroupNorm with `weight`/`bias`; mint's kernel exists on CPU and Ascend."""
    return mint.nn.GroupNorm(num_groups, num_channels, eps=eps, affine=affine)


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

    `mask` is an optional (B, Nk) keep-mask (1 = attend, 0 = padding). CPU/GPU: matmul, fp32 softmax, matmul.
    Ascend: FlashAttentionScore, whose softmax runs in fp32 internally.
    """

    def __init__(self, num_heads: int, head_dim: int, flash: bool | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.flash = use_flash_attention() if flash is None else flash
        if self.flash and not on_ascend():
            raise ValueError("flash attention needs an Ascend device")

    def construct(self, q, k, v, mask=None):
        if self.flash:
            drop = None
            if mask is not None:  # FlashAttentionScore masks where the mask is 1
                drop = (1 - mask.astype(ms.uint8)).reshape(mask.shape[0], 1, 1, -1)
                drop = drop.broadcast_to((mask.shape[0], 1, q.shape[1], mask.shape[1]))
            return ops.flash_attention_score(q, k, v, self.num_heads, attn_mask=drop, scalar_value=self.scale,
                                             input_layout="BSH")
        b, nq, _ = q.shape
        nk = k.shape[1]
        q = q.reshape(b, nq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, Nq, d)
        k = k.reshape(b, nk, self.num_heads, self.head_dim).transpose(0, 2, 3, 1)  # (B, H, d, Nk)
        v = v.reshape(b, nk, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, Nk, d)
        scores = mint.matmul(q * self.scale, k).astype(ms.float32)  # (B, H, Nq, Nk)
        if mask is not None:
            scores = scores + expand_as((1.0 - mask.astype(ms.float32)).reshape(b, 1, 1, nk) * -1e9, scores)
        probs = mint.softmax(scores, -1).astype(v.dtype)
        out = mint.matmul(probs, v)  # (B, H, Nq, d)
        return out.transpose(0, 2, 1, 3).reshape(b, nq, self.num_heads * self.head_dim)
