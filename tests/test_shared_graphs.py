"""Graphs shared by structurally equal blocks (pixart/cpu/shared_graphs.py): sampling's grouped denoiser computes what
the one-graph denoiser computes, compiles per structure (not per block), and follows the model's weights."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from pixart import cpu
from pixart.cpu.shared_graphs import GroupedCaptionEncoder, GroupedDenoiser, aliasing_copy
from pixart.models.pixart import PixArt, preset_config
from pixart.nn import Method


@pytest.fixture
def sigma_kv(rng):
    """A small Σ-KV multi-scale model (blocks 2-4 compress keys/values: two block structures) and its inputs."""
    cfg = preset_config("PixArt-Sigma-XL-2-1024-MS-KV", depth=5, hidden_size=64, num_heads=4, caption_channels=32,
                        kv_compress_config={"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [2, 3, 4]})
    model = cpu.accelerate(PixArt(cfg))
    model.set_train(False)
    x = Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32))
    t = Tensor(np.array([500.0, 20.0], np.float32))
    y = Tensor(rng.standard_normal((2, 1, 12, 32)).astype(np.float32))
    mask = Tensor(np.array([[1] * 5 + [0] * 7, [1] * 12], np.int32))
    info = {"img_hw": Tensor(np.full((2, 2), 128.0, np.float32)), "aspect_ratio": Tensor(np.ones((2, 1), np.float32))}
    return model, (x, t, y, mask, info)


@pytest.mark.slow
def test_grouped_denoiser_equals_the_one_graph_denoiser(sigma_kv, graph_mode):
    model, (x, t, y, mask, info) = sigma_kv
    caption_kv = ms.mutable(Method(model, "encode_caption")(y))
    encoder = GroupedCaptionEncoder(model)
    for got, want in zip(encoder(y), caption_kv, strict=True):
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
    assert len(encoder.compile_cache) == 1  # the caption MLP (the blocks project its tokens in the step)
    layers = [block.cross_attn for block in model.blocks]
    for layer in layers:  # keys/values precomputed instead: one projection graph serves all blocks
        layer.recompute_kv = False
    try:
        projected = Method(model, "encode_caption")(y)
        encoder = GroupedCaptionEncoder(model)
        for got, want in zip(encoder(y), projected, strict=True):
            assert got.shape[-1] == 2 * model.config.hidden_size
            np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
        assert len(encoder.compile_cache) == 2  # the caption MLP, one keys/values projection for all blocks
    finally:
        for layer in layers:
            layer.recompute_kv = True
    want = Method(model, "denoise")(x, t, caption_kv, mask, info).asnumpy()
    # runs of 1, 2 (0-1 | 2-3 | 4: three structures) and 3 blocks (0-2 | 3-4)
    for size, structures in ((1, 2), (2, 3), (3, 2)):
        denoiser = GroupedDenoiser(model, size)
        for _ in range(2):
            np.testing.assert_array_equal(denoiser(x, t, caption_kv, mask, info).asnumpy(), want)
        assert len(denoiser.compile_cache) == 2 + structures  # embedders, final layer, one graph per structure
    # the model's weights replaced afterwards (a LoRA merged, a checkpoint loaded): the shared graphs follow them
    for p in model.blocks[3].get_parameters():
        p.set_data(Tensor(p.asnumpy() * 1.5))
    want = Method(model, "denoise")(x, t, caption_kv, mask, info).asnumpy()
    np.testing.assert_array_equal(denoiser(x, t, caption_kv, mask, info).asnumpy(), want)
    assert len(denoiser.compile_cache) == 2 + 2


def test_aliasing_copy_shares_storage_and_kernels(sigma_kv):
    model, _ = sigma_kv
    block = model.blocks[0]
    twin = aliasing_copy(block, train=False)
    theirs, mine = list(block.get_parameters()), list(twin.get_parameters())
    assert [p.name for p in mine] == [p.name for p in theirs] and all(p is not q for p, q in zip(mine, theirs))
    ops.assign(theirs[0], ops.ones_like(theirs[0]) * 3)  # written in place: the copy sees it (no copy of weights)
    assert np.all(mine[0].asnumpy() == 3)
    assert twin.attn.qkv.matmul is block.attn.qkv.matmul  # kernels shared, not copied
