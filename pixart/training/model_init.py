"""PixArt's initialisation for training from scratch (the official `initialize_weights`), from a seeded NumPy
generator so every rank starts from the same weights without a broadcast.

    every Linear: Xavier-uniform weight, zero bias; the patch embedding like a Linear over (C * p * p)
    timestep, size and caption MLPs: N(0, 0.02) weights; cross-attention output and final layer: zero
    adaLN tables: randn / sqrt(D); null caption: randn / sqrt(C_text)
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import Tensor

from pixart.backend import Linear


def _set(param, value: np.ndarray) -> None:
    param.set_data(Tensor(value.astype(np.float32)).astype(param.dtype))


def _xavier(rng, shape) -> np.ndarray:
    fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


def initialize_weights(model, seed: int) -> None:
    rng = np.random.default_rng([seed, 0x1417])
    for _, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            _set(cell.weight, _xavier(rng, tuple(cell.weight.shape)))
            if cell.bias is not None:
                _set(cell.bias, np.zeros(tuple(cell.bias.shape)))
    proj = model.x_embedder.proj
    _set(proj.weight, _xavier(rng, tuple(proj.weight.shape)))
    fan_in = int(np.prod(proj.weight.shape[1:]))
    _set(proj.bias, rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), tuple(proj.bias.shape)))

    normal = [model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1],
              model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2]
    if model.micro_condition:
        normal += [model.csize_embedder.mlp[0], model.csize_embedder.mlp[2],
                   model.ar_embedder.mlp[0], model.ar_embedder.mlp[2]]
    for lin in normal:
        _set(lin.weight, rng.normal(0.0, 0.02, tuple(lin.weight.shape)))

    d = model.config.hidden_size
    for block in model.blocks:
        _set(block.cross_attn.proj.weight, np.zeros(tuple(block.cross_attn.proj.weight.shape)))
        _set(block.cross_attn.proj.bias, np.zeros(tuple(block.cross_attn.proj.bias.shape)))
        _set(block.scale_shift_table, rng.standard_normal((6, d)) / math.sqrt(d))
    _set(model.final_layer.linear.weight, np.zeros(tuple(model.final_layer.linear.weight.shape)))
    _set(model.final_layer.linear.bias, np.zeros(tuple(model.final_layer.linear.bias.shape)))
    _set(model.final_layer.scale_shift_table, rng.standard_normal((2, d)) / math.sqrt(d))
    null = model.y_embedder.y_embedding
    c = null.shape[1]
    _set(null, rng.standard_normal(tuple(null.shape)) / math.sqrt(c))


def initialize_lora(params, seed: int) -> None:
    """Fresh LoRA branches as peft initialises them (A Kaiming-uniform with a = sqrt 5, i.e. U(+-1/sqrt(in)); B zero,
    so training starts from the base model exactly), from a seeded NumPy generator: every rank starts equal."""
    rng = np.random.default_rng([seed, 0x10AA])
    for p in params:
        shape = tuple(p.shape)
        if ".lora_A" in p.name:
            bound = 1.0 / math.sqrt(shape[1])
            _set(p, rng.uniform(-bound, bound, shape))
        else:
            _set(p, np.zeros(shape))
