"""Shared helpers for the tests: error measure, the demo bundle's paths, and diffusers' PixArt transformer vs ours on
the same inputs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pixart import demo_bundle as demo


def rel_err(ours, ref) -> float:
    """max |ours - ref| relative to the reference's scale (max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def diffusers_model(extra: dict, seed: int = 0, depth: int = 2, heads: int = 16, head_dim: int = 72,
                    caption_channels: int = 4096):
    """diffusers' PixArtTransformer2DModel of PixArt-XL/2's block layout (`extra`: sample_size, interpolation_scale,
    use_additional_conditions...), every parameter random, including those diffusers' init zeroes."""
    import torch
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=depth,
        cross_attention_dim=heads * head_dim, caption_channels=caption_channels, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
        num_embeds_ada_norm=1000, **extra)
    with torch.no_grad():  # the default init zeroes the output layers; make every weight matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))
    return model.eval()


def inputs(hw, micro: bool, seed: int = 1, caption_channels: int = 4096):
    """(latents, timesteps, caption features, caption mask, micro-conditions or None) for a batch of two; the
    second caption is padded after 5 tokens."""
    g = np.random.default_rng(seed)
    n, length = 2, 16
    x = g.standard_normal((n, 4, *hw)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    y = g.standard_normal((n, length, caption_channels)).astype(np.float32)
    mask = np.ones((n, length), np.int64)
    mask[1, 5:] = 0
    info = {"img_hw": np.array([[hw[0] * 8, hw[1] * 8]] * n, np.float32),
            "aspect_ratio": np.array([[hw[0] / hw[1]]] * n, np.float32)} if micro else None
    return x, t, y, mask, info


def run_ours(model, x, t, y, mask, info):
    import mindspore as ms
    data_info = {k: ms.Tensor(v) for k, v in info.items()} if info else None
    out = model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(y[:, None]), ms.Tensor(mask.astype(np.int32)), data_info)
    return out.asnumpy()


def run_diffusers(model, x, t, y, mask, info):
    import torch
    cond = {"resolution": torch.from_numpy(info["img_hw"]), "aspect_ratio": torch.from_numpy(info["aspect_ratio"])} \
        if info else {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        return model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                     encoder_attention_mask=torch.from_numpy(mask), added_cond_kwargs=cond).sample.numpy()


def original_names(state: dict, prefix: str = "") -> dict:
    """diffusers' PixArtTransformer2DModel state dict, or one of its blocks' (names without `transformer_blocks.N.`)
    -> the original PixArt names under `prefix`, written out here independently of pixart.io.keymap (torch tensors;
    the fixed `pos_embed` buffer is dropped)."""
    import torch
    s = {k: v.detach().clone() for k, v in state.items()}
    out = {}
    blocks = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    inner = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
             "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}
    for b, o in [(f"transformer_blocks.{i}.", f"blocks.{i}.") for i in blocks] or [("", "")]:
        out[o + "scale_shift_table"] = s.pop(b + "scale_shift_table")
        for suffix in ("weight", "bias"):
            out[o + f"attn.qkv.{suffix}"] = torch.cat([s.pop(b + f"attn1.to_{n}.{suffix}") for n in "qkv"])
            out[o + f"cross_attn.kv_linear.{suffix}"] = torch.cat([s.pop(b + f"attn2.to_{n}.{suffix}") for n in "kv"])
            for a, z in inner.items():
                out[o + f"{z}.{suffix}"] = s.pop(b + f"{a}.{suffix}")
    if blocks:  # the whole model: embedders, adaLN-single, final layer
        pairs = {"pos_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
                 "caption_projection.linear_2": "y_embedder.y_proj.fc2",
                 "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                 "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
                 "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
                 "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
                 "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
                 "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
                 "adaln_single.linear": "t_block.1", "proj_out": "final_layer.linear"}
        for a, z in pairs.items():
            for suffix in ("weight", "bias"):
                if f"{a}.{suffix}" in s:
                    out[f"{z}.{suffix}"] = s.pop(f"{a}.{suffix}")
        out["final_layer.scale_shift_table"] = s.pop("scale_shift_table")
        s.pop("pos_embed.pos_embed", None)
    assert not s, f"test renaming left keys: {list(s)}"
    return {prefix + k: v for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class DemoBundle:
    """Where the demo bundle's files are (or will be) under `root`; pixart/demo.py builds them."""
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / demo.CHECKPOINT

    @property
    def components(self) -> Path:
        return self.root / demo.COMPONENTS

    @property
    def flags(self) -> list[str]:
        """The sample.py / gradio_demo.py flags that point at it (on top of configs/inference/demo.yaml)."""
        comp = self.components
        return ["--checkpoint", str(self.checkpoint), "--vae_root", str(comp / "vae"),
                "--text_encoder_root", str(comp / "text_encoder"), "--tokenizer_root", str(comp / "tokenizer")]


def exit_status(main, argv) -> int:
    """The exit status of an entry point's `main(argv)` run in this process (the parser's own errors exit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def stop(proc, timeout: float = 20) -> None:
    """End a server started by a test: SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
