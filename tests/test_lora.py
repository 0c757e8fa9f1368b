"""LoRA: parity with peft on diffusers' PixArtTransformer2DModel in both directions (files saved by diffusers / peft
loaded here; files saved here loaded by diffusers' `load_lora_adapter`), merge / unmerge / scale, tools/merge_lora.py,
sample.py --lora_path and the LoRA inference script end to end, and bad LoRAs rejected naming their keys.

The transformer is a reduced Σ-256 (2 heads of 72, depth 2, 64 caption channels: the demo bundle's shape), random
base weights and random non-zero LoRA weights, fp32.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import mindspore as ms
from PIL import Image

from pixart import cpu
from pixart import demo_bundle as demo
from pixart.io import (CheckpointError, diffusers_to_original, load_into, read_safetensors_metadata, read_state_dict,
                       write_ckpt, write_safetensors)
from pixart.models.convert import fill_null_caption
from pixart.models import lora as L
from pixart.models.pixart import PixArt, preset_config
from pixart.pipelines.outputs import read_png_settings
from tests.test_pipeline import _diffusers_transformer
from tests.utils import run_diffusers, run_ours
from tests.utils import rel_err

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin  # noqa: E402  (a pipeline-level LoRA writer)
from diffusers.loaders.peft import PeftAdapterMixin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = "PixArt-Sigma-XL-2-256x256"
DIFFUSERS_CONFIG = dict(sample_size=32, interpolation_scale=0.5, use_additional_conditions=False)
ALL_DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "adaln_single.linear",
                         "linear_1", "linear_2", "proj_out"]  # linear_1/2: caption projection and timestep MLP
QUIET = dict(log=lambda *a: None)


class LoRAPixArt(diffusers.PixArtTransformer2DModel, PeftAdapterMixin):
    """diffusers' PixArt transformer with diffusers' own LoRA loader / saver (PixArt's pipelines have no mixin)."""


def _inputs(seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((2, 4, 16, 24)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    y = g.standard_normal((2, 8, 64)).astype(np.float32)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    return x, t, y, mask, None


@pytest.fixture(scope="module")
def base():
    """The random base transformer: diffusers' module and our original-named state."""
    ref = _diffusers_transformer(DIFFUSERS_CONFIG, seed=5)
    state, unmapped = diffusers_to_original({k: v.numpy() for k, v in ref.state_dict().items()})
    assert not unmapped
    cfg = preset_config(PRESET, depth=2, hidden_size=144, num_heads=2, caption_channels=64)
    fill_null_caption(state, cfg, **QUIET)
    return dict(ref=ref, state=state, cfg=cfg, inputs=_inputs(), base_out=run_diffusers(ref, *_inputs()))


def _ours(base):
    """Our model with the base weights, as loading builds it (CPU kernels: call `cpu.accelerate` again after LoRA
    surgery, as loading and training do)."""
    model = cpu.accelerate(PixArt(base["cfg"]))
    load_into(model, base["state"])
    return model


def _diffusers_with_lora(base, config=None, seed=0):
    net = LoRAPixArt.from_config(base["ref"].config)
    net.load_state_dict(base["ref"].state_dict())
    if config is not None:
        net.add_adapter(config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_" in name:  # non-zero A and B, each scaled to keep the update a sizeable perturbation
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5 * 0.5)
    return net.eval()


# the forward direction: LoRAs made with peft on diffusers' model, saved three ways
FROM_DIFFUSERS = {
    # diffusers' pipeline writer: transformer.-prefixed keys, LoraConfig in the metadata, per-module ranks / alphas
    "diffusers-pipeline-file": dict(r=4, lora_alpha=8, target_modules=ALL_DIFFUSERS_TARGETS,
                                    rank_pattern={"ff.net.2": 2}, alpha_pattern={"attn2.to_k": 3.0}),
    # peft's save_pretrained folder (adapter_config.json, base_model.model. keys); only some q/k/v slices
    "peft-folder-partial-qkv": dict(r=8, lora_alpha=16, target_modules=["attn1.to_q", "attn1.to_v", "attn2.to_k"]),
    # no metadata at all (alpha = rank is assumed, which is what this LoRA was made with)
    "no-metadata": dict(r=4, lora_alpha=4, target_modules=["to_k", "to_out.0", "ff.net.0.proj"]),
    # a peft folder on the layers outside the blocks: the patch convolution (peft's conv LoRA: k x k down, 1 x 1 up),
    # the output projection, the caption projection and adaLN-single
    "peft-folder-patch-conv": dict(r=4, lora_alpha=6, target_modules=["pos_embed.proj", "proj_out", "linear_1",
                                                                      "linear_2", "adaln_single.linear"]),
}


def _save_from_diffusers(base, net, case, config, folder: Path) -> Path:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    state = get_peft_model_state_dict(net)
    if case == "diffusers-pipeline-file":
        SanaLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=state,
                                              transformer_lora_adapter_metadata=config.to_dict())
        return folder / L.LORA_WEIGHT_NAME
    if case.startswith("peft-folder"):
        from peft import get_peft_model
        model = get_peft_model(_diffusers_with_lora(base), config)
        loaded = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in state.items()})
        assert not loaded.unexpected_keys
        model.save_pretrained(folder)
        assert (folder / L.PEFT_CONFIG_NAME).exists()
        return folder
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, folder / "lora.safetensors")
    return folder / "lora.safetensors"


@pytest.mark.parametrize("case", list(FROM_DIFFUSERS))
@pytest.mark.parity
def test_lora_saved_by_diffusers_or_peft_loads_here_with_equal_outputs(base, case, tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    config = LoraConfig(**FROM_DIFFUSERS[case])
    net = _diffusers_with_lora(base, config, seed=1)
    expected = run_diffusers(net, *base["inputs"])
    assert rel_err(expected, base["base_out"]) > 0.05, "the LoRA barely changes the output: the test proves nothing"
    path = _save_from_diffusers(base, net, case, config, tmp_path / case)

    logs = []
    model = _ours(base)
    lora = L.load_lora(model, path, log=logs.append)
    cpu.accelerate(model)
    assert len(lora.branches) == sum(isinstance(m, LoraLayer) for m in net.modules())
    err = rel_err(run_ours(model, *base["inputs"]), expected)
    print(f"{case}: relative error {err:.2e} ({len(lora.branches)} LoRA branches)")
    assert err <= (1e-5 if case == "peft-folder-patch-conv" else 1e-4)
    if case == "peft-folder-patch-conv":
        assert isinstance(L.lora_layers(model)["x_embedder.proj"], L.LoRAConv2d)
    assert any("alpha = rank" in m for m in logs) == (case == "no-metadata")


def _random_lora(model, seed=0, **kwargs):
    params = L.inject_lora(model, **kwargs)
    cpu.accelerate(model)
    g = np.random.default_rng(seed)
    for p in params:
        p.set_data(ms.Tensor(g.standard_normal(p.shape).astype(np.float32) * p.shape[1] ** -0.5 * 0.5))
    return params


@pytest.mark.parity
def test_lora_saved_here_loads_into_diffusers_with_equal_outputs(base, tmp_path):
    model = _ours(base)
    targets = L.BLOCK_TARGETS + L.EXTRA_TARGETS + ("final_layer.linear", "t_embedder.mlp.0", "x_embedder.proj")
    params = _random_lora(model, seed=3, rank=4, alpha=6, targets=targets)
    assert all(p.requires_grad for p in params) and not any(
        p.requires_grad for p in model.get_parameters() if not L._is_lora_param(p.name))
    assert "blocks.1.attn.qkv.lora_A.q" in L.lora_state_dict(model) and "blocks.1.attn.qkv.weight" in \
        L.base_state_dict(model)
    ours = run_ours(model, *base["inputs"])
    assert rel_err(ours, base["base_out"]) > 0.05

    path = L.save_lora(model, tmp_path / "mine")
    assert path.name == L.LORA_WEIGHT_NAME
    keys = set(read_state_dict(path))
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight" in keys  # the fused qkv, split as diffusers
    assert "transformer.adaln_single.linear.lora_A.weight" in keys
    assert read_state_dict(path)["transformer.pos_embed.proj.lora_B.weight"].shape == (144, 4, 1, 1)  # peft's conv
    net = _diffusers_with_lora(base)
    net.load_lora_adapter(str(path.parent), prefix="transformer", weight_name=path.name)
    theirs = run_diffusers(net, *base["inputs"])
    err = rel_err(ours, theirs)
    print(f"ours -> diffusers: relative error {err:.2e}")
    assert err <= 1e-4

    # our own layout and the diffusers layout read back here give the same model
    for layout in ("original", "diffusers"):
        again = _ours(base)
        L.load_lora(again, L.save_lora(model, tmp_path / f"{layout}.safetensors", layout=layout), **QUIET)
        cpu.accelerate(again)
        assert rel_err(run_ours(again, *base["inputs"]), ours) <= 1e-6


@pytest.mark.parity
def test_per_module_ranks_and_alphas_survive_a_round_trip_through_diffusers(base, tmp_path):
    from peft import LoraConfig
    config = LoraConfig(**FROM_DIFFUSERS["diffusers-pipeline-file"])
    net = _diffusers_with_lora(base, config, seed=2)
    expected = run_diffusers(net, *base["inputs"])
    path = _save_from_diffusers(base, net, "diffusers-pipeline-file", config, tmp_path / "in")
    model = _ours(base)
    L.load_lora(model, path, **QUIET)
    cpu.accelerate(model)
    resaved = L.save_lora(model, tmp_path / "out")
    meta = json.loads(read_safetensors_metadata(resaved)[L.METADATA_KEY])
    assert meta["transformer.r"] == 4 and meta["transformer.rank_pattern"]  # ff.net.2 keeps rank 2
    back = _diffusers_with_lora(base)
    back.load_lora_adapter(str(resaved.parent), prefix="transformer", weight_name=resaved.name)
    assert rel_err(run_diffusers(back, *base["inputs"]), expected) <= 1e-4


def test_merge_unmerge_and_scale(base, tmp_path, capsys):
    model = _ours(base)
    _random_lora(model, seed=4, rank=4, alpha=8, targets=L.BLOCK_TARGETS + L.EXTRA_TARGETS)
    with_lora = run_ours(model, *base["inputs"])
    L.merge_lora(model)
    merged = run_ours(model, *base["inputs"])
    L.unmerge_lora(model)
    unmerged = run_ours(model, *base["inputs"])
    with capsys.disabled():
        print(f"merged vs base+LoRA {rel_err(merged, with_lora):.2e}, unmerged {rel_err(unmerged, with_lora):.2e}")
    assert rel_err(merged, with_lora) <= 1e-5 and rel_err(unmerged, with_lora) <= 1e-5
    L.set_lora_scale(model, 0.5)
    half = run_ours(model, *base["inputs"])
    assert rel_err(half, with_lora) > 1e-3

    lora_file = L.save_lora(model, tmp_path / "lora")
    plain = run_ours(_ours(base), *base["inputs"])
    at_zero = _ours(base)
    L.load_lora(at_zero, lora_file, scale=0.0, **QUIET)
    cpu.accelerate(at_zero)
    assert np.array_equal(run_ours(at_zero, *base["inputs"]), plain)  # scale 0 is exactly the base model

    # tools/merge_lora.py: a full .ckpt whose plain model equals base + LoRA; --unmerge gives the base back
    from tools.merge_lora import main
    write_ckpt(base["state"], tmp_path / "base.ckpt")
    assert main(["--checkpoint", str(tmp_path / "base.ckpt"), "--lora_path", str(lora_file.parent),
                 "--target", str(tmp_path / "merged.ckpt")]) == 0
    merged_model = cpu.accelerate(PixArt(base["cfg"]))
    load_into(merged_model, read_state_dict(tmp_path / "merged.ckpt"))  # strict: exactly the base's keys
    err = rel_err(run_ours(merged_model, *base["inputs"]), with_lora)
    with capsys.disabled():
        print(f"merge_lora.py: merged checkpoint vs base+LoRA {err:.2e}")
    assert err <= 1e-5
    assert main(["--checkpoint", str(tmp_path / "merged.ckpt"), "--lora_path", str(lora_file),
                 "--target", str(tmp_path / "unmerged.ckpt"), "--unmerge"]) == 0
    restored = read_state_dict(tmp_path / "unmerged.ckpt")
    assert max(rel_err(restored[k], v) for k, v in base["state"].items()) <= 1e-6
    assert "merged 23 low-rank updates" in capsys.readouterr().out


def _bad_loras(base) -> dict:
    """name -> (tensors, metadata, what the error must say)."""
    g = np.random.default_rng(0)

    def r(*shape):
        return g.standard_normal(shape).astype(np.float32)
    q = "transformer.transformer_blocks.0.attn1.to_q"
    deeper = {f"transformer.transformer_blocks.{i}.attn1.to_q.lora_{k}.weight": r(*s)
              for i in range(4) for k, s in (("A", (4, 144)), ("B", (144, 4)))}
    return {
        "other-architecture": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight":
                                r(4, 320), "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up"
                                ".weight": r(320, 4)}, None,
                               "unexpected keys (2): unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "more-blocks-than-the-model": (deeper, None,
                                       "unexpected keys (4): transformer.transformer_blocks.{2..3}.attn1.to_q.lora_A"),
        "rank-mismatch-A-B": ({f"{q}.lora_A.weight": r(4, 144), f"{q}.lora_B.weight": r(144, 3)}, None,
                              f"{q}.lora_B.weight: rank 3 vs {q}.lora_A.weight: rank 4"),
        "wrong-width": ({f"{q}.lora_A.weight": r(4, 288), f"{q}.lora_B.weight": r(288, 4)}, None,
                        f"{q}.lora_A.weight: (4, 288) vs layer input width 144"),
        "rank-vs-config": ({f"{q}.lora_A.weight": r(4, 144), f"{q}.lora_B.weight": r(144, 4)},
                           {L.METADATA_KEY: json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})},
                           "rank 4 vs the adapter config's r=8"),
        "half-missing": ({f"{q}.lora_A.weight": r(4, 144)}, None, f"missing keys (1): {q}.lora_B.weight"),
        "a-full-checkpoint": (dict(list(base["state"].items())[:3]), None, "unexpected keys (3)"),
    }


def test_bad_loras_are_rejected_naming_their_keys(base, tmp_path, capsys):
    from tools.merge_lora import main
    write_ckpt(base["state"], tmp_path / "base.ckpt")
    for name, (tensors, metadata, expected) in _bad_loras(base).items():
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(tensors, path, metadata)
        with pytest.raises(CheckpointError) as e:
            L.load_lora(_ours(base), path, **QUIET)
        assert expected in str(e.value), f"{name}: {e.value}"
        assert main(["--checkpoint", str(tmp_path / "base.ckpt"), "--lora_path", str(path),
                     "--target", str(tmp_path / f"{name}.ckpt")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: LoRA ") and expected in err and "Traceback" not in err, f"{name}: {err}"
        assert not (tmp_path / f"{name}.ckpt").exists()


# ----------------------------------------------------------------------------------------------------------------
# End to end: sample.py --lora_path / --lora_scale, and pixart/lora-finetuning/inference_pixart_lora.py
# ----------------------------------------------------------------------------------------------------------------
def _cli(script, *args):
    return subprocess.run([sys.executable, str(script), "--progress", "false", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.e2e
def test_sample_and_inference_script_apply_a_diffusers_lora(base, bundle, tmp_path, capsys):
    from peft import LoraConfig
    config = LoraConfig(**FROM_DIFFUSERS["diffusers-pipeline-file"])
    lora = _save_from_diffusers(base, _diffusers_with_lora(base, config, seed=1), "diffusers-pipeline-file",
                                config, tmp_path / "lora")
    comp = bundle.components
    common = ["-c", ROOT / "configs/inference/demo.yaml", "--checkpoint", bundle.checkpoint,
              "--vae_root", comp / "vae", "--text_encoder_root", comp / "text_encoder", "--tokenizer_root",
              comp / "tokenizer", "--prompt", "a red square", "--sampling_steps", 2, "--image_height", 64,
              "--image_width", 64, "--resolution_binning", "false"]
    images = {}
    for scale in (0, 1):  # demo.yaml runs in graph mode: the scale is read by the compiled graph
        r = _cli(ROOT / "sample.py", *common, "--output_path", tmp_path / f"s{scale}", "--lora_path", lora,
                 "--lora_scale", scale)
        assert r.returncode == 0, r.stderr[-3000:]
        png = next((tmp_path / f"s{scale}").glob("0000*.png"))
        images[scale] = np.asarray(Image.open(png)).astype(int)
        settings = read_png_settings(png)
        assert (settings["lora"], settings["lora_scale"]) == (str(lora), scale)
    assert np.abs(images[0] - images[1]).max() > 0

    # the reference port's entry point with a diffusers pipeline folder (--model_id) and the same LoRA folder
    folder = tmp_path / "pipeline"
    base["ref"].save_pretrained(folder / "transformer")
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(comp / part, folder / part)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    script = ROOT / "pixart/lora-finetuning/inference_pixart_lora.py"
    out = tmp_path / "generated.png"
    r = _cli(script, "--model_id", folder, "--lora_path", lora.parent, "--prompt", "a red square",
             "--sampling_steps", 2, "--image_height", 64, "--image_width", 64, "--output_path", out)
    assert r.returncode == 0, r.stderr[-3000:]
    settings = read_png_settings(out)
    assert settings["model"] == PRESET and settings["lora"] == str(lora.parent)


    # a bad LoRA: exit 1, one message naming the keys (in-process: the script's main(), not a second subprocess)
    import importlib.util
    spec = importlib.util.spec_from_file_location("inference_pixart_lora", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(_bad_loras(base)["more-blocks-than-the-model"][0], bad)
    assert module.main(["--model_id", str(folder), "--lora_path", str(bad), "--prompt", "x",
                        "--output_path", str(tmp_path / "no.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: LoRA ") and "Traceback" not in err
    assert "transformer.transformer_blocks.{2..3}.attn1.to_q.lora_A.weight" in err
    assert not (tmp_path / "no.png").exists()


# mindone's examples/pixart_sigma LoRA script: peft on the diffusers model with these targets ("proj" also hits the
# patch convolution pos_embed.proj), saved by StableDiffusionPipeline.save_lora_weights(unet_lora_layers=
# convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_model))): `unet.base_model.model.` keys,
# lora.down / lora.up names, alpha = rank, no metadata
MINDONE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                   "linear", "linear_1", "linear_2"]


def _mindone_lora(base, folder: Path, targets=MINDONE_TARGETS):
    import safetensors.torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    net = _diffusers_with_lora(base, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                target_modules=targets), seed=2)
    state = convert_state_dict_to_diffusers({f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(net).items()})
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({f"unet.{k}": v.contiguous() for k, v in state.items()},
                                folder / L.LORA_WEIGHT_NAME)
    return net, folder


@pytest.mark.parity
def test_mindone_lora_script_output_loads_and_merges_exactly(base, tmp_path):
    from pixart.models.convert import save_pixart
    from pixart.pipelines.loading import load_transformer
    net, folder = _mindone_lora(base, tmp_path / "mindone")
    keys = list(read_state_dict(folder / L.LORA_WEIGHT_NAME))
    assert any(k.startswith("unet.base_model.model.pos_embed.proj.lora_A") for k in keys)
    assert any(k.endswith("attn1.to_q.lora.down.weight") for k in keys)  # diffusers' converter renames Linears only
    expected = run_diffusers(net, *base["inputs"])
    assert rel_err(expected, base["base_out"]) > 0.05
    # the patch convolution as a live branch, and merged into a checkpoint
    live = _ours(base)
    L.load_lora(live, folder, **QUIET)
    cpu.accelerate(live)
    assert rel_err(run_ours(live, *base["inputs"]), expected) <= 1e-5
    save_pixart(base["state"], base["cfg"], tmp_path / "base.ckpt", PRESET)
    L.merge_lora_file(tmp_path / "base.ckpt", folder, tmp_path / "merged.ckpt", **QUIET)
    merged = load_transformer(tmp_path / "merged.ckpt", PRESET, **QUIET)
    assert rel_err(run_ours(merged, *base["inputs"]), expected) <= 1e-5

    # without the convolution too
    net, folder = _mindone_lora(base, tmp_path / "mindone-linear", [t for t in MINDONE_TARGETS if t != "proj"])
    model = _ours(base)
    L.load_lora(model, folder, **QUIET)
    cpu.accelerate(model)
    assert rel_err(run_ours(model, *base["inputs"]), run_diffusers(net, *base["inputs"])) <= 1e-5
