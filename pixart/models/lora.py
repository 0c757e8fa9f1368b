"""LoRA (Hu et al. 2021) for the PixArt transformer: low-rank updates W + s * (alpha / r) * B A on its linear layers
and its patch convolution.

Layers, in the order a user meets them: `LoRALinear` (a frozen Linear plus one low-rank branch per output slice),
`LoRAConv2d` (the patch convolution `x_embedder.proj`, diffusers' `pos_embed.proj`, as peft adapts a convolution),
`inject_lora` and `initialize_lora` (fresh LoRA for training), `save_lora` / `read_lora` / `load_lora` (files in
diffusers' and peft's layouts, and ours), `copy_lora_weights` (a saved LoRA back into injected layers: resuming training),
`merge_lora` / `unmerge_lora` (in a model) and `merge_lora_file` (into a `.ckpt`).

Our `attn.qkv` and `cross_attn.kv_linear` fuse what diffusers splits (`attn1.to_q/to_k/to_v`, `attn2.to_k/to_v`).
A rank-r LoRA on the fused layer is in general no sum of three rank-r LoRAs on its slices, so a fused layer carries
one independent branch per slice (`lora_A.q`, `lora_B.q`, ...): diffusers LoRAs load exactly and ours save exactly.
Module names are translated by `pixart.io.keymap`'s tables, the one source of truth for diffusers <-> original.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from pixart.nn import Conv2d, Linear
from pixart.io import (CheckpointError, describe_mismatch, diffusers_module_to_original, fused_slices,
                       original_module_to_diffusers, read_safetensors_metadata, read_state_dict, write_safetensors)
from pixart.models.convert import fill_null_caption, read_pixart, resolve_config, save_pixart

# our module names, matched as name suffixes (`attn.proj` hits `blocks.N.attn.proj`, not `blocks.N.cross_attn.proj`)
BLOCK_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                 "mlp.fc1", "mlp.fc2")
EXTRA_TARGETS = ("t_block.1", "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2")  # adaLN-single, caption projection
DEFAULT_TARGETS = BLOCK_TARGETS
CONV_MODULES = ("x_embedder.proj",)  # the patch embedding (diffusers' pos_embed.proj): peft's convolution LoRA

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' `save_lora_weights`
PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"  # peft's `save_pretrained`
METADATA_KEY = "lora_adapter_metadata"  # diffusers keeps the LoraConfig (r, lora_alpha, patterns) here, as JSON
PREFIX = "transformer."  # diffusers pipelines prefix the transformer's LoRA keys with its component name
# every prefix a producer puts before the module name, stripped in this order: mindone's LoRA script saves through
# StableDiffusionPipeline.save_lora_weights(unet_lora_layers=...) a peft model's state, hence `unet.base_model.model.`
KEY_PREFIXES = ("unet.", PREFIX, "base_model.model.")


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------
class _Branches:
    """The low-rank branches of a LoRA layer and their bookkeeping (shared by `LoRALinear` and `LoRAConv2d`): per
    output slice i an A_i (r_i, in) and a B_i (out / slices, r_i), scaling alpha_i / r_i (/ sqrt r_i with rsLoRA)."""

    def _init_branches(self, parts, ranks: dict[str, int], alphas: dict[str, float], dropout: float, rslora: bool,
                       in_width: int, out_width: int, dtype) -> None:
        self.parts = tuple(parts) or ("",)
        if out_width % len(self.parts):
            raise ValueError(f"{out_width} outputs do not split into {len(self.parts)} slices")
        self.part_size = out_width // len(self.parts)
        self.branch_parts = tuple(p for p in self.parts if p in ranks)  # slices with a branch, in output order
        if not self.branch_parts:
            raise ValueError(f"no LoRA branch for any of the slices {self.parts}")
        self.ranks = {p: int(ranks[p]) for p in self.branch_parts}
        self.alphas = {p: float(alphas[p]) for p in self.branch_parts}
        self.rslora = rslora
        self.scalings = tuple(self.alphas[p] / (math.sqrt(self.ranks[p]) if rslora else self.ranks[p])
                              for p in self.branch_parts)
        # output slice i -> its branch index, or -1 when that slice has none (a LoRA on to_q and to_v only)
        self.layout = tuple(self.branch_parts.index(p) if p in self.ranks else -1 for p in self.parts)

        def name(kind, part):
            return f"lora_{kind}.{part}" if part else f"lora_{kind}"
        # peft's initialisation: A Kaiming-uniform (a = sqrt 5, as nn.Linear), B zero, so a fresh LoRA changes nothing
        self.lora_A = ParameterTuple([
            Parameter(initializer(HeUniform(math.sqrt(5)), (self.ranks[p], in_width), dtype), name=name("A", p))
            for p in self.branch_parts])
        self.lora_B = ParameterTuple([
            Parameter(initializer("zeros", (self.part_size, self.ranks[p]), dtype), name=name("B", p))
            for p in self.branch_parts])
        self.lora_scale = Parameter(Tensor(1.0, ms.float32), name="lora_scale", requires_grad=False)
        self.scale, self.merged = 1.0, False  # host-side state for merge / unmerge
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None

    def deltas(self, scale: float) -> list[tuple[int, np.ndarray]]:
        """(first output row, scale * alpha/r * B @ A in float64) per branch: what merging adds to `weight` (a
        convolution's weight seen as (out, in * kh * kw))."""
        out = []
        for j, part in enumerate(self.branch_parts):
            a = self.lora_A[j].asnumpy().astype(np.float64)
            b = self.lora_B[j].asnumpy().astype(np.float64)
            out.append((self.parts.index(part) * self.part_size, scale * self.scalings[j] * (b @ a)))
        return out


class LoRALinear(_Branches, Linear):
    """y = x W^T + b + s * [B_i A_i dropout(x)]_i: a Linear whose output slices i (q, k, v of a fused layer; the
    whole output otherwise) each may carry a low-rank branch with its own rank and scaling alpha_i / r_i.

    Takes over the base layer's `weight` and `bias` Parameters, so checkpoint names stay `...qkv.weight`, and its
    activation if it has one (applied after the update, as peft applies it after the wrapped Linear). The user
    scale s lives in a non-trainable Parameter (`lora_scale`): a compiled graph reads it at every call, so scale
    changes and merging (s = 0 while merged) need no recompilation.
    """

    def __init__(self, base: Linear, parts: tuple[str, ...], ranks: dict[str, int], alphas: dict[str, float],
                 dropout: float = 0.0, rslora: bool = False):
        # Linear.__init__'s attributes, but the base's Parameters: a second random init of a 1152 x 4608 weight per
        # layer would cost seconds at full size
        nn.Cell.__init__(self)
        for key, value in vars(base).items():  # the base's settings (plain attributes), whatever they are
            if not key.startswith("_") and key not in vars(self):
                setattr(self, key, value)
        self.weight, self.bias = base.weight, base.bias
        self.activation = base.activation  # applied after the update (`epilogue`)
        self.matmul = ops.MatMul(transpose_b=True)
        self._init_branches(parts, ranks, alphas, dropout, rslora, self.in_features, self.out_features,
                            base.weight.dtype)

    def construct(self, x):
        h = x.reshape(-1, self.in_features)  # (M, in)
        y = self.product(h)  # (M, out): x W^T, as the base layer computes it (+ b where its kernel adds it)
        if self.dropout is not None:
            h = self.dropout(h)
        scale = self.lora_scale.astype(h.dtype)
        pieces = []
        for i in range(len(self.layout)):
            j = self.layout[i]
            if j >= 0:  # scalars scale A (r, in), never an output-sized tensor (graph-mode memory, see nn.expand_as)
                down = self.matmul(h, self.lora_A[j] * (scale * self.scalings[j]))  # (M, r)
                pieces.append(self.matmul(down, self.lora_B[j]))  # (M, out / parts)
            else:
                pieces.append(ops.zeros((h.shape[0], self.part_size), h.dtype))
        delta = ops.cat(pieces, -1) if len(pieces) > 1 else pieces[0]  # (M, out)
        return self.epilogue(y + delta, x.shape)  # + b, and the base layer's activation (fused as the base's)


class LoRAConv2d(_Branches, Conv2d):
    """y = conv(x, W) + b + s * conv1x1(conv(dropout(x), A), B), peft's LoRA of a convolution: A a convolution with
    the base's kernel, stride and padding down to r channels, B a 1 x 1 convolution up to the outputs. Stored as
    matrices, A (r, in * kh * kw) and B (out, r), so merging is W + s * alpha/r * B A reshaped to W's kernel. Takes
    over the base's Parameters, as `LoRALinear` does."""

    def __init__(self, base: Conv2d, ranks: dict[str, int], alphas: dict[str, float], dropout: float = 0.0,
                 rslora: bool = False):
        nn.Cell.__init__(self)
        if base.groups != 1:
            raise ValueError("a LoRA on a grouped convolution is not supported")
        self.stride, self.padding, self.groups, self.use_mint = base.stride, base.padding, 1, base.use_mint
        self.weight, self.bias = base.weight, base.bias
        self.out_channels, *self.kernel = (int(d) for d in base.weight.shape)  # (out, in, kh, kw)
        self.out_features, self.in_features = self.out_channels, int(np.prod(self.kernel))  # the matrix view
        self._init_branches(("",), ranks, alphas, dropout, rslora, self.in_features, self.out_features,
                            base.weight.dtype)

    def construct(self, x):
        y = Conv2d.construct(self, x)  # (N, out, h, w)
        h = self.dropout(x) if self.dropout is not None else x
        scale = self.lora_scale.astype(x.dtype) * self.scalings[0]
        rank = self.lora_A[0].shape[0]
        down_kernel = (self.lora_A[0] * scale).reshape(rank, self.kernel[0], self.kernel[1], self.kernel[2])
        pad_mode = "pad" if self.padding else "valid"
        down = ops.conv2d(h, down_kernel, None, self.stride, pad_mode, self.padding, 1, 1)  # (N, r, h, w)
        up = ops.conv2d(down, self.lora_B[0].reshape(self.out_channels, rank, 1, 1), None, 1, "valid", 0, 1, 1)
        return y + up  # (N, out, h, w)


# ----------------------------------------------------------------------------------------------------------------
# Injecting fresh LoRA (training), finding and exporting LoRA layers
# ----------------------------------------------------------------------------------------------------------------
def linear_layers(model) -> dict[str, Linear | Conv2d]:
    """Every layer of `model` a LoRA can target (LoRA layers included) by module name, e.g. `blocks.0.attn.qkv`:
    its Linears and its patch convolution (CONV_MODULES)."""
    return {name: cell for name, cell in model.cells_and_names()
            if name and (isinstance(cell, Linear) or (isinstance(cell, Conv2d) and name in CONV_MODULES))}


def lora_layers(model) -> dict[str, LoRALinear | LoRAConv2d]:
    return {name: cell for name, cell in linear_layers(model).items() if isinstance(cell, _Branches)}


def _lora_layer(module: str, base, ranks: dict[str, int], alphas: dict[str, float], dropout: float = 0.0,
                rslora: bool = False):
    """The LoRA layer over `base` (our module `module`): one branch per slice of a fused Linear, else one."""
    if isinstance(base, Conv2d):
        return LoRAConv2d(base, ranks, alphas, dropout, rslora)
    return LoRALinear(base, fused_slices(module) or ("",), ranks, alphas, dropout, rslora)


def layer_shapes(model) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of the LoRA targets, a convolution as the Linear it is on flattened patches."""
    return {n: ((c.out_features, c.in_features) if isinstance(c, (Linear, _Branches)) else
                (int(c.weight.shape[0]), int(np.prod(c.weight.shape[1:])))) for n, c in linear_layers(model).items()}


_HAS_LORA = ("the model already has LoRA layers; build it afresh to apply another LoRA (or merge both into a "
             "checkpoint with tools/merge_lora.py, one after the other)")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_lora(model, rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                targets=DEFAULT_TARGETS, freeze_base: bool = True, rslora: bool = False) -> list[Parameter]:
    """Put a fresh LoRA (A random, B zero: the model's output is unchanged) on every Linear whose name ends with
    one of `targets` (see BLOCK_TARGETS, EXTRA_TARGETS); alpha defaults to rank (scaling 1). With `freeze_base`
    every other parameter stops requiring gradients. Returns the LoRA parameters, the ones to optimise.

    In graph mode inject before the model's first call: a compiled graph does not see layers added later."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if lora_layers(model):
        raise ValueError(_HAS_LORA)
    layers = linear_layers(model)
    unmatched = [t for t in targets if not any(_matches(n, t) for n in layers)]
    if unmatched:
        kinds = sorted({re.sub(r"^blocks\.\d+\.", "", n) for n in layers})
        raise ValueError(f"LoRA targets match no linear layer: {', '.join(unmatched)}; choose from {', '.join(kinds)}")
    alpha = float(rank if alpha is None else alpha)
    for name, layer in layers.items():
        if any(_matches(name, t) for t in targets):
            parts = fused_slices(name) or ("",)
            _replace(model, name, _lora_layer(name, layer, {p: rank for p in parts}, {p: alpha for p in parts},
                                              dropout, rslora))
    if freeze_base:
        for p in model.get_parameters():
            p.requires_grad = _is_lora_param(p.name)
    return lora_parameters(model)


def initialize_lora(params, seed: int) -> None:
    """Fresh LoRA branches as peft initialises them (A Kaiming-uniform with a = sqrt 5, i.e. U(+-1/sqrt(in)); B zero,
    so training starts from the base model exactly), from a seeded NumPy generator: every rank starts equal."""
    rng = np.random.default_rng([seed, 0x10AA])
    for p in params:
        shape = tuple(p.shape)
        if ".lora_A" in p.name:
            bound = 1.0 / math.sqrt(shape[1])
            value = rng.uniform(-bound, bound, shape)
        else:
            value = np.zeros(shape)
        p.set_data(Tensor(value.astype(np.float32), dtype=p.dtype))


def _is_lora_param(name: str) -> bool:
    return re.search(r"\.lora_[AB](\.\w+)?$", name) is not None


def _replace(model, name: str, cell) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = dict(model.cells_and_names())[parent_name] if parent_name else model
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(child)] = cell
    else:
        setattr(parent, child, cell)
    cell.update_parameters_name(name + ".")  # setattr prefixes only the attribute name, not the whole path


def lora_parameters(model) -> list[Parameter]:
    """The trainable LoRA parameters (A and B of every branch)."""
    return [p for p in model.get_parameters() if _is_lora_param(p.name)]


def lora_state_dict(model) -> dict[str, np.ndarray]:
    """LoRA weights under our parameter names (`blocks.0.attn.qkv.lora_A.q`, `blocks.0.attn.proj.lora_B`)."""
    return {p.name: p.asnumpy() for p in lora_parameters(model)}


def base_state_dict(model) -> dict[str, np.ndarray]:
    """The model's own weights (merged ones when merged), without LoRA parameters: what a full `.ckpt` holds."""
    return {p.name: p.asnumpy() for p in model.get_parameters()
            if not _is_lora_param(p.name) and not p.name.endswith(".lora_scale")}


# ----------------------------------------------------------------------------------------------------------------
# LoRA weights independent of a model: what a file holds, checked against the layers it names
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoRABranch:
    """One low-rank update: on output slice `part` (q / k / v, or '' for the whole output) of our layer `module`."""
    module: str
    part: str
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out / slices, r)
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass
class LoRAWeights:
    branches: list[LoRABranch]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def by_module(self) -> dict[str, list[LoRABranch]]:
        out: dict[str, list[LoRABranch]] = {}
        for b in self.branches:
            out.setdefault(b.module, []).append(b)
        return out


# module.lora_A.weight (diffusers, peft files), module.lora_A.<adapter>.weight (peft in memory), module.lora_A[.q]
# (ours), module.lora.down.weight (old diffusers), module.alpha (per-module alpha of kohya-style files)
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B)(?:\.(?P<sub>(?!weight$)\w+))?(?P<w>\.weight)?"
                  r"|lora\.(?P<old>down|up)\.weight|(?P<alpha>alpha))$")


def _pattern_key(patterns, name: str):
    """peft's `get_pattern_key`: the first pattern that matches the end of `name` at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _file_and_config(path: Path) -> tuple[Path, dict | None]:
    """The weight file of a LoRA (a file, or a folder from diffusers / peft / us) and its adapter config."""
    if path.is_dir():
        for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, "pytorch_lora_weights.bin", "adapter_model.bin"):
            if (path / name).exists():
                path = path / name
                break
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(f"{path}: no LoRA weights found (looked for {LORA_WEIGHT_NAME}, "
                                      f"{PEFT_WEIGHT_NAME}{' or a single .safetensors' if not found else ''}"
                                      f"{'; found several .safetensors' if found else ''})")
            path = found[0]
    elif not path.exists():
        raise CheckpointError(f"LoRA not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        raw = read_safetensors_metadata(path).get(METADATA_KEY)
        if raw:
            try:
                config = json.loads(raw)
            except ValueError:
                raise CheckpointError(f"{path}: its {METADATA_KEY} metadata is not JSON") from None
    if config is None and (path.parent / PEFT_CONFIG_NAME).exists():
        try:
            config = json.loads((path.parent / PEFT_CONFIG_NAME).read_text())
        except ValueError:
            raise CheckpointError(f"{path.parent / PEFT_CONFIG_NAME}: not JSON") from None
    if config and any(k.startswith(PREFIX) for k in config):  # diffusers pipelines prefix the metadata keys too
        config = {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}
    return path, config


def read_lora(source, shapes: dict[str, tuple[int, int]], log=print) -> LoRAWeights:
    """Read a LoRA (file or folder; diffusers / peft / our names) and check it against our linear layers `shapes`
    ({module: (out, in)}). Every key naming a module we lack, every missing half and every shape that does not fit
    is collected into one CheckpointError."""
    path, config = _file_and_config(Path(source))
    state = read_state_dict(path)
    config = config or {}
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: DoRA adapters (use_dora) are not supported, only plain LoRA")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    halves: dict[tuple[str, str], dict] = {}  # (our module, part) -> {"A"/"B": (file key, array), "name": ...}
    alphas: dict[str, float] = {}  # file module name -> per-module alpha (`.alpha` keys, kohya / old diffusers)
    unexpected, missing, mismatched = [], [], []
    for key, value in state.items():
        bare = key
        for prefix in KEY_PREFIXES:
            bare = bare[len(prefix):] if bare.startswith(prefix) else bare
        m = _KEY.match(bare)
        if not m:
            unexpected.append(key)
            continue
        module = m["module"]
        if m["alpha"]:
            alphas[module] = float(np.asarray(value).reshape(-1)[0])
            continue
        kind = {"down": "A", "up": "B"}.get(m["old"]) or m["kind"][-1]
        mapped = diffusers_module_to_original(module)
        if mapped is not None and (m["w"] or m["old"]):  # diffusers / peft names
            ours, index, _ = mapped
            parts = fused_slices(ours)
            part = parts[index] if index is not None else ""
            file_name = module
        elif mapped is None and not m["w"] and not m["old"]:  # ours: blocks.0.attn.qkv.lora_A.q
            ours, part, file_name = module, m["sub"] or "", module + (f".{m['sub']}" if m["sub"] else "")
            if part not in (fused_slices(ours) or ("",)):
                unexpected.append(key)
                continue
        else:
            unexpected.append(key)
            continue
        if ours not in shapes:
            unexpected.append(key)
            continue
        entry = halves.setdefault((ours, part), {"name": file_name})
        entry[kind] = (key, np.asarray(value))
    if not halves and not unexpected:
        raise CheckpointError(f"{path}: no LoRA weights in it (expected keys ending in lora_A.weight / lora_B.weight)")

    branches = []
    for (module, part), entry in halves.items():
        if "A" not in entry or "B" not in entry:
            have = entry.get("A") or entry.get("B")
            other = have[0].replace("lora_A", "lora_B").replace("lora.down", "lora.up") if "A" in entry else \
                have[0].replace("lora_B", "lora_A").replace("lora.up", "lora.down")
            missing.append(other)
            continue
        (ka, a), (kb, b) = entry["A"], entry["B"]
        if a.ndim == 4 and b.ndim == 4 and b.shape[2:] == (1, 1):  # a convolution's LoRA: k x k down, 1 x 1 up
            a, b = a.reshape(a.shape[0], -1), b[:, :, 0, 0]
        out, inp = shapes[module]
        width = out // max(1, len(fused_slices(module)))
        if a.ndim != 2 or a.shape[1] != inp:
            mismatched.append(f"{ka}: {tuple(a.shape)} vs layer input width {inp} (expected (rank, {inp}))")
            continue
        if b.ndim != 2 or b.shape[0] != width:
            mismatched.append(f"{kb}: {tuple(b.shape)} vs layer output width {width} (expected ({width}, rank))")
            continue
        if b.shape[1] != a.shape[0]:
            mismatched.append(f"{kb}: rank {b.shape[1]} vs {ka}: rank {a.shape[0]}")
            continue
        name = entry["name"]
        key_r = _pattern_key(rank_pattern, name)
        want_r = rank_pattern[key_r] if key_r is not None else config.get("r")
        if want_r is not None and int(want_r) != a.shape[0]:
            mismatched.append(f"{ka}: rank {a.shape[0]} vs the adapter config's r={want_r}")
            continue
        key_a = _pattern_key(alpha_pattern, name)
        alpha = (alpha_pattern[key_a] if key_a is not None else alphas.get(name, config.get("lora_alpha")))
        branches.append(LoRABranch(module, part, a.astype(np.float32), b.astype(np.float32),
                                   float(a.shape[0] if alpha is None else alpha), rslora))
    if unexpected or missing or mismatched:
        raise CheckpointError(f"LoRA {path}: " + describe_mismatch("PixArt transformer", missing, unexpected,
                                                                     mismatched))
    notes = []
    if not config and not alphas:
        notes.append(f"note: {path.name} does not store lora_alpha; using alpha = rank (scale 1). "
                     "If it was trained with another alpha, pass --lora_scale alpha/rank")
    for n in notes:
        log(n)
    return LoRAWeights(branches, str(path), notes)




# ----------------------------------------------------------------------------------------------------------------
# Loading into a model, scale, merge / unmerge
# ----------------------------------------------------------------------------------------------------------------
def load_lora(model, source, scale: float = 1.0, log=print) -> LoRAWeights:
    """Apply a LoRA file/folder (or LoRAWeights) to `model` at `scale` (0 = the base model, 1 = as trained).
    In graph mode load before the model's first call (see `inject_lora`)."""
    if lora_layers(model):
        raise ValueError(_HAS_LORA)
    layers = linear_layers(model)
    lora = source if isinstance(source, LoRAWeights) else read_lora(source, layer_shapes(model), log)
    for module, branches in lora.by_module().items():
        base = layers[module]
        layer = _lora_layer(module, base, {b.part: b.rank for b in branches}, {b.part: b.alpha for b in branches},
                            rslora=branches[0].rslora)
        for b in branches:
            j = layer.branch_parts.index(b.part)
            layer.lora_A[j].set_data(Tensor(b.A, dtype=base.weight.dtype))
            layer.lora_B[j].set_data(Tensor(b.B, dtype=base.weight.dtype))
        _replace(model, module, layer)
    set_lora_scale(model, scale)
    log(f"LoRA {Path(lora.source).name}: {len(lora.branches)} low-rank updates on "
        f"{len(lora.by_module())} layers, scale {scale:g}")
    return lora


def copy_lora_weights(model, source, log=print) -> LoRAWeights:
    """Set the A and B of the model's existing LoRA branches from a LoRA file/folder (resuming training): the file
    must cover exactly the same layers and slices, with the same ranks and alphas."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to copy weights into")
    lora = read_lora(source, layer_shapes(model), log)
    ours = {(module, part) for module, layer in layers.items() for part in layer.branch_parts}
    theirs = {(b.module, b.part): b for b in lora.branches}
    if set(theirs) != ours:
        def names(pairs):
            return ", ".join(m + (f".{p}" if p else "") for m, p in sorted(pairs)[:4])
        extra, lacking = set(theirs) - ours, ours - set(theirs)
        raise CheckpointError(f"LoRA {lora.source} covers other layers than this model's LoRA"
                              + (f"; not in the model: {names(extra)}" if extra else "")
                              + (f"; not in the file: {names(lacking)}" if lacking else ""))
    for (module, part), b in theirs.items():
        layer = layers[module]
        if (b.rank, b.alpha) != (layer.ranks[part], layer.alphas[part]):
            raise CheckpointError(f"LoRA {lora.source}: {module} has rank {b.rank}, alpha {b.alpha:g}; the model's "
                                  f"has rank {layer.ranks[part]}, alpha {layer.alphas[part]:g}")
        j = layer.branch_parts.index(part)
        layer.lora_A[j].set_data(Tensor(b.A, dtype=layer.weight.dtype))
        layer.lora_B[j].set_data(Tensor(b.B, dtype=layer.weight.dtype))
    return lora


def set_lora_scale(model, scale: float) -> None:
    """Scale every LoRA update by `scale` (merged layers are re-merged at the new scale)."""
    for layer in lora_layers(model).values():
        merged = layer.merged
        if merged:
            _merge_layer(layer, -1)
        layer.scale = float(scale)
        layer.lora_scale.set_data(Tensor(float(scale), ms.float32))
        if merged:
            _merge_layer(layer, +1)


def _merge_layer(layer: LoRALinear | LoRAConv2d, sign: int) -> None:
    shape = tuple(layer.weight.shape)
    w = layer.weight.asnumpy().astype(np.float64).reshape(shape[0], -1)  # a convolution as (out, in * kh * kw)
    for row, delta in layer.deltas(layer.scale):
        w[row:row + delta.shape[0]] += sign * delta
    layer.weight.set_data(Tensor(w.reshape(shape).astype(np.float32), dtype=layer.weight.dtype))
    layer.merged = sign > 0
    layer.lora_scale.set_data(Tensor(0.0 if layer.merged else layer.scale, ms.float32))


def merge_lora(model) -> None:
    """W <- W + s * alpha/r * B A in every LoRA layer; the branches then contribute nothing until `unmerge_lora`."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            _merge_layer(layer, +1)


def unmerge_lora(model) -> None:
    """Undo `merge_lora`: W <- W - s * alpha/r * B A, branches active again."""
    for layer in lora_layers(model).values():
        if layer.merged:
            _merge_layer(layer, -1)


# ----------------------------------------------------------------------------------------------------------------
# Saving: diffusers / peft layout (default) or ours
# ----------------------------------------------------------------------------------------------------------------
def _adapter_config(entries: list[tuple[str, int, float]], depth: int, dropout: float, rslora: bool) -> dict:
    """A peft LoraConfig dict for branches (file module name, rank, alpha): the commonest rank and alpha, patterns
    for the rest, and target_modules as block-relative suffixes when every block has the same targets."""
    r = Counter(e[1] for e in entries).most_common(1)[0][0]
    alpha = Counter(e[2] for e in entries).most_common(1)[0][0]
    blocks: dict[str, set] = {}
    for name, _, _ in entries:
        m = re.match(r"^(transformer_)?blocks\.(\d+)\.(.+)$", name)
        blocks.setdefault(m.group(3) if m else name, set()).update([int(m.group(2))] if m else [])
    uniform = all(not idx or idx == set(range(depth)) for idx in blocks.values())
    targets = sorted(blocks) if uniform else sorted(e[0] for e in entries)
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
            "rank_pattern": {f"^{n}": k for n, k, _ in entries if k != r},
            "alpha_pattern": {f"^{n}": a for n, _, a in entries if a != alpha},
            "lora_dropout": dropout, "use_rslora": rslora, "bias": "none", "init_lora_weights": True}


def save_lora(model, path, layout: str = "diffusers") -> Path:
    """Write the model's LoRA weights to `path` (a folder gets `pytorch_lora_weights.safetensors`).

    layout "diffusers": `transformer.<diffusers module>.lora_A.weight` / `lora_B.weight` with the LoraConfig in the
    safetensors metadata, as diffusers' `save_lora_weights` writes it (fused layers split into their q/k/v modules);
    "original": our parameter names (`blocks.0.attn.qkv.lora_A.q`)."""
    if layout not in ("diffusers", "original"):
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    state, entries = {}, []
    dropout = 0.0
    for module, layer in layers.items():
        dropout = max(dropout, layer.dropout.p if layer.dropout is not None else 0.0)
        names = original_module_to_diffusers(module) if layout == "diffusers" else None
        if layout == "diffusers" and names is None:
            raise ValueError(f"{module} has no diffusers counterpart; save with layout='original'")
        for j, part in enumerate(layer.branch_parts):
            a, b = layer.lora_A[j].asnumpy(), layer.lora_B[j].asnumpy()
            if layout == "diffusers" and isinstance(layer, LoRAConv2d):  # peft's conv LoRA: k x k down, 1 x 1 up
                a, b = a.reshape(a.shape[0], *layer.kernel), b.reshape(*b.shape, 1, 1)
            if layout == "diffusers":
                name = names[layer.parts.index(part)]
                state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"] = a, b
            else:
                name = module + (f".{part}" if part else "")
                state[layer.lora_A[j].name], state[layer.lora_B[j].name] = a, b
            entries.append((name, layer.ranks[part], layer.alphas[part]))
    depth = len({n.split(".")[1] for n in linear_layers(model) if n.startswith("blocks.")})
    rslora = any(layer.rslora for layer in layers.values())
    config = _adapter_config(entries, depth, dropout, rslora)
    if layout == "diffusers":
        config = {PREFIX + k: v for k, v in config.items()}
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / LORA_WEIGHT_NAME
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, path, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
    return path


# ----------------------------------------------------------------------------------------------------------------
# Merging into a checkpoint file (tools/merge_lora.py)
# ----------------------------------------------------------------------------------------------------------------
def linear_shapes(state: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of the `.weight` tensors of an original-named state dict that a LoRA can update: PixArt's
    Linears, and its patch convolution as the Linear it is on flattened patches (out, in * k * k)."""
    out = {k[:-len(".weight")]: tuple(v.shape) for k, v in state.items() if k.endswith(".weight") and v.ndim == 2}
    out.update({m: (state[f"{m}.weight"].shape[0], int(np.prod(state[f"{m}.weight"].shape[1:])))
                for m in CONV_MODULES if f"{m}.weight" in state})
    return out


def merge_into_state(state: dict[str, np.ndarray], lora: LoRAWeights, scale: float = 1.0) -> dict[str, np.ndarray]:
    """W + scale * alpha/r * B A for every branch, in float64, cast back to each weight's dtype; a new dict."""
    out = dict(state)
    for module, branches in lora.by_module().items():
        shape = state[f"{module}.weight"].shape
        w = state[f"{module}.weight"].astype(np.float64).reshape(shape[0], -1)  # a convolution as (out, in * k * k)
        width = w.shape[0] // max(1, len(fused_slices(module)))
        for b in branches:
            row = (fused_slices(module).index(b.part) if b.part else 0) * width
            w[row:row + width] += scale * b.scaling * (b.B.astype(np.float64) @ b.A.astype(np.float64))
        out[f"{module}.weight"] = w.reshape(shape).astype(state[f"{module}.weight"].dtype)
    return out


def merge_lora_file(checkpoint, lora_path, target, scale: float = 1.0, unmerge: bool = False, log=print) -> Path:
    """Merge a LoRA into a PixArt checkpoint (any format `tools/convert.py` reads) and write a MindSpore `.ckpt`
    with original names and the architecture recorded; `unmerge` subtracts it instead (from a checkpoint it was
    merged into at `scale`)."""
    target = Path(target)
    if target.suffix != ".ckpt":
        raise CheckpointError(f"target must end in .ckpt, got {target}")
    weights = read_pixart(checkpoint)
    lora = read_lora(lora_path, linear_shapes(weights.state), log)
    cfg, preset, _ = resolve_config(weights.config, None, checkpoint, partial=True)
    if cfg.model_max_length is not None:
        fill_null_caption(weights.state, cfg, cfg.model_max_length, log)
    merged = merge_into_state(weights.state, lora, -scale if unmerge else scale)
    save_pixart(merged, cfg, target, preset or weights.preset)
    log(f"{'unmerged' if unmerge else 'merged'} {len(lora.branches)} low-rank updates ({Path(lora.source).name}, "
        f"scale {scale:g}) {'from' if unmerge else 'into'} {checkpoint}; wrote {target}")
    return target
