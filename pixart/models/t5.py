"""T5 v1.1 text encoder (encoder stack only), loadable from HuggingFace folders by parameter name.

Parameter names equal HF's (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...). Precision
follows HF's fp16 recipe for T5 (`_keep_in_fp32_modules = ["wo"]`): weights may be fp16, but the residual stream,
RMS norms, softmax, the gated activation and the `wo` projection run in fp32, so the FFN cannot overflow.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer
from mindspore.nn.utils import no_init_parameters

from .. import backend
from ..nn import GELU, Embedding, Linear
from ..io import CheckpointError, check_state, describe_mismatch, load_into, read_config, read_state_dict

_ACTIVATIONS = {"relu": None, "gelu": "none", "gelu_new": "tanh"}  # HF activation name -> GELU approximation
_FP16_SAFE = 64504.0  # HF clamps overflowed fp16 activations to finfo(fp16).max - 1000
_MASKED = float(np.finfo(np.float32).min)  # HF's additive mask value for padded keys


@dataclass
class T5Config:
    """The fields of an HF T5 config.json the encoder needs; defaults are HF's, so absent keys mean the same."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # T5 v1.1 (PixArt's t5-v1_1-xxl): "gated-gelu"

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        cfg.activation  # validate now, not at build time
        return cfg

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """HF's rule: 'gated-gelu' means the tanh GELU ('gelu_new'); otherwise the part after 'gated-'."""
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported T5 feed_forward_proj {self.feed_forward_proj!r} "
                             f"(supported: relu, gelu, gelu_new, with or without 'gated-')")
        return act


def relative_position_buckets(n: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5's bidirectional bucket of (key - query) for an (n, n) grid, int32; float32 logs like HF so edges match."""
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    scaled = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(exact)) / np.float32(
        math.log(max_distance / exact)) * np.float32(half - exact)
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (bucket + np.where(rel < exact, rel, large)).astype(np.int32)


def _finite_fp16(x):
    """HF's fp16 guard: overflowed half-precision activations become +-(max - 1000) instead of inf."""
    if x.dtype == ms.float16:
        x = ops.clamp(x, -_FP16_SAFE, _FP16_SAFE)
    return x


class T5LayerNorm(nn.Cell):
    """RMS norm: no mean subtraction, no bias, statistics in fp32; output in the weight's dtype (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")

    def construct(self, x):
        x = x.astype(ms.float32)
        x = x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps)  # x * x: MindSpore CPU's Pow is far slower
        return self.weight * x.astype(self.weight.dtype)


class T5Attention(nn.Cell):
    """Multi-head self-attention without the 1/sqrt(d) scale; the position bias (and padding mask) come in `bias`."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool = False, max_positions: int = 512):
        super().__init__()
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False, strict=True)
        self.k = Linear(cfg.d_model, inner, bias=False, strict=True)
        self.v = Linear(cfg.d_model, inner, bias=False, strict=True)
        self.o = Linear(inner, cfg.d_model, bias=False, strict=True)
        if has_relative_bias:
            self.max_positions = max_positions
            self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
            self.buckets = Tensor(relative_position_buckets(max_positions, cfg.relative_attention_num_buckets,
                                                            cfg.relative_attention_max_distance))  # (P, P)

    def compute_bias(self, n: int):
        """(1, heads, n, n) fp32 relative position bias; only block 0 owns the table."""
        if n > self.max_positions:
            raise ValueError(f"sequence of {n} tokens exceeds the encoder's max_positions={self.max_positions}")
        bias = self.relative_attention_bias(self.buckets[:n, :n])  # (n, n, H)
        return bias.astype(ms.float32).transpose(2, 0, 1).expand_dims(0)

    def construct(self, x, bias):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.d_kv).transpose(0, 2, 1, 3)  # (B, H, N, d)
        k = self.k(x).reshape(b, n, self.heads, self.d_kv).transpose(0, 2, 3, 1)  # (B, H, d, N)
        v = self.v(x).reshape(b, n, self.heads, self.d_kv).transpose(0, 2, 1, 3)  # (B, H, N, d)
        scores = mint.matmul(q, k).astype(ms.float32) + bias  # (B, H, N, N)
        probs = mint.softmax(scores, -1).astype(v.dtype)
        out = mint.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, n, self.heads * self.d_kv)
        return _finite_fp16(self.o(out))


class T5LayerSelfAttention(nn.Cell):
    """Pre-norm self-attention sublayer with residual."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool = False, max_positions: int = 512):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias, max_positions)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def construct(self, x, bias):  # x: (B, N, D) fp32 residual stream
        return x + self.SelfAttention(self.layer_norm(x), bias).astype(x.dtype)


class T5DenseActDense(nn.Cell):
    """T5 FFN: wo(act(wi_0 x) * wi_1 x) when gated (v1.1), wo(act(wi x)) otherwise; activation and wo in fp32."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.gated
        if self.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False, strict=True)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False, strict=True)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False, strict=True)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False, strict=True)  # takes fp32 activations (HF: wo in fp32)
        self.matmul_t = ops.MatMul(transpose_b=True)  # x @ W.T, 2-D; in PyNative on CPU far faster than mint's linear
        act = cfg.activation
        self.act = nn.ReLU() if act == "relu" else GELU(_ACTIVATIONS[act])

    def construct(self, x):  # x: (B, N, D) in the weights' dtype
        if self.gated:
            gate, up = _finite_fp16(self.wi_0(x)).astype(ms.float32), _finite_fp16(self.wi_1(x)).astype(ms.float32)
            h = self.act(gate) * up  # (B, N, F) fp32
        else:
            h = self.act(_finite_fp16(self.wi(x)).astype(ms.float32))
        wo = self.wo.weight
        if self.wo.use_mint and wo.dtype != ms.float32:  # on CPU half weights are storage: the Linear takes fp32
            b, n, f = h.shape
            return self.matmul_t(h.reshape(b * n, f), wo.astype(ms.float32)).reshape(b, n, -1)  # (B, N, D) fp32
        return self.wo(h)


class T5LayerFF(nn.Cell):
    """Pre-norm feed-forward sublayer with residual."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def construct(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Cell):
    """One encoder block: `layer.0` self-attention, `layer.1` feed-forward (HF's layout)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool = False, max_positions: int = 512):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(cfg, has_relative_bias, max_positions), T5LayerFF(cfg)])

    def construct(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Cell):
    """The encoder blocks and final norm; block 0's relative position bias is shared by every block."""

    def __init__(self, cfg: T5Config, max_positions: int = 512):
        super().__init__()
        self.block = nn.CellList([T5Block(cfg, i == 0, max_positions) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def construct(self, x, attention_mask=None):  # x: (B, N, D) fp32, attention_mask: (B, N) 1 = token, 0 = pad
        b, n, _ = x.shape
        bias = self.block[0].layer[0].SelfAttention.compute_bias(n)  # (1, H, N, N)
        if attention_mask is not None:  # HF: additive finfo.min on padded keys
            pad = 1.0 - attention_mask.astype(ms.float32).reshape(b, 1, 1, n)
            bias = bias + pad * _MASKED  # (B, H, N, N)
        for blk in self.block:
            x = blk(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Cell):
    """T5 encoder: token ids (B, N) + mask (B, N) -> last_hidden_state (B, N, d_model)."""

    def __init__(self, cfg: T5Config, max_positions: int = 512):
        super().__init__()
        self.config = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, max_positions)

    def construct(self, input_ids, attention_mask=None):
        x = self.shared(input_ids).astype(ms.float32)  # (B, N, D): T5 does not scale its embeddings
        return self.encoder(x, attention_mask)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_t5(folder, dtype: str = "fp32", max_positions: int = 512) -> T5EncoderModel:
    """Build the T5 encoder from an HF folder (config.json + weights); decoder/lm_head weights are ignored.

    The weights are maps of the file (safetensors) converted to their parameters' dtypes (`backend.parameter_dtypes`:
    on CPU a half `dtype` is the Linear weights' and embeddings' storage, the rest fp32) one tensor at a time, and the Cell is built
    without random weights and takes the arrays' memory where the dtypes agree, so peak memory stays near the size
    of the model.
    """
    backend.weight_dtype(dtype)  # refuses bf16 on a CPU without it before reading anything
    folder = Path(folder)
    cfg = T5Config.from_dict(read_config(folder))
    state = {k: v for k, v in read_state_dict(folder).items() if not k.startswith(("decoder.", "lm_head."))}
    tied = state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; either may be stored
    if tied is not None and "shared.weight" not in state:
        state["shared.weight"] = tied
    with no_init_parameters():
        model = T5EncoderModel(cfg, max_positions)
    dtypes = backend.parameter_dtypes(model, dtype)
    problems = check_state({p.name: tuple(p.shape) for p in model.get_parameters()}, state)
    if any(problems):
        raise CheckpointError(describe_mismatch(f"T5 encoder ({folder})", *problems))
    for p in model.get_parameters():
        p.set_dtype(dtypes[p.name])
    for name in list(state):  # one tensor at a time, its map released once loaded (numpy has no bf16: cast there)
        arr = state.pop(name)
        if dtypes[name] in (ms.float16, ms.float32):
            arr = np.ascontiguousarray(arr.astype(np.float16 if dtypes[name] == ms.float16 else np.float32,
                                                  copy=False))
        load_into(model, {name: arr}, what=f"T5 encoder ({folder})", strict=False, share=True)
    model.set_train(False)
    return model
