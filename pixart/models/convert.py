"""PixArt transformer checkpoints: which architecture a file holds, and conversion between every format: any of them
to our `.ckpt`, and back to a diffusers folder or an original `.pth` / `.safetensors` (`export_pixart`).

Where the architecture lives: every `.ckpt` written here (`save_pixart`) records it as the string
`pixart_architecture` in MindSpore's `append_dict` (so `ms.load_checkpoint` returns it too), holding JSON
`{"preset": name, "config": {PixArtConfig fields}}`: `preset` is the public checkpoint the weights are, or are a
reduced copy of (depth, width, heads and caption width may shrink), null when none or several fit; a config field
is null where nothing said it (caption length of a diffusers folder converted without `--model`). It is read back
first (`read_pixart`) and checked against the weights.

Files without that record (diffusers folders, the original `.pth`, older `.ckpt`) are read by their weights and
`config.json`. What they do not say (diffusers: the caption length; `.pth`: the position-embedding scale; older
`.ckpt`: the training size too) comes from the model the user names (`--model`, a config's `model:`) or from the
only public preset that fits; when several fit, a one-line error names them and the flag that decides
(`resolve_config`). Nothing is guessed: the attention heads of a file that does not record them are its width
over 72, the head size of every public preset, and a width that is no multiple of 72 needs `--num_heads`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from mindspore.nn.utils import no_init_parameters

from pixart.io import (RECOMPUTED_BUFFERS, CheckpointError, check_state, describe_mismatch, diffusers_to_original,
                       is_diffusers_transformer, original_to_diffusers, read_config, read_weights, write_ckpt,
                       write_safetensors, write_torch)
from pixart.io.keymap import CONTROLNET_BASE_PREFIX, controlnet_diffusers_to_original, is_controlnet
from pixart.models.controlnet import CONTROLNET_PRESETS, ControlNetConfig, ControlPixArt
from pixart.models.pixart import PRESETS, KVCompression, PixArt, PixArtConfig, get_2d_sincos_pos_embed, preset_config

ARCHITECTURE_KEY = "pixart_architecture"
HEAD_SIZE = 72  # attention head width of every public preset (1152 / 16)
# fields a file may not say: None in a PixArtConfig read from weights means "unknown"
UNSAID = ("input_size", "pe_interpolation", "model_max_length")
# fields a reduced copy shares with its preset (depth, width, heads and caption width may shrink)
FAMILY = ("patch_size", "micro_condition", "qk_norm", "input_size", "pe_interpolation", "model_max_length")
# what diffusers pipelines pass as max_sequence_length: a full pipeline folder's model_index.json names the family
_PIPELINE_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


class NotATransformerError(CheckpointError):
    """The file holds no PixArt transformer (tools/convert.py then tries it as a ControlNet)."""


@dataclasses.dataclass
class PixArtWeights:
    """A PixArt transformer checkpoint read into original names: `config` has None where the file says nothing
    (see UNSAID); `preset` is the recorded one, if any."""
    state: dict
    config: PixArtConfig
    preset: str | None
    recorded: bool


# ----------------------------------------------------------------------------------------------------------------
# What the file says
# ----------------------------------------------------------------------------------------------------------------
def infer_pixart_config(state: dict[str, np.ndarray], diffusers_config: dict | None = None,
                        num_heads: int | None = None) -> PixArtConfig:
    """A PixArtConfig read off original-named weights (and a diffusers config.json, when there is one); fields the
    weights do not say are None (see UNSAID; `num_heads` too when neither the config nor the argument says it and
    the width is no multiple of HEAD_SIZE)."""
    if "x_embedder.proj.weight" not in state:
        raise NotATransformerError("not a PixArt transformer checkpoint: no x_embedder.proj.weight "
                              f"(found keys like {', '.join(list(state)[:5])})")
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden, patch = proj.shape[0], proj.shape[-1]
    kv_layers = sorted(int(k.split(".")[1]) for k in state if k.endswith("attn.sr.weight"))
    sr = state[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1] if kv_layers else 1
    c = diffusers_config or {}
    heads = num_heads or c.get("num_attention_heads") or (hidden // HEAD_SIZE if hidden % HEAD_SIZE == 0 else None)
    input_size = pe_interpolation = None
    if diffusers_config:
        input_size, pe_interpolation, _ = _diffusers_resolution(diffusers_config)
    elif "pos_embed" in state:  # the original's fixed buffer (1, T, D) tells the training resolution
        input_size = int(round(state["pos_embed"].shape[1] ** 0.5)) * patch
    return PixArtConfig(
        patch_size=patch, in_channels=proj.shape[1], hidden_size=hidden, depth=depth, num_heads=heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if depth else 4.0,
        pred_sigma=state["final_layer.linear.weight"].shape[0] == patch * patch * proj.shape[1] * 2,
        caption_channels=state["y_embedder.y_proj.fc1.weight"].shape[1],
        model_max_length=state["y_embedder.y_embedding"].shape[0] if "y_embedder.y_embedding" in state else None,
        input_size=input_size, pe_interpolation=pe_interpolation,
        micro_condition="csize_embedder.mlp.0.weight" in state, qk_norm="blocks.0.attn.q_norm.weight" in state,
        kv_compress_config={"sampling": "conv" if kv_layers else None, "scale_factor": sr,
                            "kv_compress_layer": kv_layers})


def _diffusers_resolution(config: dict) -> tuple[int, float, bool]:
    """(input_size, pe_interpolation, micro_condition) of a diffusers transformer config.json, with diffusers' own
    defaults where it leaves them open (folders written before those options existed)."""
    size = config.get("sample_size", 128)
    micro = config.get("use_additional_conditions")
    return size, float(config.get("interpolation_scale") or max(size // 64, 1)), size == 128 if micro is None else micro


def pipeline_class(folder) -> str | None:
    """The `_class_name` of a diffusers pipeline folder's model_index.json (PixArtAlphaPipeline / ...), if any."""
    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.exists() else None


def pipeline_presets(folder) -> list[str]:
    """The presets a diffusers pipeline folder may hold, by its model_index.json and transformer/config.json alone
    (no weights read): α or Σ from the pipeline class, size, position-embedding scale, micro-conditions."""
    config = Path(folder) / "transformer" / "config.json"
    c = json.loads(config.read_text()) if config.exists() else {}
    size, pe, micro = _diffusers_resolution(c)
    cfg = PixArtConfig(input_size=size, pe_interpolation=pe, micro_condition=micro,
                       model_max_length=_PIPELINE_TOKENS.get(pipeline_class(folder)), patch_size=c.get("patch_size", 2),
                       qk_norm=None)
    return fitting_presets(cfg)


# fields the weights always say, compared with a recorded architecture
_FROM_WEIGHTS = ("patch_size", "in_channels", "hidden_size", "depth", "mlp_ratio", "pred_sigma", "caption_channels",
                 "micro_condition", "qk_norm", "kv_layers")


def read_pixart(source, num_heads: int | None = None) -> PixArtWeights:
    """Any PixArt transformer checkpoint (our .ckpt, original .pth / .safetensors, a diffusers folder or file, a
    whole diffusers pipeline folder) in original names, with the architecture it records or, failing that, what its
    weights and config.json say. Buffers the model recomputes (`pos_embed`) are dropped after reading."""
    source = Path(source)
    dconfig, pipeline = None, None
    if source.is_dir() and not (source / "config.json").exists() and (source / "transformer" / "config.json").exists():
        source = source / "transformer"  # a whole pipeline folder
    if source.is_dir() and (source / "config.json").exists():
        dconfig = read_config(source)
        pipeline = pipeline_class(source.parent)
    state, metadata = read_weights(source)
    if is_diffusers_transformer(state):
        state, unmapped = diffusers_to_original(state)
        if unmapped:
            raise CheckpointError(describe_mismatch("PixArt transformer (diffusers names)", [], unmapped, []))
    found = infer_pixart_config(state, dconfig, num_heads)
    if dconfig and found.model_max_length is None:
        found.model_max_length = _PIPELINE_TOKENS.get(pipeline)
    for key in RECOMPUTED_BUFFERS:
        state.pop(key, None)
    if ARCHITECTURE_KEY not in metadata:
        return PixArtWeights(state, found, None, False)
    try:
        record = json.loads(metadata[ARCHITECTURE_KEY])
        cfg = PixArtConfig(**record["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: unreadable {ARCHITECTURE_KEY} record ({e})") from None
    if num_heads:
        cfg.num_heads = num_heads
    wrong = [f"{f} {_field(cfg, f)!r} (the weights have {_field(found, f)!r})" for f in _FROM_WEIGHTS
             if _field(cfg, f) != _field(found, f)]
    if found.model_max_length is not None and cfg.model_max_length not in (None, found.model_max_length):
        wrong.append(f"model_max_length {cfg.model_max_length} (the weights have {found.model_max_length})")
    if wrong:
        raise CheckpointError(f"{source}: the recorded architecture does not fit the weights: " + "; ".join(wrong))
    cfg.model_max_length = cfg.model_max_length or found.model_max_length
    return PixArtWeights(state, cfg, record.get("preset"), True)


def convert_pixart(source, input_size: int | None = None) -> tuple[dict, PixArtConfig]:
    """(original-named state, PixArtConfig) of any PixArt transformer checkpoint (see `read_pixart`)."""
    weights = read_pixart(source)
    if input_size:
        weights.config.input_size = input_size
    return weights.state, weights.config


# ----------------------------------------------------------------------------------------------------------------
# Which preset it is
# ----------------------------------------------------------------------------------------------------------------
def _field(cfg, name):
    if name == "kv_layers":
        kv = KVCompression.of(cfg.kv_compress_config)
        return kv.layers, kv.sampling if kv.layers else None
    if name == "kv":  # compressed or not, and how (a reduced copy compresses other layers); always known
        kv = KVCompression.of(cfg.kv_compress_config)
        return kv.sampling if kv.layers else "none"
    value = getattr(cfg, name)
    return float(value) if name == "pe_interpolation" and value is not None else value


def fitting_presets(cfg, fields=FAMILY + ("kv",)) -> list[str]:
    """The public presets `cfg` is, or is a reduced copy of: equal on every field of `fields` that `cfg` knows."""
    return [name for name in PRESETS
            if all(_field(cfg, f) is None or _field(cfg, f) == _field(preset_config(name), f) for f in fields)]


def match_preset(cfg, known=("model_max_length", "input_size", "pe_interpolation")) -> tuple[str | None, list[str]]:
    """The public checkpoint whose architecture `cfg` has (None if none does), and otherwise the differences from
    the closest one (among the presets it fits, when it fits several). Fields in `known` are compared only when the
    file said them."""
    fields = ["hidden_size", "depth", "patch_size", "caption_channels", "micro_condition", "qk_norm",
              "kv_layers"] + [f for f in known if _field(cfg, f) is not None]
    fitting = fitting_presets(cfg)
    best, best_diff = None, None
    for name in sorted(PRESETS, key=lambda n: n not in fitting):
        ref = preset_config(name)
        diff = [f"{f}={_field(cfg, f)!r} (preset {_field(ref, f)!r})" for f in fields
                if _field(cfg, f) != _field(ref, f)]
        if best_diff is None or len(diff) < len(best_diff):
            best, best_diff = name, diff
    if not best_diff:
        return best, []
    closest = " or ".join(fitting) if len(fitting) > 1 else best
    return None, [f"closest: {closest}"] + best_diff


def _which(cfg) -> str:
    """What a file is, for messages: the preset(s) it fits or the closest one."""
    fitting = fitting_presets(cfg)
    if len(fitting) == 1:
        return f"the file is {fitting[0]}" + ("" if match_preset(cfg)[0] else " (reduced)")
    if fitting:
        return f"the file fits {' and '.join(fitting)}"
    return f"no public preset fits the file ({'; '.join(match_preset(cfg)[1])})"


def resolve_config(cfg: PixArtConfig, model: str | None = None, source="checkpoint",
                   partial: bool = False) -> tuple[PixArtConfig, str | None, str | None]:
    """The complete architecture of a checkpoint: what the file said (`cfg`, None where it said nothing) plus the
    preset `model` the user names, or else the only preset that fits. Returns (config, preset or None, note).

    A field the file says that contradicts `model` is an error naming the preset the file is. When the file leaves
    a field open and several presets fit with different values, that is an error naming them and `--model`; with
    `partial` (conversion) the field stays None and `note` says so instead.
    """
    cfg = dataclasses.replace(cfg)
    if cfg.num_heads is None:
        raise CheckpointError(f"{source} does not record its attention heads, and its width {cfg.hidden_size} is no "
                              f"multiple of {HEAD_SIZE} (the head size of every public preset): convert it with "
                              "tools/convert.py --num_heads N")
    if model is not None:
        ref = preset_config(model)
        wrong = [f"{f}={_field(cfg, f)!r} (config says {_field(ref, f)!r})" for f in FAMILY
                 if _field(cfg, f) is not None and _field(cfg, f) != _field(ref, f)]
        if wrong:
            fitting = fitting_presets(cfg)
            hint = f"; pass --model {fitting[0]}" if len(fitting) == 1 else ""
            raise CheckpointError(f"{source} does not fit model {model}: " + "; ".join(wrong) + f"; {_which(cfg)}"
                                  + hint)
        for f in UNSAID:
            if getattr(cfg, f) is None:
                setattr(cfg, f, getattr(ref, f))
        return cfg, model, None
    fitting = fitting_presets(cfg)
    unknown = [f for f in UNSAID if getattr(cfg, f) is None]
    values = {tuple(getattr(preset_config(name), f) for f in unknown) for name in fitting}
    if len(values) == 1:
        for f, v in zip(unknown, values.pop()):
            setattr(cfg, f, v)
        return cfg, (fitting[0] if len(fitting) == 1 else None), None
    if not unknown:
        return cfg, None, None
    if fitting:
        note = (f"{source} fits {' and '.join(fitting)}, which differ in {', '.join(unknown)}: the file does not say "
                f"it; pass --model to choose")
    else:
        note = (f"{source} does not say its {', '.join(unknown)} and no public preset fits it "
                f"({'; '.join(match_preset(cfg)[1])}): pass --model, or convert with "
                + " ".join(f"--{f}" for f in unknown if f != "pe_interpolation"))
    if not partial:
        raise CheckpointError(note)
    return cfg, None, note


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def architecture_record(cfg: PixArtConfig, preset: str | None) -> dict[str, str]:
    """The metadata `save_pixart` writes: {ARCHITECTURE_KEY: JSON of the preset and every PixArtConfig field}."""
    return {ARCHITECTURE_KEY: json.dumps({"preset": preset, "config": dataclasses.asdict(cfg)}, sort_keys=True)}


def save_pixart(state: dict[str, np.ndarray], cfg: PixArtConfig, path, preset: str | None = None) -> None:
    """Write a PixArt transformer `.ckpt` (original names) that records its architecture (see the module doc)."""
    if not str(path).endswith(".ckpt"):
        raise CheckpointError(f"target must end in .ckpt, got {path}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_ckpt(state, path, architecture_record(cfg, preset))


def fill_null_caption(state, cfg, model_max_length: int | None = None, log=print):
    """diffusers checkpoints do not carry the null caption `y_embedding` (only training's caption dropout and the
    optional `uncond=y_embedding` sampling use it). Fill it as training from scratch initialises it, seeded."""
    if "y_embedder.y_embedding" in state:
        return
    cfg.model_max_length = model_max_length or cfg.model_max_length
    if cfg.model_max_length is None:
        raise CheckpointError("the caption length is unknown: pass --model or --model_max_length")
    rng = np.random.default_rng(0)
    c = cfg.caption_channels
    state["y_embedder.y_embedding"] = (rng.standard_normal((cfg.model_max_length, c)) / c ** 0.5).astype(np.float32)
    log(f"note: the source has no y_embedder.y_embedding (diffusers drops it); initialised a fresh one with "
        f"{cfg.model_max_length} tokens")


def _check_structure(state, cfg: PixArtConfig, what: str) -> None:
    """Every key and shape of `state` against the model `cfg` describes (its open fields filled with placeholders
    that change no parameter shape but the null caption's); the null caption may be missing (`fill_null_caption`)."""
    probe = dataclasses.replace(cfg, num_heads=cfg.num_heads or 1, input_size=cfg.input_size or 32,
                                pe_interpolation=cfg.pe_interpolation or 1.0,
                                model_max_length=cfg.model_max_length or 1)
    with no_init_parameters():  # shapes only: no memory for the weights
        shapes = {p.name: tuple(p.shape) for p in PixArt(probe).get_parameters()}
    if "y_embedder.y_embedding" not in state:
        shapes.pop("y_embedder.y_embedding")
    problems = check_state(shapes, state)
    if any(problems):
        raise CheckpointError(describe_mismatch(what, *problems))


DIFFUSERS_CLASS = "PixArtTransformer2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TARGETS = ("ckpt", "diffusers", "original")  # tools/convert.py --to


def diffusers_config(cfg: PixArtConfig) -> dict:
    """The config.json of diffusers' PixArtTransformer2DModel for the architecture `cfg`; a CheckpointError naming
    what diffusers' model cannot express (KV compression, q/k norms, an MLP ratio other than 4)."""
    kv = KVCompression.of(cfg.kv_compress_config)
    wrong = ([f"KV compression in layers {list(kv.layers)}"] if kv.layers else []) + \
        (["q/k norms (qk_norm)"] if cfg.qk_norm else []) + \
        ([f"mlp_ratio {cfg.mlp_ratio}"] if cfg.mlp_ratio != 4.0 else [])
    if wrong:
        raise CheckpointError(f"diffusers' {DIFFUSERS_CLASS} cannot hold this model: {'; '.join(wrong)}; "
                              "convert it to --to ckpt or --to original instead")
    if None in (cfg.input_size, cfg.pe_interpolation, cfg.num_heads):
        raise CheckpointError("the training size of this model is unknown: pass --model (or --input_size)")
    return {"_class_name": DIFFUSERS_CLASS, "activation_fn": "gelu-approximate", "attention_bias": True,
            "attention_head_dim": cfg.hidden_size // cfg.num_heads, "attention_type": "default",
            "caption_channels": cfg.caption_channels, "cross_attention_dim": cfg.hidden_size, "dropout": 0.0,
            "in_channels": cfg.in_channels, "interpolation_scale": cfg.pe_interpolation,
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single",
            "num_attention_heads": cfg.num_heads, "num_embeds_ada_norm": 1000, "num_layers": cfg.depth,
            "out_channels": cfg.in_channels * (2 if cfg.pred_sigma else 1), "patch_size": cfg.patch_size,
            "sample_size": cfg.input_size, "upcast_attention": False,
            "use_additional_conditions": cfg.micro_condition}


def save_diffusers_transformer(state: dict[str, np.ndarray], cfg: PixArtConfig, folder) -> Path:
    """Write a diffusers `PixArtTransformer2DModel` folder (config.json + safetensors) of original-named `state`.
    The null caption is kept as `caption_projection.y_embedding`, which diffusers skips and a round trip keeps."""
    config = diffusers_config(cfg)
    out, unmapped = original_to_diffusers(state)
    if unmapped:
        raise CheckpointError(describe_mismatch(f"diffusers {DIFFUSERS_CLASS} (no diffusers name)", [], unmapped, []))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(out, folder / DIFFUSERS_WEIGHTS, {"format": "pt"})
    return folder


def save_original(state: dict[str, np.ndarray], cfg: PixArtConfig, path) -> None:
    """Write the original release layout: PixArt names with the fixed position-embedding buffer `pos_embed`
    (1, T, D) of the training size, as `.pth` ({"state_dict": ...}) or `.safetensors`."""
    state = dict(state)
    if cfg.input_size is not None and cfg.pe_interpolation is not None:
        grid = cfg.input_size // cfg.patch_size
        state["pos_embed"] = get_2d_sincos_pos_embed(cfg.hidden_size, grid, grid, cfg.pe_interpolation, grid)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith((".pth", ".pt", ".bin")):
        write_torch(state, path)
    elif str(path).endswith(".safetensors"):
        write_safetensors(state, path, {"format": "pt"})
    else:
        raise CheckpointError(f"an original checkpoint ends in .pth or .safetensors, got {path}")


def export_pixart(state: dict[str, np.ndarray], cfg: PixArtConfig, target, to: str = "ckpt",
                  preset: str | None = None) -> None:
    """Write original-named `state` of architecture `cfg` as `to`: "ckpt" (ours, architecture recorded),
    "diffusers" (a transformer folder) or "original" (.pth / .safetensors)."""
    if to == "ckpt":
        save_pixart(state, cfg, target, preset)
    elif to == "diffusers":
        save_diffusers_transformer(state, cfg, target)
    elif to == "original":
        save_original(state, cfg, target)
    else:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")


def target_format(target, to: str | None) -> str:
    """The format to write: `to`, or what `target`'s name says (.ckpt; .pth / .safetensors: original; else a
    diffusers folder)."""
    if to is not None:
        if to not in TARGETS:
            raise CheckpointError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
        return to
    name = str(target)
    if name.endswith(".ckpt"):
        return "ckpt"
    return "original" if name.endswith((".pth", ".pt", ".bin", ".safetensors")) else "diffusers"


def convert_pixart_file(source, target, preset: str | None = None, model: str | None = None,
                        input_size: int | None = None, model_max_length: int | None = None,
                        num_heads: int | None = None, log=print, to: str | None = None) -> tuple[str | None, PixArtConfig]:
    """`tools/convert.py`: read any PixArt checkpoint, settle its architecture (`resolve_config`, `model` deciding
    what the file leaves open; `preset` also requires the public checkpoint's exact size), check every key and
    shape, and write `target` as `to` (see `target_format`; a .ckpt records the architecture). Returns (preset or
    None, config)."""
    to = target_format(target, to)
    weights = read_pixart(source, num_heads)
    state, cfg = weights.state, weights.config
    if input_size:
        cfg.input_size = input_size
    if model_max_length:
        if cfg.model_max_length not in (None, model_max_length):
            raise CheckpointError(f"{source} has {cfg.model_max_length} caption tokens, not {model_max_length}")
        cfg.model_max_length = model_max_length
    if preset is not None:
        looks = match_preset(cfg)
        _check_structure(state, dataclasses.replace(preset_config(preset), model_max_length=cfg.model_max_length),
                         f"preset {preset}" + (f" (the file looks like {looks[0]})" if looks[0]
                                               else f" ({'; '.join(looks[1])})"))
    _check_structure(state, cfg, "PixArt model inferred from the file")
    cfg, name, note = resolve_config(cfg, model or preset, source, partial=True)
    name = name or weights.preset
    if cfg.model_max_length is not None:
        fill_null_caption(state, cfg, cfg.model_max_length, log)
    exact, diff = match_preset(cfg)
    log(f"matches preset: {exact}" if exact else "no public preset matches exactly; " + "; ".join(diff))
    kv = list(KVCompression.of(cfg.kv_compress_config).layers) or "no"
    log(f"config: depth={cfg.depth} hidden={cfg.hidden_size} heads={cfg.num_heads} input_size={cfg.input_size} "
        f"micro_condition={cfg.micro_condition} kv_compress={kv} qk_norm={cfg.qk_norm} tokens={cfg.model_max_length}")
    if note:
        log(f"note: {note} (here, or when sampling: sample.py --model / the config's model)")
    export_pixart(state, cfg, target, to, name)
    recorded = (f" (architecture of {name} recorded)" if name else " (architecture recorded)") if to == "ckpt" else \
        f" ({to} layout)"
    log(f"wrote {len(state)} tensors to {target}" + recorded)
    return name, cfg


# ----------------------------------------------------------------------------------------------------------------
# PixArt-δ ControlNet checkpoints
# ----------------------------------------------------------------------------------------------------------------
# Our ControlNet .ckpt holds the control branch only (`controlnet.*`, official names) and records, as
# CONTROLNET_ARCHITECTURE_KEY, JSON {"base_preset": name or null, "copy_blocks_num": n, "base": {PixArtConfig fields,
# null where unknown}}: the base it was made for, checked against the base it is loaded on (`check_controlnet_base`).
CONTROLNET_ARCHITECTURE_KEY = "pixart_controlnet_architecture"
# the base's fields a ControlNet must agree with, where both say them
_CONTROLNET_BASE_FIELDS = ("hidden_size", "num_heads", "mlp_ratio", "qk_norm", "patch_size", "in_channels",
                           "pred_sigma", "caption_channels", "depth", "micro_condition", "model_max_length",
                           "input_size", "pe_interpolation")
_UNKNOWN_BASE = {f.name: None for f in dataclasses.fields(PixArtConfig) if f.name != "kv_compress_config"}


class NotAControlNetError(CheckpointError):
    """The file holds no ControlNet branch."""


@dataclasses.dataclass
class ControlNetWeights:
    """A ControlNet checkpoint read into official names: the control branch, what it says of its base (None where it
    says nothing), and the base's own weights when the file holds them too (the official .pth), else {}."""
    state: dict
    config: ControlNetConfig
    base_state: dict
    recorded: bool


def infer_controlnet_config(control: dict[str, np.ndarray], base_state: dict[str, np.ndarray] | None = None,
                            num_heads: int | None = None) -> ControlNetConfig:
    """What the weights say: the copied blocks, their width and layout; the whole base architecture only when the
    base's weights are there."""
    indices = sorted({int(k.split(".")[1]) for k in control if k.split(".")[1].isdigit()})
    if not indices or indices != list(range(len(indices))) or "controlnet.0.before_proj.weight" not in control:
        raise CheckpointError("not a PixArt ControlNet branch: expected controlnet.0 ... controlnet.N-1 with "
                              f"controlnet.0.before_proj (found blocks {indices[:20]})")
    hidden = control["controlnet.0.before_proj.weight"].shape[0]
    kv_layers = [i for i in indices if f"controlnet.{i}.copied_block.attn.sr.weight" in control]
    if base_state:
        base = infer_pixart_config(base_state, None, num_heads)
        if base.hidden_size != hidden:
            raise CheckpointError(f"the control branch is {hidden} wide but the base in the same file "
                                  f"{base.hidden_size}")
        return ControlNetConfig(base, len(indices))
    heads = num_heads or (hidden // HEAD_SIZE if hidden % HEAD_SIZE == 0 else None)
    sr = control[f"controlnet.{kv_layers[0]}.copied_block.attn.sr.weight"].shape[-1] if kv_layers else 1
    base = PixArtConfig(**dict(
        _UNKNOWN_BASE, hidden_size=hidden, num_heads=heads,
        mlp_ratio=control["controlnet.0.copied_block.mlp.fc1.weight"].shape[0] / hidden,
        qk_norm="controlnet.0.copied_block.attn.q_norm.weight" in control,
        kv_compress_config={"sampling": "conv" if kv_layers else None, "scale_factor": sr,
                            "kv_compress_layer": kv_layers}))
    return ControlNetConfig(base, len(indices))


def read_controlnet(source, num_heads: int | None = None) -> ControlNetWeights:
    """A ControlNet checkpoint in any of its formats: the official .pth (`base_model.*` + `controlnet.*`, or the
    branch alone), diffusers' research-project folder or file (`controlnet_blocks.*`), or our .ckpt (recorded)."""
    source = Path(source)
    state, metadata = read_weights(source)
    if not is_controlnet(state):
        raise NotAControlNetError(f"{source} is not a PixArt ControlNet checkpoint: no controlnet.* or "
                                  f"controlnet_blocks.* keys (found keys like {', '.join(list(state)[:5])})")
    base_state = {k[len(CONTROLNET_BASE_PREFIX):]: v for k, v in state.items() if k.startswith(CONTROLNET_BASE_PREFIX)}
    control, unmapped = controlnet_diffusers_to_original(
        {k: v for k, v in state.items() if not k.startswith(CONTROLNET_BASE_PREFIX)})
    if base_state and is_diffusers_transformer(base_state):
        base_state, left = diffusers_to_original(base_state)
        unmapped += [CONTROLNET_BASE_PREFIX + k for k in left]
    if unmapped:
        raise CheckpointError(describe_mismatch("PixArt ControlNet", [], unmapped, []))
    found = infer_controlnet_config(control, base_state, num_heads)  # the base's pos_embed tells its training size
    for key in RECOMPUTED_BUFFERS:
        base_state.pop(key, None)
    if source.is_dir() and (source / "config.json").exists():
        layers = read_config(source).get("num_layers")
        if layers is not None and layers != found.copy_blocks_num:
            raise CheckpointError(f"{source}: config.json says num_layers={layers} but the weights hold "
                                  f"{found.copy_blocks_num} control blocks")
    if CONTROLNET_ARCHITECTURE_KEY not in metadata:
        return ControlNetWeights(control, found, base_state, False)
    try:
        record = json.loads(metadata[CONTROLNET_ARCHITECTURE_KEY])
        cfg = ControlNetConfig(PixArtConfig(**record["base"]), int(record["copy_blocks_num"]),
                               record.get("base_preset"))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: unreadable {CONTROLNET_ARCHITECTURE_KEY} record ({e})") from None
    wrong = [f"{f} {_field(cfg.base, f)!r} (the weights have {_field(found.base, f)!r})"
             for f in ("hidden_size", "mlp_ratio", "qk_norm") if _field(cfg.base, f) != _field(found.base, f)]
    if cfg.copy_blocks_num != found.copy_blocks_num:
        wrong.append(f"copy_blocks_num {cfg.copy_blocks_num} (the weights have {found.copy_blocks_num})")
    if wrong:
        raise CheckpointError(f"{source}: the recorded architecture does not fit the weights: " + "; ".join(wrong))
    return ControlNetWeights(control, cfg, base_state, True)


def controlnet_base_name(model: str | None) -> str | None:
    """The base preset a `--model` names: a ControlNet preset's base, or a base preset itself."""
    if model is None or model in PRESETS:
        return model
    if model in CONTROLNET_PRESETS:
        return CONTROLNET_PRESETS[model][0]
    raise CheckpointError(f"unknown model {model!r}; choose a ControlNet preset ({', '.join(CONTROLNET_PRESETS)}) "
                          f"or its base ({', '.join(PRESETS)})")


def resolve_controlnet(cfg: ControlNetConfig, model: str | None = None,
                       source="checkpoint") -> tuple[ControlNetConfig, str | None]:
    """The base a ControlNet file was made for: what the file says, completed by the preset `model` names (a
    ControlNet preset or a base preset). A field the file says that contradicts it is an error naming both. A file
    with the whole base (the official .pth) settles it as a PixArt checkpoint does (`resolve_config`); a branch alone
    says its width and layout only: the rest comes from `model` (at the preset's width all of it, for a reduced copy
    the family fields only). Returns (config, note or None)."""
    base_name = controlnet_base_name(model)
    base = cfg.base
    if base.depth is not None:  # the base's own weights were there
        base, name, note = resolve_config(base, base_name, source, partial=True)
        out = ControlNetConfig(base, cfg.copy_blocks_num, name or cfg.base_preset)
    elif base_name is None:
        out, note = cfg, (f"{source} does not say which base it was made for (only its width {base.hidden_size} and "
                          f"{cfg.copy_blocks_num} copied blocks): pass --model with the base's preset, e.g. "
                          "PixArt-XL-2-1024-MS; the base is checked when sampling")
    else:
        ref = preset_config(base_name)
        wrong = [f"{f}={_field(base, f)!r} (preset {base_name} has {_field(ref, f)!r})"
                 for f in ("qk_norm", "mlp_ratio") if _field(base, f) != _field(ref, f)]
        kv, ref_kv = KVCompression.of(base.kv_compress_config), KVCompression.of(ref.kv_compress_config)
        full = base.hidden_size == ref.hidden_size
        if full and any(kv.ratio(i) != ref_kv.ratio(i) for i in range(cfg.copy_blocks_num)):
            wrong.append(f"KV compression in copied blocks {list(kv.layers)} (preset {base_name}: "
                         f"{[i for i in ref_kv.layers if i < cfg.copy_blocks_num]})")
        if full and cfg.copy_blocks_num >= ref.depth:
            wrong.append(f"{cfg.copy_blocks_num} copied blocks (preset {base_name} has {ref.depth} blocks)")
        if wrong:
            raise CheckpointError(f"{source} does not fit base {base_name}: " + "; ".join(wrong))
        known = {f.name for f in dataclasses.fields(PixArtConfig)} if full else set(FAMILY)
        base = dataclasses.replace(base, **{f: getattr(ref, f) for f in known if getattr(base, f, None) is None
                                            or f == "kv_compress_config"})
        out, note = ControlNetConfig(base, cfg.copy_blocks_num, base_name), None
    if out.base.depth is not None and out.copy_blocks_num >= out.base.depth:
        raise CheckpointError(f"{source} copies {out.copy_blocks_num} blocks but its base has {out.base.depth}: a "
                              "ControlNet copies fewer blocks than its base has")
    return out, note


def save_controlnet(state: dict[str, np.ndarray], cfg: ControlNetConfig, path) -> None:
    """Write a ControlNet `.ckpt`: the control branch (official names) and the base it was made for (see above)."""
    if not str(path).endswith(".ckpt"):
        raise CheckpointError(f"a ControlNet converts to our .ckpt only; the target must end in .ckpt, got {path}")
    record = {"base_preset": cfg.base_preset, "copy_blocks_num": cfg.copy_blocks_num,
              "base": dataclasses.asdict(cfg.base)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_ckpt(state, path, {CONTROLNET_ARCHITECTURE_KEY: json.dumps(record, sort_keys=True)})


def check_controlnet_base(cfg: ControlNetConfig, base: PixArtConfig, base_preset: str | None = None,
                          source="ControlNet") -> None:
    """A CheckpointError naming every difference between the base a ControlNet was made for and the `base` it is
    about to steer (fields either side leaves open are not compared; with `base.depth` None only the family's)."""
    wrong = [f"{f} {_field(cfg.base, f)!r} (the base has {_field(base, f)!r})" for f in _CONTROLNET_BASE_FIELDS
             if None not in (_field(cfg.base, f), _field(base, f)) and _field(cfg.base, f) != _field(base, f)]
    if base.depth is not None:  # a whole base, not only its family: its blocks too
        kv, base_kv = KVCompression.of(cfg.base.kv_compress_config), KVCompression.of(base.kv_compress_config)
        copies = [i for i in range(cfg.copy_blocks_num) if kv.ratio(i) != base_kv.ratio(i)]
        if copies:
            wrong.append(f"KV compression of blocks {copies} differs")
        if cfg.copy_blocks_num >= base.depth:
            wrong.append(f"it copies {cfg.copy_blocks_num} blocks (the base has {base.depth})")
    if wrong:
        made = cfg.base_preset or "another base"
        if cfg.base_preset and cfg.base_preset == base_preset:
            made = f"a {made} of another size"
        on = f" {base_preset}" if base_preset else ""
        raise CheckpointError(f"{source} was made for {made}, not this base{on}: " + "; ".join(wrong))


def convert_controlnet_file(source, target, model: str | None = None, num_heads: int | None = None,
                            base_target=None, log=print) -> ControlNetConfig:
    """`tools/convert.py` for a ControlNet source: read it (`read_controlnet`), settle its base
    (`resolve_controlnet`), check every key and shape of the branch, and write our ControlNet .ckpt; the base's
    weights, when the source holds them, to `base_target` as a PixArt .ckpt (else they are left out, with a note)."""
    weights = read_controlnet(source, num_heads)
    if base_target and not weights.base_state:
        raise CheckpointError(f"--base_target: {source} holds the control branch only, no base model")
    cfg, note = resolve_controlnet(weights.config, model, source)
    _check_controlnet_structure(weights.state, cfg)
    base = cfg.base
    log(f"ControlNet: {cfg.copy_blocks_num} copied blocks, width {base.hidden_size}, for base "
        f"{cfg.base_preset or 'unknown'}" + (f" (depth {base.depth})" if base.depth else ""))
    if note:
        log(f"note: {note}")
    save_controlnet(weights.state, cfg, target)
    log(f"wrote {len(weights.state)} tensors to {target} (ControlNet; base architecture recorded)")
    if weights.base_state and base_target:
        state = dict(weights.base_state)
        fill_null_caption(state, base, base.model_max_length, log)
        _check_structure(state, base, "the base model in the ControlNet file")
        export_pixart(state, base, base_target, target_format(base_target, None), cfg.base_preset)
        log(f"wrote the base model's {len(state)} tensors to {base_target}")
    elif weights.base_state:
        log(f"note: the source also holds its base model ({len(weights.base_state)} tensors); not written: pass "
            "--base_target to write it too, or sample with the base's own checkpoint")
    return cfg


def _check_controlnet_structure(state, cfg: ControlNetConfig) -> None:
    """Every key and shape of the control branch against the model `cfg` describes."""
    base = cfg.base
    probe = dataclasses.replace(base, **{k: v for k, v in dict(
        patch_size=2, in_channels=4, pred_sigma=True, caption_channels=8, input_size=32, pe_interpolation=1.0,
        model_max_length=1, micro_condition=False).items() if getattr(base, k) is None},
        num_heads=base.num_heads or 1, depth=max(base.depth or 0, cfg.copy_blocks_num + 1))
    with no_init_parameters():
        net = ControlPixArt(PixArt(probe), cfg.copy_blocks_num)
        shapes = {p.name: tuple(p.shape) for p in net.controlnet.get_parameters()}
    problems = check_state(shapes, state)
    if any(problems):
        raise CheckpointError(describe_mismatch(f"PixArt ControlNet ({cfg.copy_blocks_num} copied blocks)", *problems))
