"""PixArt-δ ControlNet (Chen et al. 2024, "PixArt-δ", section ControlNet-Transformer), in MindSpore.

The "ControlNet-Half" design of the official `ControlPixArtHalf` / `ControlPixArtMSHalf`:

- the base PixArt stays frozen; its first N blocks (N = 13 of 28) are copied into a trainable control branch;
- the condition image (an edge map: HED in the official checkpoint) is VAE-encoded to latents, which enter through
  the base model's own patch embedding and position embedding (the tokens of `PixArt.embed`), not a new encoder;
- control block 0 adds those condition tokens, through a zero-initialised linear `before_proj`, to the image tokens
  after base block 0; control block i then runs the copied block i on the control stream, and its output, through a
  zero-initialised linear `after_proj`, is added to the input of base block i + 1:

      x_1 = B_0(x_0)                  c_0 = C_0(x_1 + before_proj(E(condition)))
      x_{i+1} = B_i(x_i + s * after_proj(c_{i-1}))   for i = 1..N,   c_i = C_i(c_{i-1})
      x_{i+1} = B_i(x_i)                               for i > N

  where B_i are the base blocks, C_i their copies, E the patch + position embedding and s the control scale (1 as
  trained; the official code has no scale). Every block, base or copy, takes the same timestep / micro-condition
  input t0 (adaLN-single) and the same caption tokens (each block its own cross-attention keys and values).
- At initialisation both projections are zero, so the model is exactly the base model until training moves them.

Parameter names equal the official checkpoint's: `base_model.<PixArt names>`, `controlnet.<i>.copied_block.<PixArt
block names>`, `controlnet.0.before_proj.{weight,bias}`, `controlnet.<i>.after_proj.{weight,bias}`. Our ControlNet
`.ckpt` holds the control branch only (`controlnet.*`); the base comes from its own checkpoint.

α-1024-MS and Σ: nothing in the control branch depends on the base's family. Micro-conditions enter t0, which the
copies share; Σ's longer captions only lengthen the caption tokens; a copied block keeps its base block's KV
compression. Hence one class and the presets below.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.common.initializer import initializer

from pixart.nn import Linear, Method
from pixart.models.pixart import PixArt, PixArtBlock, PixArtConfig, caption_mask, preset_config

# the official checkpoints copy the first 13 of 28 blocks
COPY_BLOCKS = 13
FULL_DEPTH = 28

# name -> (base preset, copied blocks). The α ones are the official PixArt-δ checkpoints (HED edges); the Σ ones are
# the same construction on a Σ base (no official weights: trained here with train.py --controlnet).
CONTROLNET_PRESETS: dict[str, tuple[str, int]] = {
    "PixArt-XL-2-1024-ControlNet": ("PixArt-XL-2-1024-MS", COPY_BLOCKS),
    "PixArt-XL-2-512-ControlNet": ("PixArt-XL-2-512x512", COPY_BLOCKS),
    "PixArt-Sigma-XL-2-512-MS-ControlNet": ("PixArt-Sigma-XL-2-512-MS", COPY_BLOCKS),
    "PixArt-Sigma-XL-2-1024-MS-ControlNet": ("PixArt-Sigma-XL-2-1024-MS", COPY_BLOCKS),
}


def default_copy_blocks(depth: int) -> int:
    """How many blocks a fresh control branch copies from a base of `depth` blocks: 13 for the full 28, and for a
    reduced copy (tests, small experiments) the same fraction, round(depth * 13 / 28), at least 1 and at most
    depth - 1 (control block i feeds base block i + 1, which must exist)."""
    if depth == FULL_DEPTH:
        return COPY_BLOCKS
    return max(1, min(depth - 1, round(depth * COPY_BLOCKS / FULL_DEPTH)))


def _zero_linear(dim: int) -> Linear:
    """A D -> D linear layer whose weight and bias start at zero (lazily: no memory until used)."""
    layer = Linear(dim, dim)
    layer.weight = ms.Parameter(initializer("zeros", (dim, dim), ms.float32), name="weight")
    layer.bias = ms.Parameter(initializer("zeros", (dim,), ms.float32), name="bias")
    return layer


class ControlBlock(nn.Cell):
    """A control block (the official `ControlT2IDitBlockHalf`): a copy of base block `index`, with the zero
    projections `before_proj` (block 0 only: brings the condition in) and `after_proj` (the residual it gives the
    base)."""

    def __init__(self, config: PixArtConfig, index: int):
        super().__init__()
        kv = config.kv_compress_config
        self.index = index
        self.copied_block = PixArtBlock(config.hidden_size, config.num_heads, config.mlp_ratio, kv.sampling,
                                        kv.ratio(index), config.qk_norm)
        if index == 0:
            self.before_proj = _zero_linear(config.hidden_size)
        self.after_proj = _zero_linear(config.hidden_size)

    def construct(self, x, c, caption_kv, t0, mask, hw):
        """x (N, T, D) the base's tokens (read by block 0 only); c (N, T, D) the control stream: for block 0 the
        embedded condition. Returns (the next control stream, the residual for the base) (N, T, D) each."""
        if self.index == 0:
            c = x + self.before_proj(c)  # (N, T, D)
        c = self.copied_block(c, caption_kv, t0, mask, hw)  # (N, T, D)
        return c, self.after_proj(c)


class ControlPixArt(nn.Cell):
    """A frozen PixArt (`base_model`) steered by a control branch (`controlnet`) of copies of its first
    `copy_blocks_num` blocks. The sampling interface is PixArt's (`encode_caption`, `denoise`, `sampler_parts`) with
    the condition latents and the control scale as two more inputs of `denoise`; `config`, `micro_condition`,
    `patch_size` and `y_embedder` are the base's, so pipelines use it where they use a PixArt."""

    def __init__(self, base_model: PixArt, copy_blocks_num: int | None = None):
        super().__init__()
        depth = base_model.config.depth
        copy_blocks_num = default_copy_blocks(depth) if copy_blocks_num is None else int(copy_blocks_num)
        if not 1 <= copy_blocks_num < depth:
            raise ValueError(f"a ControlNet copies 1 to {depth - 1} blocks of a {depth}-block base (each control "
                             f"block feeds the next base block), got {copy_blocks_num}")
        self.base_model = base_model
        self.copy_blocks_num = copy_blocks_num
        self.controlnet = nn.CellList([ControlBlock(base_model.config, i) for i in range(copy_blocks_num)])
        self.compiled_parts = {}  # `sampler_parts` in graph mode (a dict: not sub-Cells)

    # the base's description, for pipelines
    @property
    def config(self) -> PixArtConfig:
        return self.base_model.config

    @property
    def micro_condition(self) -> bool:
        return self.base_model.micro_condition

    @property
    def patch_size(self) -> int:
        return self.base_model.patch_size

    @property
    def y_embedder(self):
        return self.base_model.y_embedder

    def initialize_from_base(self) -> None:
        """Training's start (the official initialisation): each copied block takes its base block's weights, and both
        projections are zero, so the model computes exactly what the base does."""
        for i, block in enumerate(self.controlnet):  # the same block class and settings: parameters in one order
            for source, copy in zip(self.base_model.blocks[i].get_parameters(), block.copied_block.get_parameters()):
                copy.set_data(source.value().copy())
            for proj in (getattr(block, "before_proj", None), block.after_proj):
                if proj is not None:
                    for p in (proj.weight, proj.bias):
                        p.set_data(Tensor(np.zeros(tuple(p.shape), np.float32), dtype=p.dtype))

    def control_parameters(self) -> list:
        """The trainable parameters: the control branch's (the base stays frozen)."""
        return list(self.controlnet.get_parameters())

    def construct(self, x, timestep, y, mask=None, data_info=None, force_drop_ids=None, condition=None,
                  control_scale: float = 1.0):
        """PixArt's forward (see `PixArt.construct`, the same first six inputs) with `condition` (N or 1, C, H, W),
        the condition image's VAE latents (scaled like the image latents) at the latents' size; None or
        `control_scale` 0: the base alone."""
        return self.denoise(x, timestep, self.encode_caption(y, force_drop_ids), mask, data_info, condition,
                            control_scale)

    def encode_caption(self, y, force_drop_ids=None):
        """T5 features -> the cross-attention keys and values of every base block, then of every control block."""
        caption = self.base_model.embed_caption(y, force_drop_ids)  # (N, L, D)
        base = tuple(block.cross_attn.caption_kv(caption) for block in self.base_model.blocks)
        return base + tuple(block.copied_block.cross_attn.caption_kv(caption) for block in self.controlnet)

    def denoise(self, x, timestep, caption_kv, mask=None, data_info=None, condition=None, control_scale: float = 1.0):
        """`encode_caption`'s keys and values, latents (N, C, H, W) and the condition latents -> (N, C_out, H, W)."""
        base = self.base_model
        depth = len(base.blocks)
        hw = base.token_grid(x)
        mask = caption_mask(mask, x.shape[0], caption_kv[0].shape[1])
        x, t, t0 = base.embed(x, timestep, data_info)  # (N, T, D), (N, D), (N, 6D)
        x = base.blocks[0](x, caption_kv[0], t0, mask, hw)  # (N, T, D)
        first = 1
        if condition is not None and control_scale != 0:
            condition = condition.broadcast_to((x.shape[0],) + tuple(condition.shape[1:]))
            c = base.embed(condition, timestep, data_info)[0]  # (N, T, D): the base's own patch and position embedding
            for i, block in enumerate(self.controlnet):
                c, residual = block(x, c, caption_kv[depth + i], t0, mask, hw)
                x = base.blocks[i + 1](x + residual * control_scale, caption_kv[i + 1], t0, mask, hw)
            first = self.copy_blocks_num + 1
        for i in range(first, depth):
            x = base.blocks[i](x, caption_kv[i], t0, mask, hw)  # (N, T, D)
        return base.final(x, t, hw)

    def sampler_parts(self):
        """(encode_caption, denoise) for sampling, as `PixArt.sampler_parts`: compiled on their own in graph mode
        (denoise takes the condition and the scale as its 6th and 7th inputs), the methods in PyNative."""
        if ms.get_context("mode") != ms.GRAPH_MODE:
            return self.encode_caption, self.denoise
        if not self.compiled_parts:
            self.compiled_parts.update(encode_caption=Method(self, "encode_caption"), denoise=Method(self, "denoise"))
        encode = self.compiled_parts["encode_caption"]
        return (lambda y, force_drop_ids=None: ms.mutable(encode(y, force_drop_ids))), self.compiled_parts["denoise"]


@dataclasses.dataclass
class ControlNetConfig:
    """What a ControlNet checkpoint is: the base it was made for (its architecture and, when known, its preset)
    and how many blocks it copies."""
    base: PixArtConfig
    copy_blocks_num: int
    base_preset: str | None = None


def controlnet_preset(name: str, **overrides) -> ControlNetConfig:
    """The ControlNetConfig of a preset; `overrides` shrink the base for tests (depth=4, hidden_size=...), and then
    the copied blocks follow `default_copy_blocks` unless `copy_blocks_num` is among them."""
    if name not in CONTROLNET_PRESETS:
        raise ValueError(f"unknown ControlNet preset {name!r}; choose one of: {', '.join(CONTROLNET_PRESETS)}")
    base_name, copies = CONTROLNET_PRESETS[name]
    copies = overrides.pop("copy_blocks_num", None) or (copies if "depth" not in overrides
                                                        else default_copy_blocks(overrides["depth"]))
    return ControlNetConfig(preset_config(base_name, **overrides), copies, base_name)


def build_controlnet(name: str, **overrides) -> ControlPixArt:
    """A ControlNet preset with a fresh base (random weights) and a control branch initialised from it."""
    cfg = controlnet_preset(name, **overrides)
    net = ControlPixArt(PixArt(cfg.base), cfg.copy_blocks_num)
    net.initialize_from_base()
    return net

