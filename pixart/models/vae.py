"""AutoencoderKL: the KL-regularised image autoencoder of Stable Diffusion (Rombach et al. 2022), in MindSpore.

PixArt-α uses the SD VAE (scaling 0.18215), PixArt-Σ the SDXL VAE (scaling 0.13025); both are this architecture and
differ only in config and weights. Parameter names equal HF diffusers' `AutoencoderKL`, so an HF `vae/` folder loads
as is (`load_vae`). Latents here are unscaled: the pipeline divides by `scaling_factor` before `decode`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn, ops
from mindspore.nn.utils import no_init_parameters

from pixart import backend
from pixart.nn import Attention, Conv2d, GroupNorm, Linear
from pixart.io import CheckpointError, load_into, read_config, read_state_dict

EPS = 1e-6


@dataclass
class VAEConfig:
    """The fields of a diffusers `AutoencoderKL` config.json that this model uses (defaults: the SD VAE)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> "VAEConfig":
        """From an HF config dict; refuses other autoencoder classes, block types or activations."""
        name = cfg.get("_class_name", "AutoencoderKL")
        n = len(cfg.get("block_out_channels", cls.block_out_channels))
        problems = [f"_class_name {name!r} (expected 'AutoencoderKL')"] if name != "AutoencoderKL" else []
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in cfg and list(cfg[key]) != [want] * n:
                problems.append(f"{key} {cfg[key]} (expected {n} x {want!r})")
        if cfg.get("act_fn", "silu") != "silu":
            problems.append(f"act_fn {cfg['act_fn']!r} (expected 'silu')")
        if problems:
            raise CheckpointError("unsupported VAE config: " + "; ".join(problems))
        kw = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(**kw)


def _norm(norm, x):
    """GroupNorm in fp32 (its parameters stay fp32 when the rest is fp16), result back in x's dtype."""
    return norm(x.astype(ms.float32)).astype(x.dtype)


def _norm_silu(norm, x):
    """SiLU(GroupNorm(x)), the norm in fp32 (one fused kernel with pixart.cpu.accelerate)."""
    return norm.silu(x.astype(ms.float32)).astype(x.dtype)


#################################################################################
#                                 Building blocks                               #
#################################################################################
class ResnetBlock(nn.Cell):
    """(GroupNorm, SiLU, 3x3 conv) twice plus the input; a 1x1 `conv_shortcut` where the channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, EPS)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(groups, cout, EPS)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def construct(self, x):
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the H*W positions of (B, C, H, W), GroupNorm first, residual added."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, EPS)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.CellList([Linear(channels, channels)])
        self.attn = Attention(1, channels)

    def construct(self, x):
        b, c, h, w = x.shape
        t = _norm(self.group_norm, x).reshape(b, c, h * w).transpose(0, 2, 1)  # (B, HW, C)
        o = self.to_out[0](self.attn(self.to_q(t), self.to_k(t), self.to_v(t)))  # (B, HW, C)
        return x + o.transpose(0, 2, 1).reshape(b, c, h, w)


class Downsample(nn.Cell):
    """(B, C, H, W) -> (B, C, H/2, W/2): zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour doubling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h, 1, w, 1).broadcast_to((b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class ResnetStack(nn.Cell):
    """`resnets` then an optional `downsamplers.0` / `upsamplers.0` (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.CellList([Downsample(cout)]) if resample == "down" else None
        self.upsamplers = nn.CellList([Upsample(cout)]) if resample == "up" else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Cell):
    """resnet, attention (optional), resnet, all at C channels."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.CellList([AttnBlock(channels, groups)]) if attention else None

    def construct(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Cell):
    """Image (B, in, H, W) -> moments (B, 2 * latent, H/f, W/f), f = 2 ** (len(block_out_channels) - 1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.CellList([
            ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < len(ch) - 1 else None)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(_norm_silu(self.conv_norm_out, x))


class Decoder(nn.Cell):
    """Latent (B, latent, h, w) -> image (B, out, h*f, w*f); up blocks run the channels in reverse."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.CellList([
            ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_norm_silu(self.conv_norm_out, x))


#################################################################################
#                                  The model                                    #
#################################################################################
class AutoencoderKL(nn.Cell):
    """Encoder + `quant_conv` -> Gaussian moments; `post_quant_conv` + decoder -> image. `construct` decodes."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def compute_dtype(self):
        return self.decoder.conv_in.weight.dtype

    def construct(self, z):
        """The decode graph: latent (B, L, h, w) in the compute dtype -> image (B, out, h*f, w*f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x):
        """Image (B, in, H, W) in [-1, 1] -> (mean, logvar), each (B, L, H/f, W/f) fp32, logvar in [-30, 20]."""
        m = self.encoder(x.astype(self.compute_dtype))
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        m = m.astype(ms.float32)
        mean, logvar = m[:, :self.latent_channels], m[:, self.latent_channels:]
        return mean, ops.clamp(logvar, -30.0, 20.0)

    @staticmethod
    def sample(mean, logvar, noise):
        """A draw from the posterior N(mean, exp(logvar)) given standard-normal `noise` of mean's shape."""
        return mean + ops.exp(0.5 * logvar) * noise

    def decode(self, z):
        """Unscaled latent (B, L, h, w) -> image (B, out, h*f, w*f) fp32, roughly in [-1, 1]."""
        return self(z.astype(self.compute_dtype)).astype(ms.float32)

    def decode_tiled(self, z, tile: int = 64, overlap: int = 16):
        """`decode` in tile x tile latent windows at stride tile - overlap, seams blended linearly over
        overlap * f image pixels (diffusers' `tiled_decode` with tile_latent_min_size=tile,
        tile_overlap_factor=overlap/tile). Attention then spans tile**2 tokens, so 2K/4K decodes fit in memory."""
        if not 0 <= overlap < tile:
            raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        _, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        stride, f = tile - overlap, self.downsample_factor
        blend, keep = overlap * f, stride * f
        rows, above = [], None
        for i in range(0, h, stride):
            row = []
            for j in range(0, w, stride):
                t = self.decode(z[:, :, i:i + tile, j:j + tile])
                if above is not None:
                    t = _blend(above[len(row)], t, blend, 2)
                if row:
                    t = _blend(row[-1], t, blend, 3)
                row.append(t)  # kept blended, as the next tiles blend from it
            rows.append(mint.cat([t[:, :, :keep, :keep] for t in row], 3))
            above = row
        return mint.cat(rows, 2)


def _blend(a, b, extent: int, axis: int):
    """b with its first `extent` rows (axis 2) or columns (axis 3) faded in from a's last ones, linearly."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = e
    wb = Tensor((np.arange(e, dtype=np.float32) / e).reshape(shape)).astype(b.dtype)
    if axis == 2:
        return mint.cat([a[:, :, -e:] * (1 - wb) + b[:, :, :e] * wb, b[:, :, e:]], 2)
    return mint.cat([a[:, :, :, -e:] * (1 - wb) + b[:, :, :, :e] * wb, b[:, :, :, e:]], 3)


#################################################################################
#                                    Loading                                    #
#################################################################################
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_legacy_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers VAE files name the mid-block attention `query/key/value/proj_attn` and some store its weights
    as 1x1 convs (C, C, 1, 1); rename to `to_q/to_k/to_v/to_out.0` and reshape to (C, C). Other keys pass as is."""
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            *path, layer, kind = key.split(".")
            key = ".".join([*path, _LEGACY_ATTENTION.get(layer, layer), kind])
            if layer != "group_norm" and value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def load_vae(folder, dtype: str = "fp32") -> AutoencoderKL:
    """An HF diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors, sharded too), strictly loaded.

    dtype "fp16"/"bf16" casts everything but the GroupNorms (kept fp32); fp16 is known to overflow in the SDXL VAE
    (PixArt-Σ), hence the fp32 default.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"VAE folder not found: {folder}")
    ms_dtype = backend.dtype(dtype)
    with no_init_parameters():  # every weight comes from the folder (strict load below)
        model = AutoencoderKL(VAEConfig.from_dict(read_config(folder)))
    if ms_dtype != ms.float32:
        for _, cell in model.cells_and_names():
            if not isinstance(cell, mint.nn.GroupNorm):
                for p in cell.get_parameters(expand=False):
                    p.set_dtype(ms_dtype)
    load_into(model, convert_legacy_attention(read_state_dict(folder)), what=f"VAE in {folder}", share=True)
    model.set_train(False)
    return model
