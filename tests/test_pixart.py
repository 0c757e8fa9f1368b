"""PixArt transformer: KV compression and qk-norm against NumPy, graph mode against PyNative and diffusers.
(Conversion from every checkpoint format and its parity with diffusers: tests/test_convert.py.)"""
import numpy as np
import pytest
import mindspore as ms

from pixart import cpu
from pixart.io import diffusers_to_original, load_into
from pixart.models.convert import fill_null_caption
from pixart.models.pixart import PixArt, AttentionKVCompress, preset_config
from tests.utils import diffusers_model, inputs, rel_err, run_diffusers, run_ours

DEPTH = 2
ALPHA_1024 = dict(sample_size=128, use_additional_conditions=True)


def numpy_kv_attention(x, hw, w, heads, sampling, r, qk_norm):
    """AttentionKVCompress written out from the paper's formulas in float64."""
    def ln(a, g, b, eps=1e-5):
        return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + eps) * g + b
    n, t, c = x.shape
    qkv = x @ w["qkv.weight"].T + w["qkv.bias"]
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    if qk_norm:
        q, k = ln(q, w["q_norm.weight"], w["q_norm.bias"]), ln(k, w["k_norm.weight"], w["k_norm.bias"])
    h, wd = hw

    def compress(a):
        a = a.reshape(n, h, wd, c)
        if sampling == "conv":  # depthwise conv, kernel = stride = r: a weighted sum over each r x r patch
            kern = w["sr.weight"][:, 0]  # (C, r, r)
            out = np.zeros((n, h // r, wd // r, c))
            for i in range(h // r):
                for j in range(wd // r):
                    patch = a[:, i * r:(i + 1) * r, j * r:(j + 1) * r, :]  # (N, r, r, C)
                    out[:, i, j] = np.einsum("nabc,cab->nc", patch, kern) + w["sr.bias"]
            return ln(out.reshape(n, -1, c), w["norm.weight"], w["norm.bias"])
        rows = np.floor(np.arange(h // r) * r).astype(int)  # nearest-neighbour / uniform pick the same pixels
        cols = np.floor(np.arange(wd // r) * r).astype(int)
        return a[:, rows][:, :, cols].reshape(n, -1, c)

    if sampling is not None:
        k, v = compress(k), compress(v)
    d = c // heads
    qh = q.reshape(n, t, heads, d).transpose(0, 2, 1, 3)
    kh = k.reshape(n, -1, heads, d).transpose(0, 2, 1, 3)
    vh = v.reshape(n, -1, heads, d).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ vh).transpose(0, 2, 1, 3).reshape(n, t, c)
    return o @ w["proj.weight"].T + w["proj.bias"]


@pytest.mark.parametrize("sampling,qk_norm", [("conv", True), ("ave", False), ("uniform", True), (None, True)])
def test_kv_compression_and_qk_norm_match_numpy(sampling, qk_norm):
    g = np.random.default_rng(3)
    c, heads, hw = 64, 4, (8, 12)
    attn = cpu.accelerate(AttentionKVCompress(c, heads, sampling=sampling, sr_ratio=2 if sampling else 1,
                                              qk_norm=qk_norm))
    weights = {}
    for p in attn.get_parameters():
        value = g.standard_normal(p.shape).astype(np.float32) * (p.shape[-1] ** -0.5 if len(p.shape) > 1 else 0.5)
        p.set_data(ms.Tensor(value))
        weights[p.name] = value.astype(np.float64)
    x = g.standard_normal((2, hw[0] * hw[1], c)).astype(np.float32)
    ours = attn(ms.Tensor(x), hw).asnumpy()
    assert rel_err(ours, numpy_kv_attention(x.astype(np.float64), hw, weights, heads, sampling, 2, qk_norm)) <= 1e-5


def test_kv_compressed_preset_runs_and_names_match_original():
    cfg = preset_config("PixArt-Sigma-XL-2-1024-MS-KV", depth=16, hidden_size=64, num_heads=4, caption_channels=32,
                        model_max_length=8)
    model = cpu.accelerate(PixArt(cfg))
    names = {p.name for p in model.get_parameters()}
    assert "blocks.14.attn.sr.weight" in names and "blocks.15.attn.norm.bias" in names
    assert "blocks.13.attn.sr.weight" not in names
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 24)).astype(np.float32)
    out = model(ms.Tensor(x), ms.Tensor(np.array([5.0], np.float32)),
                ms.Tensor(np.zeros((1, 1, 8, 32), np.float32)), None)
    assert out.shape == (1, 8, 16, 24) and np.isfinite(out.asnumpy()).all()


def test_graph_mode_matches_pynative(graph_mode):
    cfg = preset_config("PixArt-XL-2-1024-MS", depth=DEPTH)
    ref = diffusers_model(ALPHA_1024)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    state, unmapped = diffusers_to_original(state)
    assert not unmapped
    fill_null_caption(state, cfg, 120, log=lambda *_: None)
    args = inputs((32, 48), True)
    model = cpu.accelerate(PixArt(cfg))
    load_into(model, state)
    graph_out = run_ours(model, *args)
    from pixart import backend
    backend.setup("CPU", "pynative")
    model = cpu.accelerate(PixArt(cfg))
    load_into(model, state)
    assert rel_err(graph_out, run_ours(model, *args)) <= 1e-5
    assert rel_err(graph_out, run_diffusers(ref, *args)) <= 1e-4


