"""The portable layers (pixart/nn) pick kernels per device at construction, graph mode compiles once per shape, and
the CPU kernels `pixart.cpu.accelerate` adds compute what the portable layers compute.

No Ascend NPU is available here, so the Ascend selection is checked by making the backend believe it runs there
(construction only: nothing is executed on the fake device).
"""
import numpy as np
import pytest
import mindspore as ms

from pixart import backend, cpu, nn
from pixart import demo_bundle as demo
from pixart.cpu import kernels
from pixart.cpu.layers import CPULinear
from tests.utils import rel_err


@pytest.fixture
def fake_ascend(monkeypatch):
    monkeypatch.setattr(backend, "device_target", lambda: "Ascend")
    backend.configure(None)
    yield
    monkeypatch.undo()
    backend.configure(None)


def test_cpu_selects_kernels_that_exist_on_cpu():
    assert not backend.on_ascend()
    assert not nn.LayerNorm(8).use_mint and not nn.GELU("tanh").use_mint
    assert not nn.Conv2d(2, 2, 3).use_mint and not nn.Embedding(4, 2).use_mint
    assert not nn.Linear(4, 4).use_mint
    assert nn.Attention(2, 4).flash is False
    with pytest.raises(ValueError, match="bf16 is not supported"):
        backend.dtype("bf16")
    with pytest.raises(ValueError, match="flash attention needs an Ascend device"):
        backend.configure(flash_attention=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend.dtype("fp8")


def test_ascend_selects_mint_kernels_flash_attention_and_half_precision(fake_ascend):
    assert backend.on_ascend()
    assert nn.LayerNorm(8).use_mint and nn.GELU("tanh").use_mint and nn.Linear(4, 4).use_mint
    assert nn.Conv2d(2, 2, 3).use_mint and nn.Embedding(4, 2).use_mint
    assert nn.Attention(2, 4).flash is True  # FlashAttentionScore by default on Ascend
    assert backend.dtype("bf16") == ms.bfloat16 and backend.dtype("fp16") == ms.float16
    backend.configure(flash_attention=False)  # the user may turn it off
    assert nn.Attention(2, 4).flash is False
    backend.configure(None)
    from pixart.models.pixart import PixArt, preset_config
    model = PixArt(preset_config("PixArt-XL-2-256x256", depth=1, hidden_size=72, num_heads=1, caption_channels=8,
                                 model_max_length=4))
    assert model.blocks[0].attn.attention.flash and model.blocks[0].cross_attn.attention.flash
    assert cpu.accelerate(model) is model and type(model.blocks[0].attn.qkv) is nn.Linear  # CPU kernels: CPU only


@pytest.mark.parametrize("blocks_per_graph, caption, graphs", [("0", 1, 1), ("1", 1, 3)])
@pytest.mark.slow
def test_sampling_compiles_the_transformer_once_per_shape(tmp_path, graph_mode, monkeypatch, blocks_per_graph,
                                                          caption, graphs):
    """No recompiles across steps, prompts, seeds and samplers of the same shape (counts MindSpore's own
    compile cache, not time): caption and denoiser as one graph each, or as graphs shared by the blocks (the caption
    MLP, whose tokens the blocks project to keys/values in the step; embedders + one run of blocks + final layer)."""
    monkeypatch.setenv("PIXART_BLOCKS_PER_GRAPH", blocks_per_graph)
    demo.build(tmp_path, log=lambda *_: None)
    from pixart.pipelines.text_to_image import PixArtPipeline
    comp = tmp_path / demo.COMPONENTS
    pipe = PixArtPipeline.from_pretrained(checkpoint=tmp_path / demo.CHECKPOINT, model=demo.PRESET,
                                          vae_root=comp / "vae", text_encoder_root=comp / "text_encoder",
                                          tokenizer_root=comp / "tokenizer", log=lambda *_: None)
    common = dict(height=64, width=64, use_resolution_binning=False, progress=False)
    pipe("a red square", sampler="dpm", num_inference_steps=3, seed=1, **common)
    first = pipe.transformer.compile_count()
    assert first == caption + graphs  # the caption's keys/values once per prompt, and the denoiser's graphs
    pipe("a blue circle", sampler="ddim", num_inference_steps=2, seed=2, **common)
    pipe("a green tree", sampler="sa", num_inference_steps=2, seed=3, guidance_scale=7.0, **common)
    assert pipe.transformer.compile_count() == first
    assert len(pipe.vae.compile_cache) == 1
    pipe("a red square", sampler="dpm", num_inference_steps=2, seed=1, height=64, width=96,
         use_resolution_binning=False, progress=False)
    assert pipe.transformer.compile_count() == first + graphs  # a new image shape: the denoiser once more


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU kernels (pixart/cpu): the same functions as the plain MindSpore ops
# ---------------------------------------------------------------------------------------------------------------
def _pair(make):
    """The same layer with the CPU kernels (`cpu.accelerate`) and plain, sharing parameter values."""
    fused, plain = cpu.accelerate(make()), make()
    for a, b in zip(fused.get_parameters(), plain.get_parameters()):
        b.set_data(a.data.copy())
    return fused, plain


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_fused_kernels_equal_plain_ops(mode, rng, monkeypatch):
    import mindspore as ms
    assert kernels.available()  # this machine has g++: the fast path is the one tested
    backend.setup("CPU", mode)
    try:
        t = lambda *shape: ms.Tensor(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
        x, y, gate, shift, scale = t(2, 12, 32), t(2, 12, 32), t(2, 1, 32), t(2, 1, 32), t(2, 1, 32)
        fused, plain = _pair(lambda: nn.Linear(32, 48, activation="gelu_tanh"))
        assert fused.fused_gelu is not None and type(plain) is nn.Linear
        # with the AMX matmul (bf16x3, ~1e-5) the product itself differs by more than rounding
        assert rel_err(fused(x).asnumpy(), plain(x).asnumpy()) <= (2e-5 if kernels.cpu_gemm() == "bf16x3" else 1e-6)
        fused, plain = _pair(lambda: nn.LayerNorm(32, eps=1e-6, elementwise_affine=False))
        got, want = fused.modulated(x, shift, scale), plain.modulated(x, shift, scale)
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-5)
        img = t(2, 8, 5, 6)
        fused, plain = _pair(lambda: nn.GroupNorm(4, 8))
        fused.weight.set_data(t(8)), fused.bias.set_data(t(8))
        plain.weight.set_data(fused.weight.data.copy()), plain.bias.set_data(fused.bias.data.copy())
        assert fused.fused is not None and type(plain) is nn.GroupNorm
        np.testing.assert_allclose(fused(img).asnumpy(), plain(img).asnumpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fused.silu(img).asnumpy(), plain.silu(img).asnumpy(), rtol=1e-5, atol=1e-5)
        fused, plain = _pair(nn.GatedResidual)
        np.testing.assert_allclose(fused(x, gate, y).asnumpy(), plain(x, gate, y).asnumpy(), rtol=1e-6, atol=1e-6)
        q, k, v = t(2, 20, 32), t(2, 7, 32), t(2, 7, 32)
        mask = ms.Tensor(np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7], np.int32))
        fused, plain = _pair(lambda: nn.Attention(4, 8))
        for m in (mask, None):
            np.testing.assert_allclose(fused(q, k, v, m).asnumpy(), plain(q, k, v, m).asnumpy(), rtol=1e-5,
                                       atol=1e-6)
        with monkeypatch.context() as patch:  # without the attention kernel (no AVX-512): two heads at a time
            patch.setattr(kernels, "attention", lambda masked: None)
            grouped = cpu.accelerate(nn.Attention(4, 8))
        assert grouped.attend_kernel is None
        grouped.per_head_min_tokens, grouped.head_group = 1, 2
        np.testing.assert_allclose(grouped(q, k, v, mask).asnumpy(), plain(q, k, v, mask).asnumpy(), rtol=1e-5,
                                   atol=1e-6)
        if "avx512f" in kernels._cpu_id():  # attention in one kernel: blocks of <= 256 queries
            assert fused.attend_kernel is not None and type(plain) is nn.Attention
            q, k, v = t(2, 300, 24), t(2, 45, 24), t(2, 45, 24)
            mask = ms.Tensor(np.array([[1] * 5 + [0] * 40, [0] * 45], np.int32))  # sample 2: no key kept
            fused, plain = _pair(lambda: nn.Attention(3, 8))
            for m in (mask, None):
                np.testing.assert_allclose(fused(q, k, v, m).asnumpy(), plain(q, k, v, m).asnumpy(), rtol=1e-5,
                                           atol=1e-6)
    finally:
        backend.setup("CPU", "pynative")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_block_layer_kernels_equal_plain_ops(mode, rng):
    """The PixArt layers' CPU kernels (inference): patch embedding plus position embedding in one kernel, self- and
    cross-attention reading their heads in place from the fused projections (masked, unmasked, a caption with no
    token kept; cross-attention given the caption tokens, projected in the step, or precomputed keys/values) equal
    the portable layers; KV compression keeps the portable path."""
    from pixart.models.pixart import AttentionKVCompress, MultiHeadCrossAttention, PatchEmbed
    backend.setup("CPU", mode)
    try:
        t = lambda *shape: ms.Tensor(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
        fused, plain = _pair(lambda: PatchEmbed(2, 4, 48))
        fused.set_train(False), plain.set_train(False)
        latents, pos = t(2, 4, 6, 10), t(1, 15, 48)  # a 3 x 5 grid of patches
        got, want = fused.with_position(latents, pos).asnumpy(), plain.with_position(latents, pos).asnumpy()
        assert got.shape == (2, 15, 48) and rel_err(got, want) <= 1e-6
        if "avx512f" not in kernels._cpu_id():
            return
        x, caption = t(2, 24, 48), t(2, 9, 48)
        mask = ms.Tensor(np.array([[1] * 4 + [0] * 5, [0] * 9], np.int32))  # sample 2: no caption token kept
        for sampling, ratio in ((None, 1), ("ave", 2)):
            fused, plain = _pair(lambda: AttentionKVCompress(48, 4, sampling, ratio))
            fused.set_train(False), plain.set_train(False)
            assert (fused.token_attention is not None) and type(plain) is AttentionKVCompress
            got, want = fused(x, (4, 6)).asnumpy(), plain(x, (4, 6)).asnumpy()
            assert rel_err(got, want) <= 1e-5, sampling
        fused, plain = _pair(lambda: MultiHeadCrossAttention(48, 3))
        fused.set_train(False), plain.set_train(False)
        kv = plain.caption_kv(caption)
        kept = fused.caption_kv(caption)  # inference: the caption tokens, projected in the step
        np.testing.assert_array_equal(kept.asnumpy(), caption.asnumpy())
        for m in (mask, None):
            want = plain(x, kv, m).asnumpy()
            for given in (kept, kv):  # the caption tokens or precomputed keys/values
                assert rel_err(fused(x, given, m).asnumpy(), want) <= 1e-5, (m is None, given.shape)
        fused.set_train(True)
        assert fused.caption_kv(caption).shape == kv.shape  # training: computed once (they carry gradients)
    finally:
        backend.setup("CPU", "pynative")


class _Weighted(ms.nn.Cell):
    """sum(layer.<method>(*inputs) * dy), in training mode: a scalar whose input gradients are the layer's vjp."""

    def __init__(self, layer, method, dy):
        super().__init__()
        self.layer, self.method, self.dy = layer, method, dy
        self.set_train(True)

    def construct(self, *inputs):
        return (getattr(self.layer, self.method)(*inputs) * self.dy).sum()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_fused_kernel_gradients_equal_plain_ops(mode, rng, monkeypatch):
    """Training takes the fused adaLN, gated residual and attention kernels (layouts, the one-kernel attention on
    AVX-512, else masked softmax) too: their gradients (LayerNormModulateGrad, GatedResidualGrad, AttendGrad,
    SoftmaxGrad, the layout kernels' inverses) equal those of the plain ops, w.r.t. every input."""
    backend.setup("CPU", mode)
    try:
        t = lambda *shape: ms.Tensor(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
        x, y, gate, shift, scale = t(2, 12, 32), t(2, 12, 32), t(2, 1, 32), t(2, 1, 32), t(2, 1, 32)
        q, k, v = t(2, 20, 32), t(2, 7, 32), t(2, 7, 32)
        mask = ms.Tensor(np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7], np.int32))
        q2, k2, v2 = t(2, 30, 24), t(2, 45, 24), t(2, 45, 24)  # sample 2 keeps no key: uniform weights
        mask2 = ms.Tensor(np.array([[1] * 5 + [0] * 40, [0] * 45], np.int32))

        def grouped():  # without the attention kernel (CPUs without AVX-512): the long-sequence path
            with monkeypatch.context() as patch:
                patch.setattr(kernels, "attention", lambda masked: None)
                layer = cpu.accelerate(nn.Attention(4, 8))
            layer.per_head_min_tokens, layer.head_group = 1, 2  # two heads at a time
            return layer
        cases = [(lambda: nn.LayerNorm(32, eps=1e-6, elementwise_affine=False), "modulated", (x, shift, scale)),
                 (nn.GatedResidual, "construct", (x, gate, y)),
                 (lambda: nn.Attention(4, 8), "construct", (q, k, v)),
                 (lambda: nn.Attention(4, 8), "construct", (q, k, v, mask)),
                 (grouped, "construct", (q, k, v, mask)),
                 (lambda: nn.Attention(3, 8), "construct", (q2, k2, v2, mask2))]
        for make, method, inputs in cases:
            fused, plain = _pair(make)
            if isinstance(fused, nn.Attention) and make is not grouped and "avx512f" in kernels._cpu_id():
                assert fused.attend_kernel is not None  # training takes the attention kernel and its gradient
            dy = t(*getattr(fused, method)(*inputs).shape)
            differentiable = tuple(range(3))  # not the mask
            got = ms.grad(_Weighted(fused, method, dy), differentiable)(*inputs)
            want = ms.grad(_Weighted(plain, method, dy), differentiable)(*inputs)
            for i, (a, b) in enumerate(zip(got, want)):
                assert rel_err(a.asnumpy(), b.asnumpy()) <= 2e-6, (type(fused).__name__, method, i)
    finally:
        backend.setup("CPU", "pynative")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_attention_kernels_of_several_shapes_in_one_process(mode, rng, monkeypatch):
    """Attention layers of one width with different head counts (and so head sizes), masked or not, with the
    one-kernel attention and without it, built side by side and called in turns in one process: each equals the
    plain ops of its own shape (MindSpore caches a Custom operator's output shape per name and input shapes: the head
    count, which the input shape does not tell, must be part of the key)."""
    backend.setup("CPU", mode)
    try:
        shapes = [(64, 2), (64, 4), (64, 8), (48, 3), (48, 6)]  # (width, heads)
        pairs = [(_pair(lambda: nn.Attention(h, w // h)), w) for w, h in shapes]
        with monkeypatch.context() as patch:  # without the attention kernel: layout kernels + masked softmax
            patch.setattr(kernels, "attention", lambda masked: None)
            pairs += [(_pair(lambda: nn.Attention(h, w // h)), w) for w, h in shapes]
        mask = ms.Tensor(np.array([[1] * 6 + [0] * 4, [1] * 10], np.int32))
        for _ in range(2):
            for (fused, plain), width in pairs:
                assert type(fused) is not nn.Attention
                q, k, v = (ms.Tensor(rng.standard_normal((2, n, width)).astype(np.float32)) for n in (12, 10, 10))
                for m in (mask, None):
                    got, want = fused(q, k, v, m).asnumpy(), plain(q, k, v, m).asnumpy()
                    assert rel_err(got, want) <= 1e-5, (width, fused.num_heads, m is None)  # rounding (wrong: ~1)
    finally:
        backend.setup("CPU", "pynative")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_accelerate_keeps_a_subclass_of_a_layer_its_own(mode, rng):
    """A subclass of a portable layer (LoRALinear) becomes that subclass over the CPU layer: its own `construct`
    around the CPU product and epilogue, in both modes, for inference and training, on either side of
    `kernel_max_rows`; its results equal the portable subclass's, and accelerating twice changes nothing."""
    from pixart.models.lora import LoRALinear
    backend.setup("CPU", mode)
    try:
        for rows in (40, CPULinear.kernel_max_rows + 8):
            x = ms.Tensor(rng.standard_normal((rows, 16)).astype(np.float32))
            for activation in (None, "gelu_tanh"):
                base = nn.Linear(16, 24, activation=activation)
                fast, plain = (LoRALinear(base, ("",), {"": 2}, {"": 4.0}) for _ in range(2))
                for p, q in zip((*fast.lora_A, *fast.lora_B), (*plain.lora_A, *plain.lora_B)):
                    value = rng.standard_normal(p.shape).astype(np.float32) * 0.1
                    p.set_data(ms.Tensor(value)), q.set_data(ms.Tensor(value))
                cpu.accelerate(fast)
                assert isinstance(fast, LoRALinear) and isinstance(fast, CPULinear)
                assert type(cpu.accelerate(fast)) is type(fast)
                for training in (False, True):
                    fast.set_train(training), plain.set_train(training)
                    assert rel_err(fast(x).asnumpy(), plain(x).asnumpy()) <= 1e-6, (rows, activation, training)
    finally:
        backend.setup("CPU", "pynative")


@pytest.mark.parametrize("gemm, mode", [("auto", "pynative"), ("auto", "graph"), ("bf16x3", "graph")])
def test_cpu_gemm_is_fp32_accurate_on_any_shape(gemm, mode, rng, monkeypatch):
    """Linear's CPU GEMM kernels (auto: pixart/cpu/kernels/gemm_cpu.cc on AVX-512; bf16x3: amx_gemm.cc) against float64
    on shapes with every kind of edge (M, N not multiples of the micro-tiles, K spanning several K blocks or shorter
    than one); in training bf16x3 gives way to MindSpore's fp32 MatMul (it has no gradient; the AVX-512 GEMM has one,
    test_cpu_gemm_gradients below)."""
    monkeypatch.setattr(kernels, "_STATE", {k: v for k, v in kernels._STATE.items() if k != "gemm"})  # restored after
    monkeypatch.setenv("PIXART_CPU_GEMM", gemm)
    want_kernel = {"auto": "avx512", "bf16x3": "bf16x3"}[gemm]
    if want_kernel == "bf16x3" and "amx_bf16" not in kernels._cpu_id():
        pytest.skip("this CPU has no AMX")
    if want_kernel == "avx512" and "avx512f" not in kernels._cpu_id():
        pytest.skip("this CPU has no AVX-512: Linear uses MindSpore's fp32 MatMul")
    assert kernels.cpu_gemm() == want_kernel
    backend.setup("CPU", mode)
    try:
        shapes = [(1, 1, 1), (3, 5, 7), (33, 70, 45), (64, 96, 40), (40, 1100, 65), (29, 800, 70), (17, 385, 40)]
        for (m, k, n), bias in zip(shapes, [1, 0, 1, 0, 1, 1, 0]):  # K in 1, 2 and 3 blocks
            layer = cpu.accelerate(nn.Linear(k, n, bias=bool(bias)))
            assert layer.kernel is not None
            layer.set_train(False)
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = layer.weight.asnumpy().astype(np.float64)
            b = layer.bias.asnumpy().astype(np.float64) if bias else 0.0
            want = x @ w.T + b
            # error per element relative to the size of its terms, sum |x_i w_i| + |b|: a relative error of the
            # result alone is unbounded where the terms cancel (weights are unseeded: (1, 1, 1) once gave 1e-4)
            terms = np.abs(x) @ np.abs(w).T + np.abs(b)
            err = float((np.abs(layer(ms.Tensor(x)).asnumpy() - want) / terms).max())
            assert err <= (2e-5 if gemm == "bf16x3" else 2e-6), (m, k, n, err)
        layer.set_train(True)
        if gemm == "bf16x3":  # inference only: training keeps MindSpore's MatMul
            plain = ms.ops.bias_add(ms.ops.MatMul(transpose_b=True)(ms.Tensor(x), layer.weight), layer.bias)
            np.testing.assert_array_equal(layer(ms.Tensor(x)).asnumpy(), plain.asnumpy())
        assert cpu.accelerate(nn.Linear(4, 4, strict=True)).kernel is not None  # strict: AVX-512, never bf16x3
        if gemm == "auto":  # above kernel_max_rows rows Linear keeps MatMul (bit for bit)
            monkeypatch.setattr(CPULinear, "kernel_max_rows", 16)
            layer = cpu.accelerate(nn.Linear(70, 45))
            layer.set_train(False)
            x = ms.Tensor(rng.standard_normal((33, 70)).astype(np.float32))
            plain = ms.ops.bias_add(ms.ops.MatMul(transpose_b=True)(x, layer.weight), layer.bias)
            np.testing.assert_array_equal(layer(x).asnumpy(), plain.asnumpy())
    finally:
        backend.setup("CPU", "pynative")


class _Chain(ms.nn.Cell):
    """sum(f(x) * dy) for f = Linear(70, 45) -> Linear(45, 45, GELU) -> Linear(45, 45, no bias): the three kinds of
    kernel call (bias in the kernel, bias in the epilogue, no bias) in one graph."""

    def __init__(self, dy):
        super().__init__()
        self.layers = ms.nn.CellList([nn.Linear(70, 45), nn.Linear(45, 45, activation="gelu_tanh"),
                                      nn.Linear(45, 45, bias=False)])
        self.dy = dy

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return (x * self.dy).sum()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_cpu_gemm_gradients(mode, rng):
    """In training, Linear's AVX-512 product has a gradient from the same kernel (dx = dy W, dW = dy^T x, db), and the
    fused bias + GELU one from BiasGeluTanhGrad: the gradients through Linears of every kind equal those of
    MindSpore's MatMul, BiasAdd and GELU ops."""
    if kernels.cpu_gemm() != "avx512":
        pytest.skip("Linear's product is not the AVX-512 kernel on this CPU")
    backend.setup("CPU", mode)
    try:
        x = ms.Tensor(rng.standard_normal((2, 33, 70)).astype(np.float32))
        dy = ms.Tensor(rng.standard_normal((2, 33, 45)).astype(np.float32))
        ours, with_matmul = cpu.accelerate(_Chain(dy)), _Chain(dy)  # the other: MatMul, BiasAdd and GELU as plain ops
        assert [(la.kernel_trains, la.kernel_adds_bias) for la in ours.layers] == [(True, True), (True, False),
                                                                                    (True, False)]
        for a, b in zip(ours.get_parameters(), with_matmul.get_parameters()):
            b.set_data(a.data.copy())
        grads = []
        for net in (ours, with_matmul):
            net.set_train(True)
            _, (dx, weights) = ms.value_and_grad(net, 0, net.trainable_params())(x)
            grads.append([dx.asnumpy()] + [w.asnumpy() for w in weights])
        assert len(grads[0]) == 1 + 5
        for got, want in zip(*grads):
            assert rel_err(got, want) <= 2e-6
    finally:
        backend.setup("CPU", "pynative")


def test_kernels_fall_back_when_they_cannot_be_built(tmp_path, monkeypatch):
    """No compiler (or PIXART_FUSED_KERNELS=0): a warning, `available()` False, layers keep the plain ops."""
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("PIXART_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="fused CPU kernels unavailable"):
        assert not kernels.available()
    assert type(cpu.accelerate(nn.Linear(4, 4, activation="gelu_tanh"))) is nn.Linear
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("PIXART_FUSED_KERNELS", "0")
    assert not kernels.available()


def test_kernel_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXART_KERNEL_CACHE", str(tmp_path))
    first = kernels.build()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


@pytest.mark.slow
def test_multi_aspect_training_compiles_once_per_bucket_shape(graph_mode, rng):
    """A multi-aspect epoch (batches from three buckets, interleaved, each bucket seen several times) compiles the
    training step once per bucket shape, never per step."""
    import mindspore as ms
    from pixart.diffusion.loss import DiffusionLoss
    from pixart.models.pixart import PixArt, preset_config
    from pixart.training.optimizers import build_optimizer
    from pixart.training.step import TrainStep
    model = cpu.accelerate(PixArt(preset_config("PixArt-XL-2-512x512", depth=2, hidden_size=32, num_heads=2,
                                                caption_channels=8, model_max_length=4)))
    model.set_train(True)
    step = cpu.accelerate_step(TrainStep(DiffusionLoss(model), build_optimizer("adamw", model.trainable_params(),
                                                                               1e-4)))
    step.set_train(True)
    buckets = [(8, 8), (6, 10), (10, 6)]  # latent (h, w) of three aspect ratios
    n, tokens = 2, 4
    for epoch_step in range(9):
        h, w = buckets[epoch_step % 3]
        batch = [rng.standard_normal((n, 4, h, w)).astype(np.float32), rng.integers(0, 1000, n).astype(np.int32),
                 rng.standard_normal((n, 4, h, w)).astype(np.float32),
                 rng.standard_normal((n, 1, tokens, 8)).astype(np.float32), np.ones((n, tokens), np.int32),
                 np.tile(np.array([[h * 8, w * 8]], np.float32), (n, 1)), np.full((n, 1), h / w, np.float32),
                 (rng.random(n) < 0.5).astype(np.int32)]
        loss, *_ = step(*(ms.Tensor(b) for b in batch), ms.Tensor(1e-4, ms.float32))
        assert np.isfinite(loss.asnumpy())
        assert len(step.compile_cache) == min(epoch_step + 1, len(buckets))


def test_half_precision_storage_per_device(monkeypatch):
    """On CPU a half dtype is the Linear weights' storage, every other parameter fp32 (MindSpore's CPU kernels
    compute fp32; the Linear products go through pixart.cpu's kernels); on Ascend it is every parameter's (the
    reference port's), and the default precisions are the reference port's fp16."""
    class Net(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

    net = Net()
    assert {k: str(v) for k, v in backend.parameter_dtypes(net, "fp16").items()} == {
        "lin.weight": "Float16", "lin.bias": "Float32", "norm.weight": "Float32", "norm.bias": "Float32"}
    assert backend.compute_dtype("fp16") == ms.float32
    monkeypatch.setattr(backend, "device_target", lambda: "Ascend")
    assert set(backend.parameter_dtypes(net, "bf16").values()) == {ms.bfloat16}
    assert backend.compute_dtype("fp16") == ms.float16
    assert backend.default_dtype() == backend.default_text_encoder_dtype() == "fp16"
