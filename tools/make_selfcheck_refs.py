"""Make the self-check's stored references (tests/data/selfcheck/references.npz) from the PyTorch implementations:
diffusers' PixArtTransformer2DModel and AutoencoderKL and transformers' T5EncoderModel, given the self-check's fixed
NumPy weights and inputs (`pixart.selfcheck.fixtures`). Run once, from the repository root, when a check is added
or its model or inputs change (needs torch, diffusers, transformers):

    python -m tools.make_selfcheck_refs [--out tests/data/selfcheck/references.npz]

What each reference is:
- forward checks: the PyTorch model's outputs (PixArt-Σ's KV compression, which diffusers lacks, as an attention
  processor on diffusers' attention: depthwise stride-r conv and LayerNorm on keys and values, as the original
  PixArt-Σ code; LoRA merged into the weights, W + alpha/r B A, in float64; the ControlNet as diffusers' research
  project's adapter of BasicTransformerBlocks beside diffusers' model, the construction of tests/test_controlnet.py);
- samplers: this port's sampler arithmetic (MindSpore CPU, fp32; checked against diffusers' schedulers and the
  papers' formulas by tests/test_samplers.py) driven by diffusers' denoiser;
- the training step: diffusers' model, the official IDDPM loss transcribed in torch (tests/test_train_units.py),
  torch.optim.AdamW with the check's settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixart import backend
from pixart.io import diffusers_to_original, fused_slices, original_to_diffusers
from pixart.selfcheck import fixtures as fx
from pixart.selfcheck.checks import CHECKS, controlnet_state, pixart_state, t5_state, vae_state
from tests.test_controlnet import torch_controlnet, torch_forward
from tests.test_train_units import torch_reference
from tests.utils import diffusers_model, run_diffusers


# ---------------------------------------------------------------------------------------------------------------
# PixArt in diffusers
# ---------------------------------------------------------------------------------------------------------------
class KVCompressProcessor:
    """Self-attention with PixArt-Σ's key/value compression on diffusers' `Attention` (to_q/to_k/to_v, to_out)."""

    def __init__(self, state: dict, prefix: str, ratio: int, hw: tuple[int, int]):
        t = lambda k: torch.from_numpy(state[prefix + k])
        self.sr_w, self.sr_b, self.norm_w, self.norm_b = t("sr.weight"), t("sr.bias"), t("norm.weight"), t("norm.bias")
        self.ratio, self.hw = ratio, hw

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        b, n, c = hidden_states.shape
        h, w = self.hw

        def compress(a):  # (B, h*w, C) -> conv over the token grid -> (B, h*w/r^2, C), LayerNorm
            a = a.reshape(b, h, w, c).permute(0, 3, 1, 2)
            a = F.conv2d(a, self.sr_w, self.sr_b, stride=self.ratio, groups=c)
            return F.layer_norm(a.reshape(b, c, -1).transpose(1, 2), (c,), self.norm_w, self.norm_b, eps=1e-5)

        q = attn.to_q(hidden_states)
        k, v = compress(attn.to_k(hidden_states)), compress(attn.to_v(hidden_states))
        heads = lambda a: a.reshape(b, -1, attn.heads, c // attn.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, c)))


def merge_lora(state: dict) -> dict:
    """LoRA branches merged into their layers' weights, W[slice] += alpha/r B A (float64), then dropped."""
    out = {k: v.astype(np.float64) for k, v in state.items() if ".lora_" not in k}
    scaling = fx.LORA["alpha"] / fx.LORA["rank"]
    for key in state:
        if ".lora_A" not in key:
            continue
        layer, part = key.split(".lora_A")
        b = state[f"{layer}.lora_B{part}"].astype(np.float64)
        a = state[key].astype(np.float64)
        index = fused_slices(layer).index(part[1:]) if part else 0  # the slice's place in a fused layer's output
        rows = slice(index * b.shape[0], (index + 1) * b.shape[0])
        out[f"{layer}.weight"][rows] += scaling * b @ a
    return {k: v.astype(np.float32) for k, v in out.items()}


def torch_pixart(name: str, lora: bool = False):
    """diffusers' model of check `name` holding the fixed weights (and the null caption, which diffusers lacks)."""
    cfg = fx.pixart_config(name)
    state = pixart_state(name, lora)
    if lora:
        state = merge_lora(state)
    converted, unmapped = original_to_diffusers(state)
    heads = cfg.num_heads
    model = diffusers_model(fx.diffusers_kwargs(cfg), depth=cfg.depth, heads=heads, head_dim=cfg.hidden_size // heads,
                            caption_channels=cfg.caption_channels)
    null = converted.pop("caption_projection.y_embedding")
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in converted.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    kv = cfg.kv_compress_config
    for i in range(cfg.depth):
        if kv.ratio(i) > 1:
            hw = (fx.LATENT_HW[0] // cfg.patch_size, fx.LATENT_HW[1] // cfg.patch_size)
            model.transformer_blocks[i].attn1.set_processor(KVCompressProcessor(state, f"blocks.{i}.attn.", kv.ratio(i), hw))
            unmapped = [k for k in unmapped if not k.startswith(f"blocks.{i}.attn.")]
    assert not unmapped, unmapped
    return model, cfg, null


def pixart_forward(name: str, lora: bool = False) -> dict:
    model, cfg, _ = torch_pixart(name, lora)
    inp = fx.pixart_inputs(cfg)
    info = {"img_hw": inp["img_hw"], "aspect_ratio": inp["aspect_ratio"]} if cfg.micro_condition else None
    return {"out": run_diffusers(model, inp["x"], inp["t"], inp["y"][:, 0], inp["mask"], info)}


def controlnet() -> dict:
    """diffusers' α model with the research project's adapter beside it, holding the check's fixed weights (our
    official names translated block by block with `original_to_diffusers`), control scale 1."""
    model, cfg, _ = torch_pixart("alpha")
    state, copies = {}, set()
    for key, value in controlnet_state().items():
        _, n, part, rest = key.split(".", 3)
        copies.add(int(n))
        if part != "copied_block":  # before_proj / after_proj: the same Linear layout in both
            state[f"controlnet_blocks.{n}.{part}.{rest}"] = value
            continue
        converted, unmapped = original_to_diffusers({f"blocks.{n}.{rest}": value})
        assert not unmapped, unmapped
        state.update({k.replace(f"transformer_blocks.{n}.", f"controlnet_blocks.{n}.transformer_block.", 1): v
                      for k, v in converted.items()})
    adapter = torch_controlnet(model, len(copies), seed=0)
    adapter.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    inp = fx.pixart_inputs(cfg)
    return {"out": torch_forward(model, adapter, inp["x"], inp["t"], inp["y"][:, 0], inp["mask"], None,
                                 fx.control_condition())}


def sampler(name: str) -> dict:
    """This port's sampler on MindSpore CPU (fp32), each model call made by diffusers' model in torch."""
    import mindspore as ms
    from pixart.diffusion import make_sampler
    model, cfg, _ = torch_pixart("alpha")
    inp = fx.pixart_inputs(cfg)

    def model_fn(x, t):
        out = run_diffusers(model, x.asnumpy(), t.asnumpy().astype(np.float32), inp["y"][:, 0], inp["mask"], None)
        return ms.Tensor(out)

    x = make_sampler(name).sample(model_fn, ms.Tensor(inp["x"]), num_steps=fx.SAMPLER_STEPS[name], progress=False,
                                  generator=np.random.default_rng(fx.SAMPLER_SEED))
    return {"x0": x.asnumpy()}


def train() -> dict:
    """One step: x_t, diffusers' forward with the null caption where dropped, the IDDPM loss's gradient w.r.t. the
    output (torch_reference) backpropagated, AdamW; the loss and the sampled updates by our parameter names."""
    from pixart.diffusion import default_schedule
    model, cfg, null = torch_pixart("alpha")
    model.train()
    b = fx.train_inputs(cfg)
    s = default_schedule()
    at = lambda arr: torch.tensor(arr[b["t"]], dtype=torch.float32).reshape(-1, 1, 1, 1)
    x0, noise = torch.from_numpy(b["x0"]), torch.from_numpy(b["noise"])
    x_t = at(s.sqrt_alphas_cumprod) * x0 + at(s.sqrt_one_minus_alphas_cumprod) * noise
    y = torch.from_numpy(np.where(b["drop"][:, None, None] == 1, null[None], b["y"][:, 0]))
    out = model(x_t, encoder_hidden_states=y, timestep=torch.from_numpy(b["t"].astype(np.float32)),
                encoder_attention_mask=torch.from_numpy(b["mask"]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    loss, _, _, grad = torch_reference(out.detach().numpy(), b["x0"], b["t"], b["noise"])
    out.backward(torch.from_numpy(grad))
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    o = fx.TRAIN_OPTIMIZER
    torch.optim.AdamW(params.values(), lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"]).step()
    update, unmapped = diffusers_to_original({k: (p.detach() - before[k]).numpy() for k, p in params.items()})
    assert not unmapped, unmapped
    sampled = np.concatenate([fx.sampled(update[k]) for k in sorted(update)])
    return {"loss": np.array([loss.mean()], np.float32), "update": sampled.astype(np.float32)}


# ---------------------------------------------------------------------------------------------------------------
# T5 and the VAEs
# ---------------------------------------------------------------------------------------------------------------
def t5() -> dict:
    from transformers import T5Config, T5EncoderModel
    cfg = {k: v for k, v in fx.T5.items() if k not in ("model_type", "architectures")}
    model = T5EncoderModel(T5Config(**cfg)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in t5_state().items()}, strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    inp = fx.t5_inputs()
    with torch.no_grad():
        out = model(torch.from_numpy(inp["ids"]).long(), attention_mask=torch.from_numpy(inp["mask"]))
    return {"hidden": out.last_hidden_state.numpy() * inp["mask"][..., None]}


def vae(name: str) -> dict:
    from diffusers import AutoencoderKL
    cfg = {k: v for k, v in fx.vae_config(name).items() if k != "_class_name"}
    model = AutoencoderKL(**cfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in vae_state(name).items()}, strict=True)
    inp = fx.vae_inputs(name)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(inp["image"])).latent_dist
        decoded = model.decode(torch.from_numpy(inp["z"])).sample
    return {"mean": dist.mean.numpy(), "logvar": dist.logvar.numpy(), "decoded": decoded.numpy()}


# check name -> its reference; a check registered in pixart.selfcheck.checks adds its reference here
REFERENCES = {
    "alpha": lambda: pixart_forward("alpha"),
    "alpha-1024": lambda: pixart_forward("alpha-1024"),
    "sigma": lambda: pixart_forward("sigma"),
    "sigma-kv": lambda: pixart_forward("sigma-kv"),
    "lora": lambda: pixart_forward("alpha", lora=True),
    "controlnet": controlnet,
    "t5": t5,
    "vae-sd": lambda: vae("vae-sd"),
    "vae-sdxl": lambda: vae("vae-sdxl"),
    **{f"sampler-{n}": (lambda n=n: sampler(n)) for n in fx.SAMPLER_STEPS},
    "train": train,
}


def compute(names=None) -> dict[str, np.ndarray]:
    """Every reference (or those of `names`) as {"<check>/<output>": float32 array}."""
    backend.setup("CPU", "pynative")
    torch.manual_seed(0)
    missing = sorted({c.reference_name for c in CHECKS.values()} - set(REFERENCES))
    if missing:
        raise ValueError(f"no reference function for the self-check check(s) {', '.join(missing)}")
    out = {}
    for name, make in REFERENCES.items():
        if names is None or name in names:
            out.update({f"{name}/{k}": np.asarray(v, np.float32) for k, v in make().items()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(fx.REFERENCES))
    args = p.parse_args(argv)
    refs = compute()
    import diffusers
    import transformers
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **refs, **{"meta/made_with": np.array(versions)})
    print(f"wrote {len(refs)} references to {args.out} ({versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
