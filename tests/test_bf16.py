"""Half precision on MindSpore's CPU backend: Linear weights (and embedding tables) stored in bf16 (vdpbf16ps, on
CPUs with AVX512_BF16) or fp16 (widened per panel), everything else fp32. The GEMM against float64 with the bound of its inputs' rounding and
fp32 accumulation; the transformer and T5 in bf16 against the fp32 PyTorch reference, within the error PyTorch's own
bf16 run shows (both measured here); the refusal where the CPU lacks bf16."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor

from pixart import backend, cpu
from pixart.cpu import kernels
from pixart.io import diffusers_to_original, load_into
from pixart.models.convert import fill_null_caption
from pixart.models.pixart import PixArt, preset_config
from pixart.models.t5 import load_t5
from tests.test_t5 import TINY, hf_folder, padded_batch
from tests.utils import diffusers_model, inputs, rel_err, run_diffusers, run_ours

needs_bf16 = pytest.mark.skipif(not backend.cpu_supports_bf16(),
                                reason="this CPU lacks AVX512_BF16: bf16 is refused here (test_refused_without_bf16)")
needs_kernels = pytest.mark.skipif(not kernels.half_weights("fp16"), reason="the AVX-512 GEMM kernels are not built")


def bf16_round(a):
    """float32 -> the nearest bf16 (ties to even), as float32."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


@needs_kernels
def test_threaded_bf16_conversion_equals_mindspores_cast():
    """The loader's fp16 / fp32 -> bf16 converter (all threads) gives MindSpore's cast bit for bit: every finite
    fp16 value, and fp32 values with rounding ties, carries into the exponent, subnormals and odd lengths (masked
    tails); a bf16 parameter loaded from fp16 weights holds the same bits either way."""
    g = np.random.default_rng(0)
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    every_half = every_half[np.isfinite(every_half)]
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 1, 0x807FFFFF, 0x00008000],
                    np.uint32).view(np.float32)
    wide = (g.standard_normal(100_003) * 10.0 ** g.integers(-44, 38, 100_003)).astype(np.float32)
    floats = np.concatenate([ties, wide[np.isfinite(wide)]])
    assert floats.dtype == np.float32 and (np.abs(floats) < np.finfo(np.float32).tiny).sum() > 1000
    for arr in (every_half, floats, floats[:13], every_half[:1], every_half[:4096].reshape(64, 64)):
        fast = kernels.to_bf16(arr)
        assert fast is not None and fast.shape == arr.shape
        got = ms.from_numpy(fast).astype(ms.float32).asnumpy()
        want = Tensor(arr, dtype=ms.bfloat16).astype(ms.float32).asnumpy()
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # its library is built without fast-math: loading it leaves the calling thread's subnormals alone (a fresh
    # process: this one has loaded the GEMM library, which turns flush-to-zero on)
    code = ("import numpy as np; from pixart.cpu import kernels; tiny = np.float32(1e-39); "
            "assert kernels.to_bf16(np.ones(3, np.float16)) is not None; assert tiny * np.float32(1) > 0")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    net = ms.nn.Dense(64, 64, has_bias=False)
    net.weight.set_dtype(ms.bfloat16)
    load_into(net, {"weight": every_half[:4096].reshape(64, 64)}, share=True)
    np.testing.assert_array_equal(net.weight.astype(ms.float32).asnumpy(), bf16_round(every_half[:4096].reshape(64, 64)))


@needs_kernels
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_weight_gemm_against_float64(name):
    """x (M, K) fp32 times W (N, K) stored in `name` (+ b): the exact product of the rounded operands (bf16: x is
    rounded too, as a bf16 model's activations are) within fp32 accumulation's bound K * 2^-23 * |x| |W|, and the
    product of the unrounded fp32 operands within the inputs' rounding (2^-8 per bf16 operand, 2^-11 per fp16)."""
    if name == "bf16" and not kernels.half_weights("bf16"):
        pytest.skip("this CPU lacks AVX512_BF16 (or the kernel was built without it)")
    g = np.random.default_rng(0)
    dt = {"bf16": ms.bfloat16, "fp16": ms.float16}[name]
    unit = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[name]  # relative rounding of one operand, with margin
    # odd K and M > 512 take the packed-panel kernel, the rest the few-rows one (row tails of 8, 16, 24 and 32;
    # several K blocks with a short last one; W row groups cut short)
    for m, k, n in [(1, 1, 1), (3, 5, 7), (14, 32, 32), (15, 33, 33), (100, 391, 70), (337, 1152, 97), (2, 6, 5),
                    (9, 34, 15), (120, 600, 130), (520, 64, 40)]:
        x = g.standard_normal((m, k)).astype(np.float32)
        w = g.standard_normal((n, k)).astype(np.float32)
        b = g.standard_normal(n).astype(np.float32)
        wt = Tensor(w).astype(dt)
        wq = wt.astype(ms.float32).asnumpy().astype(np.float64)
        xq = (bf16_round(x) if name == "bf16" else x).astype(np.float64)
        y = kernels.half_linear_product(True)(Tensor(x), wt, Tensor(b)).asnumpy()
        y0 = kernels.half_linear_product(False)(Tensor(x), wt).asnumpy()
        assert y.dtype == np.float32 and y.shape == (m, n)
        scale = np.abs(xq) @ np.abs(wq).T
        exact = xq @ wq.T
        assert np.all(np.abs(y - (exact + b)) <= k * 2.0 ** -23 * scale + 2.0 ** -22 * np.abs(b)), (m, k, n)
        assert np.all(np.abs(y0 - exact) <= k * 2.0 ** -23 * scale), (m, k, n)
        full = x.astype(np.float64) @ w.astype(np.float64).T
        assert np.all(np.abs(y0 - full) <= (2 * unit + k * 2.0 ** -23) * np.abs(x) @ np.abs(w).T), (m, k, n)


def _pixart(cfg, state, name):
    model = PixArt(cfg)
    load_into(model, state)
    return cpu.accelerate(backend.cast_parameters(model, name))


@needs_bf16
@needs_kernels
def test_transformer_bf16_within_pytorch_bf16_error(graph_mode):
    """A 2-block PixArt (graph mode, as sampling runs it): bf16 and fp16 weights against diffusers' fp32 output,
    each within the error of diffusers' own bf16 run; only the Linear weights are half, stored in half."""
    heads, head_dim, caption = 4, 32, 64
    cfg = preset_config("PixArt-XL-2-256x256", depth=2, hidden_size=heads * head_dim, num_heads=heads,
                        caption_channels=caption)
    ref = diffusers_model(dict(sample_size=32), heads=heads, head_dim=head_dim, caption_channels=caption)
    state, unmapped = diffusers_to_original({k: v.numpy() for k, v in ref.state_dict().items()})
    assert not unmapped
    fill_null_caption(state, cfg, 120, log=lambda *_: None)
    args = inputs((16, 16), False, caption_channels=caption)
    want = run_diffusers(ref, *args)
    torch_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    x, t, y, mask, _ = args
    with torch.no_grad():
        got = torch_bf16(torch.from_numpy(x).bfloat16(), encoder_hidden_states=torch.from_numpy(y).bfloat16(),
                         timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.float().numpy()
    torch_err = rel_err(got, want)
    errs = {}
    for name, dt in (("bf16", ms.bfloat16), ("fp16", ms.float16)):
        model = _pixart(cfg, state, name)
        linear = backend.linear_weights(model)
        assert linear and all((p.dtype == dt) == (id(p) in linear) for p in model.get_parameters())
        out = run_ours(model, *args)
        assert out.dtype == np.float32
        errs[name] = rel_err(out, want)
    print(f"vs diffusers fp32: PyTorch bf16 {torch_err:.2e}, ours bf16 {errs['bf16']:.2e}, fp16 {errs['fp16']:.2e}")
    assert errs["bf16"] <= torch_err and errs["fp16"] <= torch_err / 4


@needs_bf16
@needs_kernels
def test_caption_keys_values_recomputed_each_step_in_bf16(graph_mode):
    """In CPU inference, sampling keeps only the caption tokens (one tensor for every block) and each block projects
    its cross-attention keys/values in the step, as a bf16 PyTorch model does: the same output as the denoiser given
    the projections precomputed; in training each block's keys/values are computed once (they carry gradients)."""
    heads, caption = 2, 16
    cfg = preset_config("PixArt-XL-2-256x256", depth=2, hidden_size=heads * 32, num_heads=heads,
                        caption_channels=caption)
    model = cpu.accelerate(backend.cast_parameters(PixArt(cfg), "bf16"))
    model.set_train(False)
    x, t, y, mask, _ = inputs((8, 8), False, caption_channels=caption)
    x, t, y, mask = Tensor(x), Tensor(t), Tensor(y[:, None]), Tensor(mask.astype(np.int32))
    encode, denoise = model.sampler_parts()
    kept = encode(y)
    caption_tokens = model.embed_caption(y).asnumpy()
    assert len(kept) == len(model.blocks) and all(kv is kept[0] for kv in kept)
    np.testing.assert_array_equal(kept[0].asnumpy(), caption_tokens)
    got = denoise(x, t, kept, mask).asnumpy()
    projected = ms.mutable(tuple(block.cross_attn.kv_linear(Tensor(caption_tokens)) for block in model.blocks))
    assert all(kv.shape[-1] == 2 * heads * 32 for kv in projected)
    want = denoise(x, t, projected, mask).asnumpy()
    assert np.isfinite(got).all() and rel_err(got, want) < 1e-6
    model.set_train(True)
    assert all(kv.shape[-1] == 2 * heads * 32 for kv in model.encode_caption(y))


@needs_bf16
@needs_kernels
def test_mlp_kernel_equals_the_two_linear_layers():
    """The block MLP with bf16 weights as one kernel (the hidden layer a block of rows at a time) computes what fc1
    (+ GELU) and fc2 compute: bit for bit where the rows fit one block, to rounding where they span several (the
    blocks take the few-rows product); in training the two layers run."""
    from pixart.models.pixart import Mlp
    backend.setup("CPU", "pynative")
    mlp = cpu.accelerate(backend.cast_parameters(Mlp(64, 256, 64), "bf16"))
    mlp.set_train(False)
    assert mlp.fused is not None
    g = np.random.default_rng(0)
    for rows, exact in ((37, True), (600, False)):
        x = Tensor(g.standard_normal((2, rows, 64)).astype(np.float32))
        got = mlp(x).asnumpy()
        want = mlp.fc2(mlp.fc1(x)).asnumpy()  # the Linear layers' own kernels
        assert got.shape == (2, rows, 64) and np.isfinite(got).all()
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            assert rel_err(got, want) < 1e-5
    mlp.set_train(True)
    x = Tensor(g.standard_normal((2, 5, 64)).astype(np.float32))
    np.testing.assert_array_equal(mlp(x).asnumpy(), mlp.fc2(mlp.fc1(x)).asnumpy())


@needs_bf16
@needs_kernels
def test_t5_bf16_within_pytorch_bf16_error(tmp_path):
    """T5 v1.1 (gated-GELU, padded batch): bf16 and fp16 storage against transformers' fp32 output, within the
    error of transformers' own bf16 run; Linear weights and embedding tables stored half, the rest (norms) fp32; the
    attention and gated-GELU kernels in use, and at fp32 equal to transformers' output."""
    hf = hf_folder(tmp_path, d_model=256, d_kv=32, num_heads=8, d_ff=512)
    ids, mask = padded_batch(TINY["vocab_size"])
    outs = {}
    for dt, model in (("fp32", hf), ("bf16", copy.deepcopy(hf).to(torch.bfloat16))):
        with torch.no_grad():
            outs[dt] = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
                             ).last_hidden_state.float().numpy()
    torch_err = rel_err(outs["bf16"], outs["fp32"])
    errs = {}
    for name, dt in (("bf16", ms.bfloat16), ("fp16", ms.float16)):
        model = cpu.accelerate(load_t5(tmp_path, name))
        assert {str(p.dtype) for p in model.get_parameters()} == {str(dt), "Float32"}
        assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == dt == model.shared.weight.dtype
        errs[name] = rel_err(model(Tensor(ids), Tensor(mask)).asnumpy(), outs["fp32"])
    attention, ffn = model.encoder.block[0].layer[0].SelfAttention, model.encoder.block[0].layer[1].DenseReluDense
    assert attention.fused is not None and ffn.fused is not None  # T5's attention and gated GELU kernels in use
    fp32 = cpu.accelerate(load_t5(tmp_path, "fp32"))  # the same kernels at fp32: HF's numbers to fp32 rounding
    assert rel_err(fp32(Tensor(ids), Tensor(mask)).asnumpy(), outs["fp32"]) <= 1e-5
    plain = load_t5(tmp_path, "bf16")  # without pixart.cpu's kernels: the portable layers widen the weights per call
    errs["portable"] = rel_err(plain(Tensor(ids), Tensor(mask)).asnumpy(), outs["fp32"])
    print(f"vs transformers fp32: bf16 {torch_err:.2e}; ours bf16 {errs['bf16']:.2e}, fp16 {errs['fp16']:.2e}, "
          f"bf16 portable {errs['portable']:.2e}")
    assert errs["bf16"] <= torch_err and errs["fp16"] <= torch_err / 4 and errs["portable"] <= torch_err


def test_refused_without_bf16(monkeypatch, tmp_path, capsys):
    """A CPU without AVX512_BF16: bf16 refused in one line before anything loads; the defaults fall back (fp32
    transformer, fp16-stored T5); a config's bf16 becomes fp32 with a warning naming why."""
    from pixart.cli.options import check_execution
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx512f"})
    assert not backend.cpu_supports_bf16()
    with pytest.raises(ValueError) as err:
        backend.weight_dtype("bf16")
    assert "AVX512_BF16" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="AVX512_BF16"):
        load_t5(tmp_path / "missing", "bf16")  # refused before reading
    assert backend.default_dtype() == "fp32" and backend.default_text_encoder_dtype() == "fp16"
    assert backend.weight_dtype("fp16") == ms.float16
    args = type("Args", (), dict(device_target="CPU", dtype="bf16", text_encoder_dtype="fp16",
                                 enable_flash_attention=None))()
    check_execution(args, stream=None)
    assert args.dtype == "fp32" and "AVX512_BF16" in capsys.readouterr().err
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert backend.weight_dtype("bf16") == ms.bfloat16 and backend.default_dtype() == "bf16"
