"""PixArt-δ ControlNet: the model (names, zero start, control scale 0), conversion of the official and the diffusers
research project's formats, parity with a PyTorch reference built from diffusers' PixArt blocks, and inference."""
import numpy as np
import pytest
from mindspore import Tensor

from pixart.models.controlnet import CONTROLNET_PRESETS, build_controlnet, default_copy_blocks
from pixart.models.pixart import PRESETS

TINY = dict(depth=4, hidden_size=144, num_heads=2, caption_channels=32)  # 144 = 2 heads of 72, as the presets


def _inputs(net, seed=0, n=2, side=16, tokens=None):
    rng = np.random.default_rng(seed)
    tokens = tokens or net.config.model_max_length
    x = Tensor(rng.standard_normal((n, 4, side, side)).astype(np.float32))
    t = Tensor(np.array([999.0, 37.0][:n], np.float32))
    y = Tensor(rng.standard_normal((n, 1, tokens, net.config.caption_channels)).astype(np.float32))
    mask = np.ones((n, tokens), np.int32)
    mask[-1, 5:] = 0
    info = {"img_hw": Tensor(np.full((n, 2), side * 8, np.float32)), "aspect_ratio": Tensor(np.ones((n, 1), np.float32))}
    condition = Tensor(rng.standard_normal((1, 4, side, side)).astype(np.float32))
    return x, t, y, Tensor(mask), info, condition


def test_presets_names_zero_start_and_scale_zero_equal_the_base_bit_for_bit():
    assert all(base in PRESETS for base, _ in CONTROLNET_PRESETS.values())
    assert [default_copy_blocks(d) for d in (28, 2, 4, 8)] == [13, 1, 2, 4]
    net = build_controlnet("PixArt-XL-2-1024-ControlNet", **TINY)
    names = [p.name for p in net.get_parameters()]
    assert "base_model.x_embedder.proj.weight" in names and "controlnet.0.before_proj.weight" in names
    assert "controlnet.1.copied_block.attn.qkv.weight" in names and "controlnet.1.after_proj.bias" in names
    assert "controlnet.1.before_proj.weight" not in names  # block 0 only
    x, t, y, mask, info, c = _inputs(net)
    base = net.base_model(x, t, y, mask, info).asnumpy()
    # a fresh branch (copied blocks, zero projections) computes exactly the base model
    assert np.array_equal(net(x, t, y, mask, info, c, 1.0).asnumpy(), base)
    rng = np.random.default_rng(1)
    for p in net.control_parameters():
        p.set_data(Tensor(rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.05))
    assert not np.allclose(net(x, t, y, mask, info, c, 1.0).asnumpy(), base, atol=1e-3)
    assert np.array_equal(net(x, t, y, mask, info, c, 0.0).asnumpy(), base)
    assert np.array_equal(net(x, t, y, mask, info, None).asnumpy(), base)
