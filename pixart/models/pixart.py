"""PixArt-α / PixArt-Σ: a diffusion transformer for text-to-image (Chen et al. 2023, 2024), in MindSpore.

Sections follow the paper: embedders (patches, timestep, micro-conditions, caption), the PixArt block
(adaLN-single, self-attention with optional KV compression and qk-norm, cross-attention, MLP), the final layer,
the model and its initialisation, sin-cos position embeddings, and presets. Parameter names equal the original
checkpoints. Layers come from `pixart.nn` only (`pixart.cpu.accelerate` adds CPU kernels to a built model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from pixart.models.kv_compression import KVCompression
from pixart.nn import Attention, Conv2d, GatedResidual, LayerNorm, Linear, Method, chunk, expand_as


#################################################################################
#                                   Embedders                                   #
#################################################################################
class PatchEmbed(nn.Cell):
    """Latent image (N, C, H, W) -> patch tokens (N, H*W/p^2, D) by a p x p stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def construct(self, x):
        x = self.proj(x)  # (N, D, h, w)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)  # (N, h*w, D)

    def with_position(self, x, pos):
        """Patch tokens plus the position embedding pos (1, T, D): (N, C, H, W) -> (N, T, D)."""
        x = self.construct(x)
        return x + expand_as(pos.astype(x.dtype), x)


@lru_cache(maxsize=None)
def _frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
    half = dim // 2
    # the same float32 arithmetic as the reference, so embeddings agree bit for bit where exp does
    return np.exp(np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding of (possibly fractional) scalars t (N,) -> (N, dim): [cos, sin] as in GLIDE."""
    args = t.astype(ms.float32).reshape(-1, 1) * Tensor(_frequencies(dim)).reshape(1, -1)
    return mint.cat([mint.cos(args), mint.sin(args)], -1)


class TimestepEmbedder(nn.Cell):
    """Diffusion timestep t (N,) -> (N, D): sinusoidal features, then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.SequentialCell(Linear(frequency_embedding_size, hidden_size), mint.nn.SiLU(),
                                     Linear(hidden_size, hidden_size))

    def construct(self, t):
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.astype(self.mlp[0].bias.dtype))  # the activations' dtype: see `PixArt.embed`


class SizeEmbedder(TimestepEmbedder):
    """α-1024 micro-condition: each scalar of s (N, k) embedded like a timestep -> (N, k * D_s)."""

    def construct(self, s):
        n = s.shape[0]
        emb = super().construct(s.reshape(-1))  # (N * k, D_s)
        return emb.reshape(n, -1)


class CaptionEmbedder(nn.Cell):
    """T5 features (N, 1, L, C_text) -> (N, 1, L, D) by an MLP; `y_embedding` is the learned null caption."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.y_embedding = Parameter(Tensor(np.random.randn(token_num, in_channels).astype(np.float32)
                                            / in_channels ** 0.5), name="y_embedding", requires_grad=False)

    def construct(self, caption, drop_ids=None):
        if drop_ids is not None:  # classifier-free guidance dropout during training: 1 = use the null caption
            keep = (1 - drop_ids.astype(caption.dtype)).reshape(-1, 1, 1, 1)
            caption = caption * keep + self.y_embedding.astype(caption.dtype) * (1 - keep)
        return self.y_proj(caption)


class Mlp(nn.Cell):
    """fc1 -> GELU (tanh approximation) -> fc2, as timm's Mlp that the checkpoints were trained with."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features, activation="gelu_tanh")
        self.fc2 = Linear(hidden_features, out_features)

    def construct(self, x):
        return self.fc2(self.fc1(x))


#################################################################################
#                                 PixArt block                                  #
#################################################################################
class AttentionKVCompress(nn.Cell):
    """Self-attention; Σ compresses keys/values spatially by `sr_ratio` (`sampling` conv / ave / uniform)."""

    def __init__(self, dim: int, num_heads: int, sampling: str | None = None, sr_ratio: int = 1,
                 qk_norm: bool = False):
        super().__init__()
        self.dim, self.sr_ratio = dim, sr_ratio
        self.sampling = sampling if sr_ratio > 1 else None
        if self.sampling not in (None, "conv", "ave", "uniform"):
            raise ValueError(f"KV compression sampling must be conv, ave or uniform, got {sampling!r}")
        self.qkv = Linear(dim, dim * 3)
        self.attention = Attention(num_heads, dim // num_heads)
        self.proj = Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = LayerNorm(dim)
            self.k_norm = LayerNorm(dim)
        if self.sampling == "conv":  # depthwise average-initialised conv, then LayerNorm
            self.sr = Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim)
            self.sr.weight.set_data(Tensor(np.full((dim, 1, sr_ratio, sr_ratio), 1 / sr_ratio ** 2, np.float32)))
            self.sr.bias.set_data(Tensor(np.zeros(dim, np.float32)))
            self.norm = LayerNorm(dim)

    def downsample(self, x, h: int, w: int):
        """Tokens (N, h*w, C) -> (N, h'*w', C) on the h x w grid; 'ave' is nearest-neighbour, as in the original."""
        n, _, c = x.shape
        r = self.sr_ratio
        x = x.reshape(n, h, w, c)
        if self.sampling == "conv":
            x = self.sr(x.transpose(0, 3, 1, 2))  # (N, C, h/r, w/r)
            return self.norm(x.reshape(n, c, -1).transpose(0, 2, 1))
        return x[:, ::r, ::r, :].reshape(n, -1, c)

    def construct(self, x, hw):
        q, k, v = chunk(self.qkv(x), 3, -1)  # (N, T, C) each
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.sampling is not None:
            k, v = self.downsample(k, hw[0], hw[1]), self.downsample(v, hw[0], hw[1])
        return self.proj(self.attention(q, k, v))


class MultiHeadCrossAttention(nn.Cell):
    """Image tokens attend to caption tokens; padded caption tokens are masked out. The caption's keys and values
    (`caption_kv`) do not depend on the image or the timestep: sampling computes them once per prompt."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(dim, dim * 2)
        self.attention = Attention(num_heads, dim // num_heads)
        self.proj = Linear(dim, dim)

    def caption_kv(self, cond):
        """Caption tokens (N, L, C) -> keys and values side by side (N, L, 2C)."""
        return self.kv_linear(cond)

    def construct(self, x, kv, mask=None):
        k, v = chunk(kv, 2, -1)  # (N, L, C) each
        return self.proj(self.attention(self.q_linear(x), k, v, mask))


class PixArtBlock(nn.Cell):
    """A PixArt block: adaLN-single modulated self-attention and MLP, with cross-attention to the caption."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, sampling: str | None = None,
                 sr_ratio: int = 1, qk_norm: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = AttentionKVCompress(hidden_size, num_heads, sampling, sr_ratio, qk_norm)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = Parameter(Tensor(np.random.randn(6, hidden_size).astype(np.float32)
                                                  / hidden_size ** 0.5), name="scale_shift_table")
        self.gated_residual = GatedResidual()

    def construct(self, x, caption_kv, t, mask, hw):
        """x (N, T, D) image tokens; caption_kv (N, L, 2D) from `cross_attn.caption_kv`; t (N, 6D) adaLN-single input;
        mask (N, L) or None; hw the token grid (h, w)."""
        n = x.shape[0]
        # adaLN-single: the block's own table plus the shared timestep projection t gives six (N, 1, D) vectors
        mod = self.scale_shift_table.reshape(1, 6, -1) + t.reshape(n, 6, -1)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunk(mod, 6, 1)  # (N, 1, D) each
        # x + gate_msa * SelfAttn(LayerNorm(x) * (1 + scale_msa) + shift_msa)
        h = self.norm1.modulated(x, shift_msa, scale_msa)  # (N, T, D)
        x = self.gated_residual(x, gate_msa, self.attn(h, hw))  # (N, T, D)
        # x + CrossAttn(x, caption): not modulated
        x = x + self.cross_attn(x, caption_kv, mask)  # (N, T, D)
        # x + gate_mlp * MLP(LayerNorm(x) * (1 + scale_mlp) + shift_mlp)
        h = self.norm2.modulated(x, shift_mlp, scale_mlp)  # (N, T, D)
        return self.gated_residual(x, gate_mlp, self.mlp(h))  # (N, T, D)


class T2IFinalLayer(nn.Cell):
    """Final LayerNorm, modulated by the timestep embedding, and a linear map to p*p*C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = Parameter(Tensor(np.random.randn(2, hidden_size).astype(np.float32)
                                                  / hidden_size ** 0.5), name="scale_shift_table")

    def construct(self, x, t):
        """x (N, T, D), t (N, D) the timestep embedding -> (N, T, p*p*C_out)."""
        mod = self.scale_shift_table.reshape(1, 2, -1) + t.reshape(t.shape[0], 1, -1)  # (N, 2, D)
        shift, scale = chunk(mod, 2, 1)  # (N, 1, D) each
        return self.linear(self.norm_final.modulated(x, shift, scale))  # LayerNorm(x) * (1 + scale) + shift


#################################################################################
#                                 PixArt model                                  #
#################################################################################
@dataclass
class PixArtConfig:
    input_size: int = 32                 # latent side the model was trained at (image side / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pred_sigma: bool = True              # learned variance: 2 x in_channels outputs
    caption_channels: int = 4096         # T5-XXL width
    model_max_length: int = 120          # caption tokens: 120 for α, 300 for Σ
    pe_interpolation: float = 1.0
    micro_condition: bool = False        # α-1024-MS: original size and aspect ratio embedded into t
    qk_norm: bool = False
    kv_compress_config: KVCompression = field(default_factory=KVCompression)  # the configs' dict form is accepted

    def __post_init__(self):
        self.kv_compress_config = KVCompression.of(self.kv_compress_config)


class PixArt(nn.Cell):
    """PixArt-α / Σ denoiser: (latents, timestep, T5 caption features, mask) -> ε and variance.

    One class serves the fixed-size (α-256/512, Σ-256) and multi-scale (…-MS) checkpoints: the sin-cos position
    embedding is computed for each input's grid, which for the native size equals the fixed buffer.
    """

    def __init__(self, config: PixArtConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or PixArtConfig(**kwargs)
        cfg.kv_compress_config = kv = KVCompression.of(cfg.kv_compress_config)  # also when a dict was assigned later
        self.config = cfg
        d = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.out_channels = cfg.in_channels * 2 if cfg.pred_sigma else cfg.in_channels
        self.base_size = cfg.input_size // cfg.patch_size
        self.micro_condition = cfg.micro_condition

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.SequentialCell(mint.nn.SiLU(), Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, d, cfg.model_max_length)
        if cfg.micro_condition:
            self.csize_embedder = SizeEmbedder(d // 3)
            self.ar_embedder = SizeEmbedder(d // 3)
        self.blocks = nn.CellList([PixArtBlock(d, cfg.num_heads, cfg.mlp_ratio, kv.sampling, kv.ratio(i), cfg.qk_norm)
                                   for i in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(d, cfg.patch_size, self.out_channels)
        self.compiled_parts = {}  # `sampler_parts` in graph mode, made at their first use (a dict: not sub-Cells)
        # a backend's own compiled parts for `sampler_parts` (model -> {"encode_caption", "denoise"} or None: one graph
        # each); `pixart.cpu.accelerate` sets graphs shared by runs of blocks
        self.sampler_graphs: Callable | None = None

    def construct(self, x, timestep, y, mask=None, data_info=None, force_drop_ids=None):
        """x (N, C, H, W) latents; timestep (N,); y (N, 1, L, C_text) T5 features; mask (N, L) 1 = real token;
        data_info {'img_hw': (N, 2), 'aspect_ratio': (N, 1)} for micro-conditioned models;
        force_drop_ids (N,) 1 = replace the caption by the null caption (training's classifier-free dropout)."""
        return self.denoise(x, timestep, self.encode_caption(y, force_drop_ids), mask, data_info)

    def encode_caption(self, y, force_drop_ids=None):
        """T5 features (N, 1, L, C_text) -> every block's cross-attention keys and values, a tuple of (N, L, 2D)
        (what each block's `cross_attn.caption_kv` keeps: a backend's layer may keep the caption tokens and project
        them in the step). Independent of the latents and the timestep: sampling runs it once per prompt."""
        y = self.embed_caption(y, force_drop_ids)
        return tuple(block.cross_attn.caption_kv(y) for block in self.blocks)

    def embed_caption(self, y, force_drop_ids=None):
        """T5 features (N, 1, L, C_text) -> caption tokens (N, L, D) by the caption MLP (null caption where dropped)."""
        n = y.shape[0]
        y = self.y_embedder(y.astype(self.t_block[1].bias.dtype), force_drop_ids)  # (N, 1, L, D)
        return y.reshape(n, -1, y.shape[-1])

    def denoise(self, x, timestep, caption_kv, mask=None, data_info=None):
        """The denoiser given `encode_caption`'s keys and values: latents (N, C, H, W) -> (N, C_out, H, W)."""
        hw = self.token_grid(x)
        mask = caption_mask(mask, x.shape[0], caption_kv[0].shape[1])
        x, t, t0 = self.embed(x, timestep, data_info)
        for i, block in enumerate(self.blocks):
            x = block(x, caption_kv[i], t0, mask, hw)  # (N, T, D)
        return self.final(x, t, hw)

    def token_grid(self, x):
        """The (h, w) grid of patch tokens of latents (N, C, H, W)."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def embed(self, x, timestep, data_info=None):
        """Latents, timestep and micro-conditions -> (tokens + position embedding (N, T, D), timestep embedding t
        (N, D) for the final layer, adaLN-single input t0 (N, 6D) for the blocks)."""
        n = x.shape[0]
        h, w = self.token_grid(x)
        dtype = self.t_block[1].bias.dtype  # a bias: fp32 where half weights are storage only (backend.cast_parameters)
        pos = Tensor(get_2d_sincos_pos_embed(self.config.hidden_size, h, w, self.config.pe_interpolation,
                                             self.base_size))
        x = self.x_embedder.with_position(x.astype(dtype), pos)  # (N, T, D), T = h * w
        t = self.t_embedder(timestep.reshape(-1).broadcast_to((n,)))  # (N, D)
        if self.micro_condition:
            csize = self.csize_embedder(data_info["img_hw"].astype(ms.float32).reshape(-1, 2))  # (N, 2D/3)
            ar = self.ar_embedder(data_info["aspect_ratio"].astype(ms.float32).reshape(-1, 1))  # (N, D/3)
            t = t + mint.cat([csize, ar], 1).broadcast_to(t.shape)
        return x, t, self.t_block(t)

    def final(self, x, t, hw):
        """Block output (N, T, D) -> (N, C_out, H, W): the final layer, then patches back to the latent grid."""
        return self.unpatchify(self.final_layer(x, t), hw[0], hw[1])

    def sampler_parts(self):
        """(encode_caption, denoise) as callables for sampling: in graph mode each is compiled on its own, so a
        prompt's caption work is done once and each step runs the compiled denoiser (one graph, or the parts
        `sampler_graphs` makes); in PyNative the methods."""
        if ms.get_context("mode") != ms.GRAPH_MODE:
            return self.encode_caption, self.denoise
        if not self.compiled_parts:
            parts = self.sampler_graphs(self) if self.sampler_graphs is not None else None
            self.compiled_parts.update(parts or dict(encode_caption=Method(self, "encode_caption"),
                                                     denoise=Method(self, "denoise")))
        encode = self.compiled_parts["encode_caption"]
        # mutable: a tuple of Tensors passed to a graph is otherwise a constant, and new values would recompile it
        return (lambda y, force_drop_ids=None: ms.mutable(encode(y, force_drop_ids))), self.compiled_parts["denoise"]

    def compile_count(self) -> int:
        """Graphs compiled for this model so far: the whole model's, its sub-Cells' and `sampler_parts`'."""
        count = sum(len(c.compile_cache) for _, c in self.cells_and_names())
        return count + sum(len(part.compile_cache) for part in self.compiled_parts.values())

    def initialize_weights(self, seed: int) -> None:
        """PixArt's initialisation for training from scratch (the official `initialize_weights`), from a seeded NumPy
        generator, so that every rank starts from the same weights without a broadcast."""
        rng = np.random.default_rng([seed, 0x1417])
        # every Linear: Xavier-uniform weight, zero bias
        for _, cell in self.cells_and_names():
            if isinstance(cell, Linear):
                _set(cell.weight, _xavier(rng, tuple(cell.weight.shape)))
                if cell.bias is not None:
                    _set(cell.bias, np.zeros(tuple(cell.bias.shape)))
        # the patch embedding like a Linear over (C * p * p), its bias as PyTorch's Conv2d default
        proj = self.x_embedder.proj
        _set(proj.weight, _xavier(rng, tuple(proj.weight.shape)))
        fan_in = int(np.prod(proj.weight.shape[1:]))
        _set(proj.bias, rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), tuple(proj.bias.shape)))
        # timestep, adaLN-single, caption and size MLPs: N(0, 0.02)
        normal = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                  self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        if self.micro_condition:
            normal += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2],
                       self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        for lin in normal:
            _set(lin.weight, rng.normal(0.0, 0.02, tuple(lin.weight.shape)))
        # cross-attention outputs zero (each block starts as its self-attention and MLP); adaLN tables randn / sqrt(D)
        d = self.config.hidden_size
        for block in self.blocks:
            _set(block.cross_attn.proj.weight, np.zeros(tuple(block.cross_attn.proj.weight.shape)))
            _set(block.cross_attn.proj.bias, np.zeros(tuple(block.cross_attn.proj.bias.shape)))
            _set(block.scale_shift_table, rng.standard_normal((6, d)) / math.sqrt(d))
        # the final layer outputs zero at first
        _set(self.final_layer.linear.weight, np.zeros(tuple(self.final_layer.linear.weight.shape)))
        _set(self.final_layer.linear.bias, np.zeros(tuple(self.final_layer.linear.bias.shape)))
        _set(self.final_layer.scale_shift_table, rng.standard_normal((2, d)) / math.sqrt(d))
        # the null caption: randn / sqrt(C_text)
        null = self.y_embedder.y_embedding
        _set(null, rng.standard_normal(tuple(null.shape)) / math.sqrt(null.shape[1]))

    def unpatchify(self, x, h: int, w: int):
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)


def caption_mask(mask, n: int, length: int):
    """A caption mask given as (N, L), (N, 1, 1, L) ... or (1, L) -> (n, length); None stays None."""
    if mask is None:
        return None
    return mask.reshape(mask.shape[0], -1).broadcast_to((n, length))


def _set(param, value: np.ndarray) -> None:
    param.set_data(Tensor(value.astype(np.float32), dtype=param.dtype))


def _xavier(rng, shape) -> np.ndarray:
    fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


#################################################################################
#                          Sine/cosine position embedding                       #
#################################################################################
@lru_cache(maxsize=64)
def get_2d_sincos_pos_embed(dim: int, h: int, w: int, pe_interpolation: float = 1.0, base_size: int = 16):
    """(1, h*w, dim) float32: the first half encodes the column, the second the row, on a grid rescaled to
    `base_size` and divided by `pe_interpolation` (how PixArt shares one embedding across resolutions)."""
    rows = np.arange(h, dtype=np.float32) / (h / base_size) / pe_interpolation
    cols = np.arange(w, dtype=np.float32) / (w / base_size) / pe_interpolation
    col_grid, row_grid = np.meshgrid(cols, rows)  # (h, w) each

    def encode(pos, d):  # (M,) -> (M, d): [sin, cos] at geometric frequencies, float64 like the reference
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(col_grid, dim // 2), encode(row_grid, dim // 2)], axis=1)
    return emb.astype(np.float32)[None]


#################################################################################
#                                    Presets                                    #
#################################################################################
_XL_2 = dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)
_SIGMA_KV = KVCompression("conv", 2, tuple(range(14, 28)))

# name -> (image size, PixArtConfig fields); names are those of the public checkpoints
PRESETS: dict[str, dict] = {
    "PixArt-XL-2-256x256": dict(input_size=32, pe_interpolation=1.0, model_max_length=120),
    "PixArt-XL-2-512x512": dict(input_size=64, pe_interpolation=1.0, model_max_length=120),
    "PixArt-XL-2-1024-MS": dict(input_size=128, pe_interpolation=2.0, model_max_length=120, micro_condition=True),
    "PixArt-Sigma-XL-2-256x256": dict(input_size=32, pe_interpolation=0.5, model_max_length=300),
    "PixArt-Sigma-XL-2-512-MS": dict(input_size=64, pe_interpolation=1.0, model_max_length=300),
    "PixArt-Sigma-XL-2-1024-MS": dict(input_size=128, pe_interpolation=2.0, model_max_length=300),
    "PixArt-Sigma-XL-2-2K-MS": dict(input_size=256, pe_interpolation=4.0, model_max_length=300),
    "PixArt-Sigma-XL-2-1024-MS-KV": dict(input_size=128, pe_interpolation=2.0, model_max_length=300,
                                         kv_compress_config=_SIGMA_KV),
    "PixArt-Sigma-XL-2-2K-MS-KV": dict(input_size=256, pe_interpolation=4.0, model_max_length=300,
                                       kv_compress_config=_SIGMA_KV),
}


def preset_config(name: str, **overrides) -> PixArtConfig:
    """The PixArtConfig of a public checkpoint; `overrides` shrink it for tests (depth=2, hidden_size=...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown PixArt preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {**_XL_2, **PRESETS[name], **overrides}
    return PixArtConfig(**fields)


def build_model(name: str, **overrides) -> PixArt:
    return PixArt(preset_config(name, **overrides))
