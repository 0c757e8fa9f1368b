"""Portable layers with PyTorch's parameter names and layouts: mint's kernels on Ascend, plain MindSpore ops
elsewhere (MindSpore's CPU backend lacks many `mint` kernels and any bf16 compute).

Each layer picks its implementation at construction from the device `pixart.backend` is set to, so model code never
branches on the device and a graph-mode compile sees one path. `pixart.cpu.accelerate` turns a built model's layers
into their CPU-kernel subclasses; nothing here depends on it.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import HeUniform, Normal, Uniform, initializer

from pixart.backend import on_ascend


def expand_as(small, x):
    """`small` materialised to `x`'s shape, for a binary op with x. MindSpore's CPU graph mode keeps ~4 output-sized
    buffers alive for every implicitly broadcasting Add/Mul, but not for an explicit BroadcastTo; Ascend's compiler
    fuses the BroadcastTo away (measurements: docs/benchmarks.md, 'Design measurements')."""
    return small.broadcast_to(x.shape)


def chunk(x, chunks: int, axis: int = -1):
    """Split into equal parts; `mint.chunk` has no CPU kernel in graph mode, equal-size `ops.split` does."""
    return ops.split(x, x.shape[axis] // chunks, axis)


class Method(nn.Cell):
    """A method of a Cell as a Cell of its own: in graph mode it compiles on its own (`PixArt.sampler_parts`).
    auto_prefix=False: the wrapped Cell's parameter names stay as they are."""

    def __init__(self, owner: nn.Cell, name: str):
        super().__init__(auto_prefix=False)
        self.owner = owner
        self.method = name

    def construct(self, *args):
        return getattr(self.owner, self.method)(*args)


class Linear(nn.Cell):
    """y = x W^T + b with PyTorch's names and layout (`weight` (out, in), `bias`); `activation="gelu_tanh"` applies
    GELU (tanh approximation) to the result. `strict`: the product must be exact fp32 (an accelerated subclass may
    not substitute an approximate one).

    Ascend: mint's fused Linear. Elsewhere a transposed-B MatMul on a 2-D view (much faster than mint's Linear on
    CPU in PyNative, as fast in graph mode), split into `product` and `epilogue` so that LoRA adds its update in
    between and equals the base layer bit for bit at scale 0.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 strict: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.in_features, self.out_features, self.strict = in_features, out_features, strict
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features)), name="weight")
        self.bias = Parameter(initializer(Uniform(bound), (out_features,)), name="bias") if bias else None
        if activation not in (None, "gelu_tanh"):
            raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
        self.activation = GELU("tanh") if activation else None
        self.use_mint = on_ascend()
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        if self.use_mint:
            y = mint.nn.functional.linear(x, self.weight, self.bias)
            return self.activation(y) if self.activation is not None else y
        return self.epilogue(self.product(x.reshape(-1, self.in_features)), x.shape)

    def product(self, x2d):
        """x W^T for x (M, in) as (M, out)."""
        w = self.weight
        if w.dtype != x2d.dtype:  # half weights stored for fp32 compute (backend.cast_parameters on CPU), no kernels
            w = w.astype(x2d.dtype)
        return self.matmul(x2d, w)

    def epilogue(self, y, in_shape):
        """`product`'s (M, out) -> + bias, activation, reshaped to in_shape[:-1] + (out,)."""
        if self.bias is not None:
            y = ops.bias_add(y, self.bias.astype(y.dtype))  # BiasAdd: no broadcast Add (see `expand_as`)
        if self.activation is not None:
            y = self.activation(y)
        return y.reshape(in_shape[:-1] + (self.out_features,))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis; `weight`/`bias` only when elementwise_affine (PyTorch names).
    `modulated(x, shift, scale)` is adaLN's `norm(x) * (1 + scale) + shift`."""

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
        return self.normalize(x)

    def normalize(self, x):
        weight, bias = self.weight.astype(x.dtype), self.bias.astype(x.dtype)
        if self.use_mint:
            return mint.nn.functional.layer_norm(x, (self.dim,), weight, bias, self.eps)
        return self.cpu_norm(x, weight, bias)[0]

    def modulated(self, x, shift, scale):
        """x (N, T, D), shift and scale (N, 1, D) -> norm(x) * (1 + scale) + shift."""
        return self.normalize(x) * expand_as(1 + scale, x) + expand_as(shift, x)


class GatedResidual(nn.Cell):
    """x + gate * y, gate (N, 1, D) broadcast over the tokens of x, y (N, T, D) (an explicit broadcast: see
    `expand_as`)."""

    def construct(self, x, gate, y):
        return x + expand_as(gate, x) * y


class GELU(nn.Cell):
    """GELU; elsewhere than Ascend the tanh approximation as x * sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3), the
    same function (0.5 (1 + tanh z) = sigmoid(2 z)): several times faster than `ops.gelu` on CPU and closer to
    float64 than a tanh-based formula, CPU tanh being coarse (measurements: docs/benchmarks.md, 'Design
    measurements')."""

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
    `silu(x)` is SiLU(GroupNorm(x))."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def silu(self, x):
        return mint.nn.functional.silu(self.construct(x))


class Embedding(nn.Cell):
    """A lookup table with PyTorch's parameter name `weight` (num, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (num_embeddings, embedding_dim)), name="weight")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.use_mint = on_ascend()

    def construct(self, ids):
        if self.use_mint:
            return mint.nn.functional.embedding(ids, self.weight)
        w = self.weight
        if w.dtype == ms.bfloat16:  # a half table stored for fp32 compute (backend.cast_parameters on CPU), no kernels
            w = w.astype(ms.float32)
        return ops.gather(w, ids, 0)
