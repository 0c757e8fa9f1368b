"""The backend layer picks kernels per device at construction, and graph mode compiles once per shape.

No Ascend NPU is available here, so the Ascend selection is checked by making the backend believe it runs there
(construction only: nothing is executed on the fake device).
"""
import numpy as np
import pytest
import mindspore as ms

from pixart import backend, demo


@pytest.fixture
def fake_ascend(monkeypatch):
    monkeypatch.setattr(backend, "device_target", lambda: "Ascend")
    backend.configure(None)
    yield
    monkeypatch.undo()
    backend.configure(None)


def test_cpu_selects_kernels_that_exist_on_cpu():
    assert not backend.on_ascend()
    assert not backend.LayerNorm(8).use_mint and not backend.GELU("tanh").use_mint
    assert not backend.Conv2d(2, 2, 3).use_mint and not backend.Embedding(4, 2).use_mint
    assert not backend.Linear(4, 4).use_mint
    assert backend.Attention(2, 4).flash is False
    with pytest.raises(ValueError, match="bf16 is not supported"):
        backend.dtype("bf16")
    with pytest.raises(ValueError, match="flash attention needs an Ascend device"):
        backend.configure(flash_attention=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend.dtype("fp8")


def test_ascend_selects_mint_kernels_flash_attention_and_half_precision(fake_ascend):
    assert backend.on_ascend()
    assert backend.LayerNorm(8).use_mint and backend.GELU("tanh").use_mint and backend.Linear(4, 4).use_mint
    assert backend.Conv2d(2, 2, 3).use_mint and backend.Embedding(4, 2).use_mint
    assert backend.Attention(2, 4).flash is True  # FlashAttentionScore by default on Ascend
    assert backend.dtype("bf16") == ms.bfloat16 and backend.dtype("fp16") == ms.float16
    backend.configure(flash_attention=False)  # the user may turn it off
    assert backend.Attention(2, 4).flash is False
    backend.configure(None)
    from pixart.models.pixart import PixArt, preset_config
    model = PixArt(preset_config("PixArt-XL-2-256x256", depth=1, hidden_size=72, num_heads=1, caption_channels=8,
                                 model_max_length=4))
    assert model.blocks[0].attn.attention.flash and model.blocks[0].cross_attn.attention.flash


def test_sampling_compiles_the_transformer_once_per_shape(tmp_path, graph_mode):
    """No recompiles across steps, prompts, seeds and samplers of the same shape (counts MindSpore's own
    compile cache, not time)."""
    demo.build(tmp_path, log=lambda *_: None)
    from pixart.pipelines.text_to_image import PixArtPipeline
    comp = tmp_path / demo.COMPONENTS
    pipe = PixArtPipeline.from_pretrained(checkpoint=tmp_path / demo.CHECKPOINT, model=demo.PRESET,
                                          vae_root=comp / "vae", text_encoder_root=comp / "text_encoder",
                                          tokenizer_root=comp / "tokenizer", log=lambda *_: None)
    common = dict(height=64, width=64, use_resolution_binning=False, progress=False)
    pipe("a red square", sampler="dpm", num_inference_steps=3, seed=1, **common)
    assert len(pipe.transformer.compile_cache) == 1
    pipe("a blue circle", sampler="ddim", num_inference_steps=2, seed=2, **common)
    pipe("a green tree", sampler="sa", num_inference_steps=2, seed=3, guidance_scale=7.0, **common)
    assert len(pipe.transformer.compile_cache) == 1
    assert len(pipe.vae.compile_cache) == 1
    pipe("a red square", sampler="dpm", num_inference_steps=2, seed=1, height=64, width=96,
         use_resolution_binning=False, progress=False)
    assert len(pipe.transformer.compile_cache) == 2  # a new shape is one more compile, no more
