"""PixArt-δ ControlNet: the model (names, zero start, control scale 0), conversion of the official and the diffusers
research project's formats, parity with a PyTorch reference built from diffusers' PixArt blocks, and inference."""
from pathlib import Path

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
    info = {"img_hw": Tensor(np.full((n, 2), side * 8, np.float32)),
            "aspect_ratio": Tensor(np.ones((n, 1), np.float32))}
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
    for i, block in enumerate(net.controlnet):  # the branch starts as a copy of the base's first blocks
        for a, b in zip(block.copied_block.get_parameters(), net.base_model.blocks[i].get_parameters()):
            assert np.array_equal(a.asnumpy(), b.asnumpy())
        assert not block.after_proj.weight.asnumpy().any()
    x, t, y, mask, info, c = _inputs(net)
    base = net.base_model(x, t, y, mask, info).asnumpy()
    # a fresh branch (copied blocks, zero projections) computes exactly the base model
    assert np.array_equal(net(x, t, y, mask, info, condition=c).asnumpy(), base)
    rng = np.random.default_rng(1)
    for p in net.control_parameters():
        p.set_data(Tensor(rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.05))
    assert not np.allclose(net(x, t, y, mask, info, condition=c).asnumpy(), base, atol=1e-3)
    assert np.array_equal(net(x, t, y, mask, info, condition=c, control_scale=0.0).asnumpy(), base)
    assert np.array_equal(net(x, t, y, mask, info).asnumpy(), base)


# ----------------------------------------------------------------------------------------------------------------
# Parity with a PyTorch reference: diffusers' PixArt transformer and its blocks, wired as diffusers' research project
# (examples/research_projects/pixart, PixArtControlNetTransformerModel) and the official ControlPixArtHalf wire them
# ----------------------------------------------------------------------------------------------------------------
COPIES = 2  # default_copy_blocks(4): the reduced-depth rule


def torch_controlnet(base, copies: int, seed: int):
    """The research project's PixArtControlNetAdapterModel, built here from diffusers' BasicTransformerBlock with
    the base's block settings; every parameter random, the zero projections included."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock
    c = base.config
    dim = c.num_attention_heads * c.attention_head_dim

    class AdapterBlock(torch.nn.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index
            if index == 0:
                self.before_proj = torch.nn.Linear(dim, dim)
            self.transformer_block = BasicTransformerBlock(
                dim, c.num_attention_heads, c.attention_head_dim, dropout=0.0, cross_attention_dim=dim,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True, upcast_attention=False,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_type="default")
            self.after_proj = torch.nn.Linear(dim, dim)

        def forward(self, hidden, control, encoder_hidden, timestep, encoder_mask):
            if self.index == 0:
                control = hidden + self.before_proj(control)
            control = self.transformer_block(control, encoder_hidden_states=encoder_hidden, timestep=timestep,
                                             encoder_attention_mask=encoder_mask)
            return self.after_proj(control), control

    adapter = torch.nn.Module()
    adapter.controlnet_blocks = torch.nn.ModuleList([AdapterBlock(i) for i in range(copies)])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))
    return adapter.eval()


def torch_forward(base, adapter, x, t, y, mask, info, condition):
    """The research project's forward: base block 0, then control block i - 1 beside base block i for i = 1..N (its
    after_proj output added to base block i's input), the rest of the base, the final layer."""
    import torch
    c = base.config
    p, n = c.patch_size, x.shape[0]
    h, w = x.shape[-2] // p, x.shape[-1] // p
    added = {"resolution": torch.from_numpy(info["img_hw"]), "aspect_ratio": torch.from_numpy(info["aspect_ratio"])} \
        if info else {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        hidden = base.pos_embed(torch.from_numpy(x))
        t0, embedded_t = base.adaln_single(torch.from_numpy(t), added, batch_size=n, hidden_dtype=hidden.dtype)
        caption = base.caption_projection(torch.from_numpy(y)).view(n, -1, hidden.shape[-1])
        caption_mask = ((1 - torch.from_numpy(mask).float()) * -10000.0).unsqueeze(1)
        control = base.pos_embed(torch.from_numpy(np.broadcast_to(condition, (n, *condition.shape[1:])).copy()))
        for i, block in enumerate(base.transformer_blocks):
            if 0 < i <= len(adapter.controlnet_blocks):
                residual, control = adapter.controlnet_blocks[i - 1](hidden, control, caption, t0, caption_mask)
                hidden = hidden + residual
            hidden = block(hidden, encoder_hidden_states=caption, encoder_attention_mask=caption_mask, timestep=t0)
        shift, scale = (base.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        hidden = base.proj_out(base.norm_out(hidden) * (1 + scale) + shift)
        hidden = hidden.reshape(n, h, w, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", hidden).reshape(n, -1, h * p, w * p).numpy()


def official_pth(base, adapter, path, y_tokens: int, pos_tokens: int):
    """The official PixArt-δ checkpoint layout: {"state_dict": base_model.* + controlnet.*}."""
    import torch
    from tests.utils import original_names
    state = original_names(base.state_dict(), "base_model.")
    state["base_model.y_embedder.y_embedding"] = torch.randn(y_tokens, base.config.caption_channels)
    state["base_model.pos_embed"] = torch.zeros(1, pos_tokens, base.inner_dim)
    for i, block in enumerate(adapter.controlnet_blocks):
        state.update(original_names(block.transformer_block.state_dict(), f"controlnet.{i}.copied_block."))
        for name in ("before_proj", "after_proj"):
            if hasattr(block, name):
                for suffix in ("weight", "bias"):
                    state[f"controlnet.{i}.{name}.{suffix}"] = getattr(getattr(block, name), suffix).detach()
    torch.save({"state_dict": state}, path)


def diffusers_adapter_folder(adapter, folder):
    """The research project's save_pretrained layout: config.json + diffusion_pytorch_model.safetensors."""
    import json
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtControlNetAdapterModel",
                                                    "num_layers": len(adapter.controlnet_blocks)}))


def convert(*args) -> str:
    from tools.convert import main
    assert main([str(a) for a in args]) == 0


@pytest.mark.slow
@pytest.mark.parity
def test_parity_with_diffusers_blocks_after_conversion_alpha_official_and_sigma_diffusers(tmp_path, capsys):
    from pixart.io import CheckpointError
    from pixart.pipelines.controlnet import load_controlnet
    from pixart.pipelines.loading import load_transformer
    from tests.utils import diffusers_model, inputs, rel_err, run_ours

    cases = {  # base preset -> (diffusers config, latent grid, format of the ControlNet file)
        "PixArt-XL-2-1024-MS": (dict(sample_size=128, interpolation_scale=2, use_additional_conditions=True),
                                (12, 16), "official"),
        "PixArt-Sigma-XL-2-512-MS": (dict(sample_size=64, interpolation_scale=1, use_additional_conditions=False),
                                     (16, 16), "diffusers"),
    }
    loaded = {}
    for k, (preset, (extra, hw, layout)) in enumerate(cases.items()):
        base = diffusers_model(extra, seed=k, depth=4, heads=2, caption_channels=32)
        adapter = torch_controlnet(base, COPIES, seed=10 + k)
        work = tmp_path / layout
        work.mkdir()
        if layout == "official":  # one .pth with the base: both come out of one conversion
            official_pth(base, adapter, work / "cn.pth", 120, (extra["sample_size"] // 2) ** 2)
            convert("--source", work / "cn.pth", "--target", work / "cn.ckpt", "--base_target", work / "base.ckpt")
        else:  # diffusers: the base's folder and the adapter's, each converted
            base.save_pretrained(work / "transformer")
            diffusers_adapter_folder(adapter, work / "controlnet")
            convert("--source", work / "transformer", "--target", work / "base.ckpt", "--model", preset)
            convert("--source", work / "controlnet", "--target", work / "cn.ckpt", "--model", f"{preset}-ControlNet")
        printed = capsys.readouterr().out
        assert f"{COPIES} copied blocks" in printed and f"for base {preset}" in printed, printed

        x, t, y, mask, info = inputs(hw, extra["use_additional_conditions"], seed=k, caption_channels=32)
        condition = np.random.default_rng(k).standard_normal((1, 4, *hw)).astype(np.float32)
        expected = torch_forward(base, adapter, x, t, y, mask, info, condition)
        net = load_controlnet(work / "cn.ckpt", load_transformer(work / "base.ckpt", log=print), preset)
        data_info = {key: Tensor(v) for key, v in info.items()} if info else None
        args = (Tensor(x), Tensor(t), Tensor(y[:, None]), Tensor(mask.astype(np.int32)), data_info)
        err = rel_err(net(*args, condition=Tensor(condition)).asnumpy(), expected)
        assert err <= 1e-4, f"{preset}: relative error {err:.2e}"
        # control scale 0: the base model's output, bit for bit
        base_out = run_ours(net.base_model, x, t, y, mask, info)
        assert np.array_equal(net(*args, condition=Tensor(condition), control_scale=0.0).asnumpy(), base_out)
        assert rel_err(base_out, expected) > 1e-3  # the control branch mattered
        loaded[preset] = net

    # a ControlNet for another base: refused, naming what differs
    alpha, sigma = loaded
    with pytest.raises(CheckpointError,
                       match=r"made for PixArt-XL-2-1024-MS.*model_max_length 120 \(the base has 300\)"):
        load_controlnet(tmp_path / "official" / "cn.ckpt", loaded[sigma].base_model, sigma)
    from tools.convert import main
    assert main(["--source", str(tmp_path / "official" / "cn.pth"), "--target", str(tmp_path / "x.ckpt"),
                 "--model", sigma]) == 1
    assert "does not fit model PixArt-Sigma-XL-2-512-MS" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Inference: the condition, the pipeline, sample.py
# ----------------------------------------------------------------------------------------------------------------
def test_canny_finds_the_outline_of_a_square():
    from pixart.pipelines.controlnet import canny
    image = np.zeros((40, 40), np.float32)
    image[10:30, 10:30] = 255.0
    edges = canny(image) > 0
    assert edges[10:30, 9:11].any(axis=1).all() and edges[10:30, 29:31].any(axis=1).all()  # left and right sides
    assert edges[9:11, 10:30].any(axis=0).all() and edges[29:31, 10:30].any(axis=0).all()  # top and bottom
    assert not edges[14:26, 14:26].any() and not edges[:6].any()  # nothing inside or far outside
    # weak edges survive only when connected to a strong one
    ramp = np.zeros((20, 20), np.float32)
    ramp[:, 10:] = 60.0  # a step whose gradient (240) is above the high threshold ...
    ramp[:5, 10:] = 30.0  # ... with a weaker part (120: between the thresholds) connected to it
    ramp[15:, :] = 0.0
    assert (canny(ramp)[:15] > 0).any(axis=1).all()


def control_checkpoint(bundle, path, seed=0):
    """A ControlNet for the demo bundle's base with every branch parameter random, written as our .ckpt."""
    from pixart.models.controlnet import ControlNetConfig, ControlPixArt
    from pixart.models.convert import save_controlnet
    from pixart.pipelines.loading import load_transformer
    from pixart.pipelines.transformer import parameters_numpy
    net = ControlPixArt(load_transformer(bundle.checkpoint, log=lambda *_: None))
    net.initialize_from_base()
    rng = np.random.default_rng(seed)
    state = {k: (v + rng.standard_normal(v.shape) * 0.3).astype(np.float32)
             for k, v in parameters_numpy(net.controlnet).items()}
    save_controlnet(state, ControlNetConfig(net.config, net.copy_blocks_num, "PixArt-Sigma-XL-2-256x256"), path)
    return path


@pytest.mark.slow
@pytest.mark.e2e
def test_pipeline_and_gradio_control_image_types_sizes_and_scale_zero(bundle, tmp_path):
    from PIL import Image
    from pixart.pipelines.controlnet import PixArtControlNetPipeline, condition_image
    from pixart.pipelines.text_to_image import PixArtPipeline
    comp = bundle.components
    control = PixArtControlNetPipeline.from_pretrained(
        checkpoint=bundle.checkpoint, model="PixArt-Sigma-XL-2-256x256", vae_root=comp / "vae",
        text_encoder_root=comp / "text_encoder", tokenizer_root=comp / "tokenizer",
        controlnet=control_checkpoint(bundle, tmp_path / "cn.ckpt"))
    pipe = PixArtPipeline(control.transformer.base_model, control.vae, control.text_encoder, control.tokenizer)
    picture = np.zeros((37, 100, 3), np.uint8)  # another size and ratio than the output: resized, then cropped
    picture[10:30, 20:80] = (250, 120, 10)
    Image.fromarray(picture).save(tmp_path / "control.png")
    for kind in ("hed", "canny", "none"):
        cond = condition_image(Image.open(tmp_path / "control.png"), kind, 64, 48)
        assert cond.shape == (1, 3, 64, 48) and -1 <= cond.min() and cond.max() <= 1
    edges = condition_image(Image.fromarray(picture), "canny", 37, 100)
    assert edges[0, 0, 9:11, 40].max() == 1.0 and edges[0, 0, 20, 50] == -1.0  # the rectangle's border, not its inside

    call = dict(prompt="a red square", seed=3, num_inference_steps=2, height=64, width=64,
                use_resolution_binning=False, output_type="latent", progress=False)
    base = pipe(**call).images
    assert np.array_equal(control(**call, control_image=tmp_path / "control.png",
                                  controlnet_conditioning_scale=0.0).images, base)
    assert np.array_equal(control(**call).images, base)  # no control image: the base model
    outs = [control(**call, control_image=tmp_path / "control.png", control_type=kind).images
            for kind in ("hed", "canny")]
    assert not np.allclose(outs[0], base, atol=1e-4) and not np.allclose(outs[0], outs[1], atol=1e-4)
    with pytest.raises(ValueError, match="control_type must be one of hed, canny, none, got 'depth'"):
        control(**call, control_image=tmp_path / "control.png", control_type="depth")

    # the Gradio app: a control image per request, carried into the reproduce-command
    import shlex
    from pixart.app.core import DemoApp, DemoError
    from pixart.app.page import build_app
    from pixart.cli.gradio import build_parser as gradio_parser, sample_args
    from pixart.cli.options import parse_args
    from pixart.cli.sample import build_parser as sample_parser
    args = parse_args(gradio_parser(), ["-c", "configs/inference/demo.yaml", *bundle.flags, "--controlnet",
                                        str(tmp_path / "cn.ckpt"), "--control_type", "canny"])
    app = DemoApp(control, args, sample_args, out_dir=tmp_path / "app", log=lambda *_: None)
    build_app(app)  # the page builds with its control inputs
    good = dict(prompt="a cat", negative_prompt="", sampler="dpm", steps=1, guidance_scale=4.5, seed=3,
                randomize_seed=False, width=64, height=64, batch_size=1, resolution_binning=False)
    with pytest.raises(DemoError, match="control scale must be a finite number"):
        app.check_request(**good, control_scale=float("inf"))
    request = app.check_request(**good, control_image=Image.open(tmp_path / "control.png"), control_scale=0.5)
    out = app.generate(request)
    a = parse_args(sample_parser(), shlex.split(out["command"])[2:])
    assert (a.controlnet, a.control_scale, a.control_type) == (str(tmp_path / "cn.ckpt"), 0.5, "canny")
    assert Path(a.control_image).is_file() and len(out["paths"]) == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_sample_py_control_image_and_bad_input(bundle, tmp_path, capsys):
    import sample
    from PIL import Image
    cn = control_checkpoint(bundle, tmp_path / "cn.ckpt")
    edges = np.zeros((80, 50), np.uint8)
    edges[20:60, 10:40] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    (tmp_path / "broken.png").write_text("not an image")
    from pixart.models.controlnet import controlnet_preset
    from pixart.models.convert import save_controlnet
    from pixart.pipelines.transformer import parameters_numpy
    alpha = controlnet_preset("PixArt-XL-2-1024-ControlNet", depth=2, hidden_size=144, num_heads=2)
    alpha_net = build_controlnet("PixArt-XL-2-1024-ControlNet", depth=2, hidden_size=144, num_heads=2)
    save_controlnet(parameters_numpy(alpha_net.controlnet), alpha, tmp_path / "alpha.ckpt")
    config = ["-c", "configs/inference/demo.yaml", *bundle.flags, "--progress", "false", "--prompt", "a red square",
              "--sampling_steps", 2, "--image_height", 64, "--image_width", 64, "--mode", "pynative"]

    def run(*extra):
        try:
            return sample.main([str(a) for a in [*config, *extra]])
        except SystemExit as e:  # argparse's own refusals
            return e.code

    bad = [
        (["--control_image", tmp_path / "edges.png"], "--control_image needs --controlnet"),
        (["--controlnet", cn, "--control_image", tmp_path / "missing.png"], "control image not found: "),
        (["--controlnet", cn, "--control_image", tmp_path / "broken.png"], "is not a readable image"),
        (["--controlnet", tmp_path / "nothing.ckpt", "--control_image", tmp_path / "edges.png"],
         "--controlnet not found"),
        (["--controlnet", cn, "--control_image", tmp_path / "edges.png", "--control_type", "depth"],
         "invalid choice: 'depth'"),
        (["--controlnet", tmp_path / "alpha.ckpt", "--control_image", tmp_path / "edges.png"],
         "was made for PixArt-XL-2-1024-MS, not this base PixArt-Sigma-XL-2-256x256: micro_condition True (the base "
         "has False); model_max_length 120 (the base has 300)"),
    ]
    for extra, message in bad:
        out = tmp_path / "bad"
        assert run(*extra, "--output_path", out) != 0, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), err
        assert not out.exists()  # refused before any model loaded or anything was written

    out = tmp_path / "out"
    assert run("--controlnet", cn, "--control_image", tmp_path / "edges.png", "--control_type", "canny",
               "--control_scale", 0.8, "--output_path", out) == 0, capsys.readouterr().err[-2000:]
    with Image.open(next(out.glob("0000*.png"))) as image:
        assert image.size == (64, 64)
