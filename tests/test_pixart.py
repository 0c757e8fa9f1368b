"""PixArt transformer: parity with diffusers' PixArtTransformer2DModel through tools/convert.py, KV compression
and qk-norm against NumPy, graph mode against PyNative, and clear errors for bad checkpoints."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import mindspore as ms

from pixart.checkpoints import CheckpointError, read_state_dict, load_into
from pixart.models.pixart import PixArt, AttentionKVCompress, preset_config
from tests.utils import rel_err

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 2
CASES = {  # preset -> (diffusers config, latent (H, W))
    "PixArt-XL-2-256x256": (dict(sample_size=32), (32, 32)),
    "PixArt-XL-2-1024-MS": (dict(sample_size=128, use_additional_conditions=True), (32, 48)),
    "PixArt-Sigma-XL-2-1024-MS": (dict(sample_size=128, use_additional_conditions=False, interpolation_scale=2),
                                  (24, 40)),
}


def diffusers_model(extra: dict, seed: int = 0):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=DEPTH,
        cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000, **extra)
    with torch.no_grad():  # the default init zeroes the output layers; make every weight matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))
    return model.eval()


def to_original(state: dict, y_tokens: int, pos_tokens: int) -> dict:
    """The test's own diffusers -> original renaming (written out independently of pixart.checkpoints)."""
    s = {k: v.clone() for k, v in state.items()}
    out = {"x_embedder.proj.weight": s.pop("pos_embed.proj.weight"), "x_embedder.proj.bias": s.pop("pos_embed.proj.bias")}
    s.pop("pos_embed.pos_embed", None)
    pairs = {"caption_projection.linear_1": "y_embedder.y_proj.fc1", "caption_projection.linear_2": "y_embedder.y_proj.fc2",
             "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
             "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
             "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
             "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
             "adaln_single.linear": "t_block.1", "proj_out": "final_layer.linear"}
    for a, b in pairs.items():
        for suffix in ("weight", "bias"):
            if f"{a}.{suffix}" in s:
                out[f"{b}.{suffix}"] = s.pop(f"{a}.{suffix}")
    out["final_layer.scale_shift_table"] = s.pop("scale_shift_table")
    for i in range(DEPTH):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = s.pop(b + "scale_shift_table")
        for suffix in ("weight", "bias"):
            out[o + f"attn.qkv.{suffix}"] = torch.cat([s.pop(b + f"attn1.to_{n}.{suffix}") for n in "qkv"])
            out[o + f"attn.proj.{suffix}"] = s.pop(b + f"attn1.to_out.0.{suffix}")
            out[o + f"cross_attn.q_linear.{suffix}"] = s.pop(b + f"attn2.to_q.{suffix}")
            out[o + f"cross_attn.kv_linear.{suffix}"] = torch.cat([s.pop(b + f"attn2.to_{n}.{suffix}") for n in "kv"])
            out[o + f"cross_attn.proj.{suffix}"] = s.pop(b + f"attn2.to_out.0.{suffix}")
            out[o + f"mlp.fc1.{suffix}"] = s.pop(b + f"ff.net.0.proj.{suffix}")
            out[o + f"mlp.fc2.{suffix}"] = s.pop(b + f"ff.net.2.{suffix}")
    assert not s, f"test mapping left keys: {list(s)}"
    out["y_embedder.y_embedding"] = torch.randn(y_tokens, 4096) / 64
    out["pos_embed"] = torch.zeros(1, pos_tokens, 1152)
    return out


def inputs(hw, micro: bool, seed: int = 1):
    g = np.random.default_rng(seed)
    n, length = 2, 16
    x = g.standard_normal((n, 4, *hw)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    y = g.standard_normal((n, length, 4096)).astype(np.float32)
    mask = np.ones((n, length), np.int64)
    mask[1, 5:] = 0  # the second caption is padded after 5 tokens
    info = {"img_hw": np.array([[hw[0] * 8, hw[1] * 8]] * n, np.float32),
            "aspect_ratio": np.array([[hw[0] / hw[1]]] * n, np.float32)} if micro else None
    return x, t, y, mask, info


def run_ours(model, x, t, y, mask, info):
    data_info = {k: ms.Tensor(v) for k, v in info.items()} if info else None
    out = model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(y[:, None]), ms.Tensor(mask.astype(np.int32)), data_info)
    return out.asnumpy()


def run_diffusers(model, x, t, y, mask, info):
    cond = {"resolution": torch.from_numpy(info["img_hw"]), "aspect_ratio": torch.from_numpy(info["aspect_ratio"])} \
        if info else {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        return model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                     encoder_attention_mask=torch.from_numpy(mask), added_cond_kwargs=cond).sample.numpy()


def convert(source, target, *extra):
    from tools.convert import main
    assert main(["--source", str(source), "--target", str(target), *extra]) == 0
    return read_state_dict(target)


@pytest.mark.parametrize("preset", list(CASES))
@pytest.mark.slow
@pytest.mark.parity
def test_parity_with_diffusers_via_both_checkpoint_formats(preset, tmp_path, capsys):
    extra, hw = CASES[preset]
    ref = diffusers_model(extra)
    cfg = preset_config(preset, depth=DEPTH)
    ref.save_pretrained(tmp_path / "diffusers")
    side = cfg.input_size // 2
    torch.save({"state_dict": to_original(ref.state_dict(), cfg.model_max_length, side * side)}, tmp_path / "orig.pth")

    from_pth = convert(tmp_path / "orig.pth", tmp_path / "a.ckpt")
    assert "pos_embed" not in from_pth
    from_diffusers = convert(tmp_path / "diffusers", tmp_path / "b.ckpt", "--model_max_length",
                             str(cfg.model_max_length))
    printed = capsys.readouterr().out
    assert "no public preset matches exactly" in printed  # depth 2 is not a public checkpoint ...
    assert f"closest: {preset}" in printed and "depth=2" in printed  # ... but it is recognised as a shrunk one

    x, t, y, mask, info = inputs(hw, cfg.micro_condition)
    expected = run_diffusers(ref, x, t, y, mask, info)
    for state in (from_pth, from_diffusers):
        model = PixArt(cfg)
        load_into(model, state)
        err = rel_err(run_ours(model, x, t, y, mask, info), expected)
        assert err <= 1e-4, f"{preset}: relative error {err:.2e}"
    # the padded caption tokens really are ignored: changing them changes nothing
    y2 = y.copy()
    y2[1, 5:] += 3.0
    assert rel_err(run_ours(model, x, t, y2, mask, info), expected) <= 1e-4


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
    attn = AttentionKVCompress(c, heads, sampling=sampling, sr_ratio=2 if sampling else 1, qk_norm=qk_norm)
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
    model = PixArt(cfg)
    names = {p.name for p in model.get_parameters()}
    assert "blocks.14.attn.sr.weight" in names and "blocks.15.attn.norm.bias" in names
    assert "blocks.13.attn.sr.weight" not in names
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 24)).astype(np.float32)
    out = model(ms.Tensor(x), ms.Tensor(np.array([5.0], np.float32)),
                ms.Tensor(np.zeros((1, 1, 8, 32), np.float32)), None)
    assert out.shape == (1, 8, 16, 24) and np.isfinite(out.asnumpy()).all()


@pytest.mark.slow
def test_graph_mode_matches_pynative(graph_mode):
    cfg = preset_config("PixArt-XL-2-1024-MS", depth=DEPTH)
    ref = diffusers_model(CASES["PixArt-XL-2-1024-MS"][0])
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    from pixart.checkpoints import diffusers_to_original, fill_null_caption
    state, unmapped = diffusers_to_original(state)
    assert not unmapped
    fill_null_caption(state, cfg, 120, log=lambda *_: None)
    args = inputs((32, 48), True)
    model = PixArt(cfg)
    load_into(model, state)
    graph_out = run_ours(model, *args)
    from pixart import backend
    backend.setup("CPU", "pynative")
    model = PixArt(cfg)
    load_into(model, state)
    assert rel_err(graph_out, run_ours(model, *args)) <= 1e-5
    assert rel_err(graph_out, run_diffusers(ref, *args)) <= 1e-4


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.e2e
def test_convert_rejects_other_architectures_with_named_keys(tmp_path):
    small = PixArt(preset_config("PixArt-XL-2-256x256", depth=2, hidden_size=64, num_heads=4, caption_channels=32,
                                 model_max_length=8))
    from pixart.checkpoints import write_safetensors
    state = {p.name: p.asnumpy() for p in small.get_parameters()}
    write_safetensors(state, tmp_path / "small.safetensors")
    r = _cli("--source", tmp_path / "small.safetensors", "--target", tmp_path / "x.ckpt", "--preset",
             "PixArt-XL-2-256x256")
    assert r.returncode == 1, r.stderr
    assert "missing keys (390): blocks.{2..27}.scale_shift_table" in r.stderr and "shape mismatches" in r.stderr
    assert "closest: PixArt-XL-2-256x256" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.ckpt").exists()

    state["blocks.0.attn.bogus.weight"] = np.zeros(3, np.float32)  # a key no PixArt has
    write_safetensors(state, tmp_path / "odd.safetensors")
    r = _cli("--source", tmp_path / "odd.safetensors", "--target", tmp_path / "y.ckpt")
    assert r.returncode == 1 and "unexpected keys (1): blocks.0.attn.bogus.weight" in r.stderr

    write_safetensors({"encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((4, 4), np.float32)},
                      tmp_path / "t5.safetensors")
    r = _cli("--source", tmp_path / "t5.safetensors", "--target", tmp_path / "z.ckpt")
    assert r.returncode == 1 and "not a PixArt transformer checkpoint" in r.stderr


@pytest.mark.e2e
def test_convert_missing_file_is_one_line(tmp_path):
    r = _cli("--source", tmp_path / "nope.pth", "--target", tmp_path / "x.ckpt")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "checkpoint not found" in r.stderr


def test_load_into_reports_all_problems():
    model = PixArt(preset_config("PixArt-XL-2-256x256", depth=1, hidden_size=64, num_heads=4, caption_channels=32,
                                 model_max_length=8))
    state = {p.name: p.asnumpy() for p in model.get_parameters()}
    state.pop("t_block.1.bias")
    state["final_layer.linear.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError) as e:
        load_into(model, state)
    assert "missing keys (1): t_block.1.bias" in str(e.value)
    assert "final_layer.linear.weight: checkpoint (3, 3) vs model (32, 64)" in str(e.value)


def test_ckpt_reader_equals_mindspore_and_falls_back(tmp_path):
    """.ckpt files are streamed from a map of the file (one copy of the weights at most, shared where aligned); every
    dtype and shape must come back exactly as MindSpore's own reader gives it, and a file it cannot parse goes to
    MindSpore's reader (a CheckpointError where that fails too)."""
    from pixart.checkpoints import _read_ckpt_stream, read_ckpt, write_ckpt
    g = np.random.default_rng(0)
    state = {"a.weight": g.standard_normal((7, 5)).astype(np.float32),  # odd sizes: unaligned contents follow
             "b": g.standard_normal((3,)).astype(np.float16), "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
             "long_name." * 9 + "w": g.standard_normal((2, 3, 4)).astype(np.float32),
             "steps": np.array([12], np.int64), "flag": np.array([True, False])}
    path = tmp_path / "x.ckpt"
    write_ckpt(state, path)
    ours, ref = _read_ckpt_stream(path), {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    assert list(ours) == list(ref) and set(ours) == set(state)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(ours[k], ref[k])
    bf16 = tmp_path / "bf16.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(state["a.weight"]).astype(ms.bfloat16)}], str(bf16))
    np.testing.assert_array_equal(read_ckpt(bf16)["w"], ms.load_checkpoint(str(bf16))["w"].float().asnumpy())
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x0a\x05hello" + b"\xff" * 40)
    with pytest.raises(ValueError):
        _read_ckpt_stream(bad)
    with pytest.raises(CheckpointError, match="not a readable MindSpore checkpoint"):
        read_ckpt(bad)
