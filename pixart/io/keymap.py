"""PixArt transformer names: diffusers' `PixArtTransformer2DModel` <-> the original PixArt names (the names our
model uses). One table and one walk serve whole state dicts, single modules (LoRA files name modules) and the
fused layers: our `attn.qkv` and `cross_attn.kv_linear` hold what diffusers splits into `to_q/to_k/to_v`."""
from __future__ import annotations

import numpy as np

# (diffusers name, original name, block-level): a name ending in "." is a module prefix (its parameters follow),
# otherwise a parameter. Block-level names sit under `transformer_blocks.N.` / `blocks.N.`.
_RENAMES = [
    ("pos_embed.proj.", "x_embedder.proj.", False),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1.", False),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2.", False),
    ("caption_projection.y_embedding", "y_embedder.y_embedding", False),
    ("adaln_single.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0.", False),
    ("adaln_single.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2.", False),
    ("adaln_single.emb.resolution_embedder.linear_1.", "csize_embedder.mlp.0.", False),
    ("adaln_single.emb.resolution_embedder.linear_2.", "csize_embedder.mlp.2.", False),
    ("adaln_single.emb.aspect_ratio_embedder.linear_1.", "ar_embedder.mlp.0.", False),
    ("adaln_single.emb.aspect_ratio_embedder.linear_2.", "ar_embedder.mlp.2.", False),
    ("adaln_single.linear.", "t_block.1.", False),
    ("proj_out.", "final_layer.linear.", False),
    ("scale_shift_table", "final_layer.scale_shift_table", False),
    ("scale_shift_table", "scale_shift_table", True),
    ("attn1.to_out.0.", "attn.proj.", True),
    ("attn1.q_norm.", "attn.q_norm.", True),
    ("attn1.k_norm.", "attn.k_norm.", True),
    ("ff.net.0.proj.", "mlp.fc1.", True),
    ("ff.net.2.", "mlp.fc2.", True),
    ("attn2.to_q.", "cross_attn.q_linear.", True),
    ("attn2.to_out.0.", "cross_attn.proj.", True),
]
# (diffusers module prefix, its slices, our fused module): slices concatenated along the output, in this order
_FUSED = [("attn1.", ("to_q", "to_k", "to_v"), "attn.qkv"), ("attn2.", ("to_k", "to_v"), "cross_attn.kv_linear")]
_BLOCKS = {"diffusers": "transformer_blocks.", "original": "blocks."}
RECOMPUTED_BUFFERS = ("pos_embed", "pos_embed.pos_embed")  # sin-cos tables the model computes per input size


def _block(name: str, side: str) -> tuple[str | None, str]:
    """('N', rest) for a name inside block N on `side`, else (None, name); ('', name) for a malformed block name."""
    prefix = _BLOCKS[side]
    if not name.startswith(prefix):
        return None, name
    parts = name[len(prefix):].split(".", 1)
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0].isdigit() else ("", name)


def _translate(name: str, to_original: bool, module: bool) -> list[tuple[str, int | None, int]] | None:
    """The one walk over the tables: `name` (a parameter, or with `module` a whole module) on one side -> its
    counterpart(s) on the other, as [(name, index of the slice in a fused layer or None, number of slices)]. Going
    to the original names a slice of a fused layer gives one entry; going to diffusers a fused layer gives one entry
    per slice. None when the name has no counterpart."""
    src, dst = ("diffusers", "original") if to_original else ("original", "diffusers")
    n, rest = _block(name, src)
    if n == "":
        return None
    in_block = n is not None
    place = (lambda s: f"{_BLOCKS[dst]}{n}.{s}") if in_block else (lambda s: s)
    key = rest + "." if module else rest

    def match(prefix: str) -> str | None:  # the part of `key` after `prefix`, or None when it does not match
        if module:
            return "" if key == prefix and prefix.endswith(".") else None
        if prefix.endswith("."):
            return key[len(prefix):] if key.startswith(prefix) else None
        return "" if key == prefix else None

    if in_block:
        for prefix, parts, fused in _FUSED:
            if to_original:
                for i, part in enumerate(parts):
                    tail = match(f"{prefix}{part}.")
                    if tail is not None:
                        return [(place(f"{fused}.{tail}".rstrip(".")), i, len(parts))]
            else:
                tail = match(f"{fused}.")
                if tail is not None:
                    return [(place(f"{prefix}{part}.{tail}".rstrip(".")), i, len(parts))
                            for i, part in enumerate(parts)]
    for d_name, o_name, block_level in _RENAMES:
        if block_level != in_block:
            continue
        a, b = (d_name, o_name) if to_original else (o_name, d_name)
        tail = match(a)
        if tail is not None:
            return [(place(f"{b}{tail}".rstrip(".")), None, 1)]
    return None


def is_diffusers_transformer(state: dict) -> bool:
    return any(k.startswith(_BLOCKS["diffusers"]) for k in state)


def diffusers_to_original(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rename a diffusers `PixArtTransformer2DModel` state dict to the original PixArt names, fusing the split
    q/k/v projections back into `attn.qkv` and `cross_attn.kv_linear`. Returns (state, keys it could not map)."""
    out, unmapped, slices = {}, [], {}
    for key, value in state.items():
        if key in RECOMPUTED_BUFFERS:
            continue
        found = _translate(key, to_original=True, module=False)
        if found is None:
            unmapped.append(key)
            continue
        (target, index, count), = found
        if index is None:
            out[target] = value
        else:
            slices.setdefault(target, [None] * count)[index] = (key, value)
    for target, parts in slices.items():
        if all(p is not None for p in parts):
            out[target] = np.concatenate([v for _, v in parts], 0)
        else:
            unmapped += [k for k, _ in filter(None, parts)]
    return out, unmapped


def original_to_diffusers(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The inverse of `diffusers_to_original`: original names -> diffusers', the fused `attn.qkv` and
    `cross_attn.kv_linear` split into equal slices along the output. Returns (state, keys diffusers has no name for,
    e.g. the KV-compression convs `attn.sr`). The null caption goes to `caption_projection.y_embedding`, a key
    diffusers' model does not have and skips when loading, so that a round trip keeps it."""
    out, unmapped = {}, []
    for key, value in state.items():
        if key in RECOMPUTED_BUFFERS:
            continue
        found = _translate(key, to_original=False, module=False)
        if found is None:
            unmapped.append(key)
            continue
        if len(found) == 1 and found[0][1] is None:
            out[found[0][0]] = value
            continue
        for (target, _, _), part in zip(found, np.split(value, len(found), 0)):
            out[target] = np.ascontiguousarray(part)
    return out, unmapped


def diffusers_module_to_original(name: str) -> tuple[str, int | None, int] | None:
    """A diffusers `PixArtTransformer2DModel` module name -> (our module, index of its slice in a fused layer or
    None, number of slices), e.g. `transformer_blocks.3.attn1.to_k` -> (`blocks.3.attn.qkv`, 1, 3); None when
    the name has no counterpart."""
    found = _translate(name, to_original=True, module=True)
    return found[0] if found else None


def original_module_to_diffusers(name: str) -> list[str] | None:
    """Our module name -> its diffusers module name(s): one per slice of a fused layer (`blocks.3.attn.qkv` ->
    `transformer_blocks.3.attn1.to_q`, `.to_k`, `.to_v`), else one; None when diffusers has no such module."""
    found = _translate(name, to_original=False, module=True)
    return [target for target, _, _ in found] if found else None


def fused_slices(name: str) -> tuple[str, ...]:
    """Names of the slices of our fused layer `name` along its output (`attn.qkv` -> q, k, v), else ()."""
    rest = name.split(".", 2)[-1] if name.startswith(_BLOCKS["original"]) else name
    for _, parts, fused in _FUSED:
        if rest == fused:
            return tuple(p.removeprefix("to_") for p in parts)
    return ()


# PixArt-δ ControlNet. Official names: `controlnet.N.copied_block.<block names>`, `controlnet.0.before_proj.*`,
# `controlnet.N.after_proj.*` (the base under `base_model.`). diffusers' research project
# (PixArtControlNetAdapterModel):
# `controlnet_blocks.N.before_proj.*`, `controlnet_blocks.N.after_proj.*`, `controlnet_blocks.N.transformer_block.<its
# BasicTransformerBlock names>`, which are those of the transformer's blocks.
CONTROLNET_PREFIX = "controlnet."
CONTROLNET_BASE_PREFIX = "base_model."
_DIFFUSERS_CONTROLNET = "controlnet_blocks."


def is_controlnet(state: dict) -> bool:
    """Whether `state` holds a PixArt ControlNet branch, in official or diffusers' research project names."""
    return any(k.startswith((CONTROLNET_PREFIX, _DIFFUSERS_CONTROLNET)) for k in state)


def controlnet_diffusers_to_original(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """diffusers' research-project ControlNet adapter -> the official names (the copied blocks' q/k/v fused as in
    `diffusers_to_original`). Official names pass through. Returns (state, keys it could not map)."""
    out, unmapped, blocks = {}, [], {}
    for key, value in state.items():
        if key.startswith(CONTROLNET_PREFIX):
            out[key] = value
            continue
        if not key.startswith(_DIFFUSERS_CONTROLNET):
            unmapped.append(key)
            continue
        n, _, rest = key[len(_DIFFUSERS_CONTROLNET):].partition(".")
        part, _, tail = rest.partition(".")
        if not n.isdigit() or not tail:
            unmapped.append(key)
        elif part in ("before_proj", "after_proj"):
            out[f"{CONTROLNET_PREFIX}{n}.{part}.{tail}"] = value
        elif part == "transformer_block":
            blocks[f"{_BLOCKS['diffusers']}{n}.{tail}"] = (key, value)
        else:
            unmapped.append(key)
    renamed, left = diffusers_to_original({k: v for k, (_, v) in blocks.items()})
    unmapped += [blocks[k][0] for k in left]
    for key, value in renamed.items():
        n, rest = _block(key, "original")
        out[f"{CONTROLNET_PREFIX}{n}.copied_block.{rest}"] = value
    return out, unmapped
