"""Reading and writing weights, and the key maps between formats. Pure file I/O: nothing here knows a model.

    safetensors.py  .safetensors without torch (copy-on-write maps, header metadata, atomic writes)
    ckpt.py         MindSpore .ckpt (streamed reader, MindSpore's reader as fallback, `append_dict` metadata)
    pth.py          PyTorch .pth / .bin (torch imported only there, only for conversion, both ways)
    files.py        any file or HF folder -> {name: array} (+ metadata); config.json
    load.py         `load_into`: strict name / shape checks, then copy or share into a Cell
    keymap.py       diffusers <-> original PixArt names, fused q/k/v slices
"""
from .base import CheckpointError, widen_bf16
from .ckpt import read_ckpt, read_ckpt_with_metadata, write_ckpt
from .files import WEIGHT_FILES, read_config, read_state_dict, read_weights
from .keymap import (RECOMPUTED_BUFFERS, diffusers_module_to_original, diffusers_to_original, fused_slices,
                     is_diffusers_transformer, original_module_to_diffusers,
                     original_to_diffusers)
from .load import check_state, describe_mismatch, load_into
from .pth import read_torch, write_torch
from .safetensors import read_safetensors, read_safetensors_metadata, safetensors_entries, write_safetensors

__all__ = ["CheckpointError", "widen_bf16", "read_ckpt", "read_ckpt_with_metadata", "write_ckpt", "WEIGHT_FILES",
           "read_config", "read_state_dict", "read_weights", "RECOMPUTED_BUFFERS", "diffusers_module_to_original",
           "diffusers_to_original", "fused_slices", "is_diffusers_transformer", "original_module_to_diffusers",
           "original_to_diffusers", "check_state", "describe_mismatch", "load_into", "read_torch", "write_torch", "read_safetensors",
           "read_safetensors_metadata", "safetensors_entries", "write_safetensors"]
