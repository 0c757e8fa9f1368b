"""What the self-check runs on the device: each `Check` builds a small model of one architecture with the fixed
weights of `pixart.selfcheck.fixtures` the way the entry points build theirs (loaders, dtype cast,
`pixart.cpu.accelerate`, `PixArt.sampler_parts`, the training set-up of train.py) and returns its outputs as NumPy
arrays, which `pixart.selfcheck.runner` compares with the stored PyTorch references of the same name.

A new architecture joins by `register(Check(...))` here and a reference function of the same name in
tools/make_selfcheck_refs.py (then rerun that script once).
"""
from __future__ import annotations

import json
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from pixart import backend, cpu
from pixart.diffusion import make_sampler
from pixart.io import load_into, write_safetensors
from pixart.models.controlnet import ControlPixArt
from pixart.models.lora import inject_lora
from pixart.models.pixart import PixArt
from pixart.models.t5 import T5Config, T5EncoderModel, load_t5
from pixart.models.vae import AutoencoderKL, VAEConfig, load_vae
from pixart.selfcheck import fixtures as fx
from pixart.selfcheck.parallel import run_under_msrun
from pixart.training import setup as train_setup
from pixart.training.distributed import Context

# fixed weight seeds, one per model
SEEDS = {"alpha": 101, "alpha-1024": 102, "sigma": 103, "sigma-kv": 104, "lora": 105, "t5": 106, "vae-sd": 107,
         "vae-sdxl": 108, "controlnet": 109}


@dataclass
class Session:
    """One (dtype, mode) pass on the device: models built once and shared by the checks of the pass."""
    device: str
    dtype: str
    mode: str
    cache: dict = field(default_factory=dict)

    def cached(self, key: str, build: Callable):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@dataclass(frozen=True)
class Check:
    """`run(session) -> {output name: array}`, compared with the references stored as `<reference>/<output name>`
    (`reference`: another check's, when both must give the same numbers; default its own name).
    `kind`: forward, sampler, train, parallel (the last only under msrun)."""
    name: str
    kind: str
    run: Callable[[Session], dict]
    description: str = ""
    reference: str = ""

    @property
    def reference_name(self) -> str:
        return self.reference or self.name


CHECKS: dict[str, Check] = {}


def register(check: Check) -> Check:
    CHECKS[check.name] = check
    return check


# Architectures the self-check does not build yet, printed under the table (a new one is listed here until its
# check and reference exist).
NOT_COVERED: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------------------------
def shapes(cell) -> dict[str, tuple]:
    return {p.name: tuple(p.shape) for p in cell.get_parameters()}


def pixart_model(name: str, lora: bool = False):
    """The small PixArt of `name` (fp32, our names) with its fixed weights, plus LoRA on the default targets."""
    with no_init_parameters():
        model = PixArt(fx.pixart_config(name))
    load_into(model, fx.weights(shapes(model), SEEDS[name]), what=f"self-check {name}")
    if lora:
        inject_lora(model, rank=fx.LORA["rank"], alpha=fx.LORA["alpha"])
        lora_params = {p.name: tuple(p.shape) for p in model.get_parameters() if ".lora_A" in p.name
                       or ".lora_B" in p.name}  # the user scale `lora_scale` stays 1
        load_into(model, fx.weights(lora_params, SEEDS["lora"]), what="self-check LoRA", strict=False)
    return model


def pixart_state(name: str, lora: bool = False) -> dict[str, np.ndarray]:
    """The fixed weights of `pixart_model(name, lora)` by our (original PixArt) names, for the references."""
    return {p.name: p.asnumpy() for p in pixart_model(name, lora).get_parameters()}


def controlnet_model():
    """The α model of `pixart_model("alpha")` steered by a control branch (its default number of copied blocks)
    with its own fixed weights, the zero-initialised projections included, so that the branch changes the output."""
    with no_init_parameters():
        net = ControlPixArt(pixart_model("alpha"))
    load_into(net.controlnet, fx.weights(shapes(net.controlnet), SEEDS["controlnet"]), what="self-check ControlNet")
    return net


def controlnet_state() -> dict[str, np.ndarray]:
    """The fixed weights of `controlnet_model()`'s control branch by the official names (`controlnet.N.*`)."""
    return {p.name: p.asnumpy() for p in controlnet_model().controlnet.get_parameters()}


def _for_inference(model, dtype: str):
    model = cpu.accelerate(backend.cast_parameters(model, dtype))
    model.set_train(False)
    return model


def t5_state() -> dict[str, np.ndarray]:
    with no_init_parameters():
        model = T5EncoderModel(T5Config.from_dict(fx.T5))
    return fx.weights(shapes(model), SEEDS["t5"])


def vae_state(name: str) -> dict[str, np.ndarray]:
    with no_init_parameters():
        model = AutoencoderKL(VAEConfig.from_dict(fx.vae_config(name)))
    return fx.weights(shapes(model), SEEDS[name])


def hf_folder(folder: Path, config: dict, state: dict, weights_name: str) -> Path:
    """An HF model folder (config.json + safetensors), as users download them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(state, folder / weights_name)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------------------------
def _pixart_forward(name: str, lora: bool = False):
    def run(session: Session) -> dict:
        model = _for_inference(pixart_model(name, lora), session.dtype)
        inp = fx.pixart_inputs(model.config)
        info = ({"img_hw": Tensor(inp["img_hw"]), "aspect_ratio": Tensor(inp["aspect_ratio"])}
                if "img_hw" in inp else None)
        out = model(Tensor(inp["x"]), Tensor(inp["t"]), Tensor(inp["y"]), Tensor(inp["mask"]), info)
        return {"out": out.astype(ms.float32).asnumpy()}
    return run


for _name, _what in [("alpha", "PixArt-α 256"), ("alpha-1024", "PixArt-α 1024-MS: micro-conditions"),
                     ("sigma", "PixArt-Σ 1024-MS"), ("sigma-kv", "PixArt-Σ KV compression (conv)")]:
    register(Check(_name, "forward", _pixart_forward(_name), _what))
register(Check("lora", "forward", _pixart_forward("alpha", lora=True), "PixArt-α with LoRA on every block linear"))


def _controlnet(session: Session) -> dict:
    net = _for_inference(controlnet_model(), session.dtype)
    inp = fx.pixart_inputs(net.config)
    out = net(Tensor(inp["x"]), Tensor(inp["t"]), Tensor(inp["y"]), Tensor(inp["mask"]), None,
              condition=Tensor(fx.control_condition()), control_scale=1.0)
    return {"out": out.astype(ms.float32).asnumpy()}


register(Check("controlnet", "forward", _controlnet, "PixArt-δ ControlNet on the α model, control scale 1"))


def _t5(session: Session) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder(Path(tmp), fx.T5, t5_state(), "model.safetensors")
        model = cpu.accelerate(load_t5(folder, session.dtype))
    inp = fx.t5_inputs()
    out = model(Tensor(inp["ids"]), Tensor(inp["mask"]))
    return {"hidden": out.astype(ms.float32).asnumpy() * inp["mask"][..., None]}  # padded positions are free


register(Check("t5", "forward", _t5, "T5 v1.1 encoder (gated GELU, relative positions, padding)"))


def _vae(name: str):
    def run(session: Session) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            folder = hf_folder(Path(tmp), fx.vae_config(name), vae_state(name), "diffusion_pytorch_model.safetensors")
            vae = cpu.accelerate(load_vae(folder, session.dtype))
        inp = fx.vae_inputs(name)
        mean, logvar = vae.encode(Tensor(inp["image"]))
        return {"mean": mean.asnumpy(), "logvar": logvar.asnumpy(), "decoded": vae.decode(Tensor(inp["z"])).asnumpy()}
    return run


register(Check("vae-sd", "forward", _vae("vae-sd"), "AutoencoderKL, SD VAE config: encode, decode"))
register(Check("vae-sdxl", "forward", _vae("vae-sdxl"), "AutoencoderKL, SDXL VAE config: encode, decode"))


# ---------------------------------------------------------------------------------------------------------------
# Samplers: a few steps of each on the α model, as sample.py runs them (`sampler_parts`)
# ---------------------------------------------------------------------------------------------------------------
def _sampler(sampler: str):
    def run(session: Session) -> dict:
        model = session.cached("alpha", lambda: _for_inference(pixart_model("alpha"), session.dtype))
        inp = fx.pixart_inputs(model.config)
        encode, denoise = model.sampler_parts()
        caption_kv = encode(Tensor(inp["y"]))
        mask = Tensor(inp["mask"])

        def model_fn(x, t):
            return denoise(x, t.astype(ms.float32), caption_kv, mask, None).astype(ms.float32)

        x = make_sampler(sampler).sample(model_fn, Tensor(inp["x"]), num_steps=fx.SAMPLER_STEPS[sampler],
                                         progress=False, generator=np.random.default_rng(fx.SAMPLER_SEED))
        return {"x0": x.asnumpy()}
    return run


for _name in fx.SAMPLER_STEPS:
    register(Check(f"sampler-{_name}", "sampler", _sampler(_name),
                   f"{fx.SAMPLER_STEPS[_name]} steps of the '{_name}' sampler on the α model"))


# ---------------------------------------------------------------------------------------------------------------
# One training step, as train.py sets it up
# ---------------------------------------------------------------------------------------------------------------
def train_args(dtype: str, recompute: bool) -> types.SimpleNamespace:
    """train.py's options that `pixart.training.setup` reads, for the check's step (see fixtures.TRAIN_OPTIMIZER)."""
    o = fx.TRAIN_OPTIMIZER
    return types.SimpleNamespace(
        recompute=recompute, mixed_precision=dtype, learning_rate=o["lr"], auto_lr="none", optimizer="adamw",
        betas=list(o["betas"]), eps=[o["eps"]], weight_decay=o["weight_decay"], ema_rate=0.9999,
        loss_scaler="auto", init_loss_scale=1024.0 if dtype != "fp32" else None, clip_grad=0.0,
        grad_accumulation=1, loss_scale_factor=2.0, loss_scale_window=1000, snr_gamma=None)


class _QuietLog:
    def info(self, *_):
        pass

    warning = info


def train_step(dtype: str, recompute: bool, ctx: Context = Context()) -> dict:
    """One optimizer step of the α model on the fixed batch (this rank's slice of it under data parallelism):
    the loss and the sampled parameter updates."""
    model = pixart_model("alpha")
    args = train_args(dtype, recompute)
    compute = train_setup.for_training(model, args)
    params = model.trainable_params()
    opt = train_setup.build_optimisation(args, compute, params, ctx, fx.BATCH, _QuietLog(), use_ema=False)
    batch = fx.train_inputs(model.config)
    per_rank = fx.BATCH // ctx.world_size
    rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    before = {p.name: p.asnumpy().copy() for p in params}  # asnumpy may share the memory updated in place
    keys = ("x0", "t", "noise", "y", "mask", "img_hw", "aspect_ratio", "drop")
    _, terms, _, finite, _ = opt.step_cell(*(Tensor(batch[k][rows]) for k in keys), Tensor(opt.lr, ms.float32))
    if not bool(finite.asnumpy()):
        raise FloatingPointError("the gradients were not finite: the step was skipped")
    update = np.concatenate([fx.sampled(p.asnumpy() - before[p.name]) for p in sorted(params, key=lambda p: p.name)])
    return {"loss": terms.asnumpy()[:1].astype(np.float32), "update": update}


register(Check("train", "train", lambda s: train_step(s.dtype, False), "one AdamW step of the α model"))
register(Check("train-recompute", "train", lambda s: train_step(s.dtype, True),
               "the same step, each block recomputed in the backward pass", reference="train"))
register(Check("train-dp", "parallel", lambda s: run_under_msrun(s.device, s.dtype, s.mode),
               "the same step on 2 ranks under msrun, half the batch each", reference="train"))
