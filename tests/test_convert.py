"""Conversion and loading of PixArt transformer checkpoints: every public preset's diffusers folder through the
README's command and the shipped config's loading, parity with diffusers' PixArtTransformer2DModel, the architecture
recorded in our .ckpt, one-line errors where a file is ambiguous or does not fit, and the .ckpt reader."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from pixart.cli.options import load_yaml
from pixart.io import CheckpointError, load_into, read_ckpt_with_metadata, read_state_dict, write_safetensors
from pixart.models.convert import ARCHITECTURE_KEY, save_pixart
from pixart.models.pixart import PixArt, preset_config
from pixart.pipelines.loading import load_transformer
from tests.utils import diffusers_model, inputs, original_names, rel_err, run_diffusers, run_ours

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 2
QUIET = dict(log=lambda *a: None)
CASES = {  # preset -> (diffusers config, latent (H, W)): the .pth and diffusers paths, with their printed report
    "PixArt-XL-2-256x256": (dict(sample_size=32), (32, 32)),
    "PixArt-XL-2-1024-MS": (dict(sample_size=128, use_additional_conditions=True), (32, 48)),
    "PixArt-Sigma-XL-2-1024-MS": (dict(sample_size=128, use_additional_conditions=False, interpolation_scale=2),
                                  (24, 40)),
}
# Every public checkpoint's transformer/config.json, as diffusers wrote it: the α folders by diffusers 0.22, before
# `interpolation_scale` and `use_additional_conditions` existed (diffusers derives them from sample_size: scale
# max(sample_size // 64, 1), micro-conditions at 128); the Σ folders by scripts/convert_pixart_sigma_to_diffusers.py
# (interpolation_scale {256: 0.5, 512: 1, 1024: 2, 2048: 4}, use_additional_conditions False). All project captions
# with `caption_projection.linear_1/2` and store no null caption. -> (shipped inference config, expected preset
# report after conversion: the preset, or the presets the folder fits)
PUBLIC = {
    "PixArt-alpha/PixArt-XL-2-256x256": (dict(sample_size=32), "pixart-alpha-256x256.yaml", ["PixArt-XL-2-256x256"]),
    "PixArt-alpha/PixArt-XL-2-512x512": (dict(sample_size=64), "pixart-alpha-512x512.yaml",
                                         ["PixArt-XL-2-512x512", "PixArt-Sigma-XL-2-512-MS"]),
    "PixArt-alpha/PixArt-XL-2-1024-MS": (dict(sample_size=128), "pixart-alpha-1024-MS.yaml", ["PixArt-XL-2-1024-MS"]),
    "PixArt-alpha/PixArt-Sigma-XL-2-256x256": (dict(sample_size=32, interpolation_scale=0.5,
                                                    use_additional_conditions=False), "pixart-sigma-256x256.yaml",
                                               ["PixArt-Sigma-XL-2-256x256"]),
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS": (dict(sample_size=64, interpolation_scale=1,
                                                   use_additional_conditions=False), "pixart-sigma-512-MS.yaml",
                                              ["PixArt-XL-2-512x512", "PixArt-Sigma-XL-2-512-MS"]),
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": (dict(sample_size=128, interpolation_scale=2,
                                                    use_additional_conditions=False), "pixart-sigma-1024-MS.yaml",
                                               ["PixArt-Sigma-XL-2-1024-MS"]),
    "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS": (dict(sample_size=256, interpolation_scale=4,
                                                  use_additional_conditions=False), "pixart-sigma-2K-MS.yaml",
                                             ["PixArt-Sigma-XL-2-2K-MS"]),
}


def diffusers_folder(repo: str, root: Path, seed: int = 0):
    """`root/<name>/transformer` of a depth-2, full-width copy of `repo` (config.json as the hub has it); returns
    (folder, diffusers model)."""
    extra = PUBLIC[repo][0]
    model = diffusers_model(extra, seed=seed, depth=DEPTH)
    folder = root / repo.split("/")[1] / "transformer"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("interpolation_scale", "use_additional_conditions"):  # save_pretrained writes what 0.22 did not
        if key not in extra:
            config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, model


def to_original(state: dict, y_tokens: int, pos_tokens: int) -> dict:
    """The test's own diffusers -> original renaming (`tests.utils.original_names`, independent of pixart.io.keymap)
    plus what the original files have beside it: the null caption and the fixed position-embedding buffer."""
    out = original_names(state)
    out["y_embedder.y_embedding"] = torch.randn(y_tokens, 4096) / 64
    out["pos_embed"] = torch.zeros(1, pos_tokens, 1152)
    return out




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




@pytest.mark.parametrize("repo", list(PUBLIC))
def test_every_public_diffusers_folder_converts_loads_and_matches(repo, tmp_path, capsys):
    """The README's command with no flag, then the loading of `sample.py -c configs/inference/<model's config>`."""
    _, config_name, fits = PUBLIC[repo]
    folder, ref = diffusers_folder(repo, tmp_path)
    from tools.convert import main
    assert main(["--source", str(folder), "--target", str(tmp_path / "x.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert f"closest: {' or '.join(fits)}" in printed, printed
    _, metadata = read_ckpt_with_metadata(tmp_path / "x.ckpt")
    record = json.loads(metadata[ARCHITECTURE_KEY])
    assert record["preset"] == (fits[0] if len(fits) == 1 else None)
    assert record["config"]["num_heads"] == 16 and record["config"]["depth"] == DEPTH

    model_name = load_yaml(ROOT / "configs" / "inference" / config_name)["model"]
    assert model_name in fits
    net = load_transformer(tmp_path / "x.ckpt", model_name, **QUIET)
    assert net.config.model_max_length == preset_config(model_name).model_max_length
    assert net.config.pe_interpolation == preset_config(model_name).pe_interpolation
    x, t, y, mask, info = inputs((16, 24), net.config.micro_condition)
    err = rel_err(run_ours(net, x, t, y, mask, info), run_diffusers(ref, x, t, y, mask, info))
    assert err <= 1e-4, f"{repo}: relative error {err:.2e}"


def test_ambiguous_folder_needs_model_and_pipeline_index_decides(tmp_path, capsys):
    """α-512 and Σ-512-MS transformers differ only in caption length, which a diffusers transformer folder does not
    store: loading one without a model is a one-line error naming both and the flag; a whole pipeline folder's
    model_index.json decides; a model that contradicts what the file says names the preset the file is."""
    folder, _ = diffusers_folder("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", tmp_path)
    from tools.convert import main
    assert main(["--source", str(folder), "--target", str(tmp_path / "x.ckpt")]) == 0
    assert "fits PixArt-XL-2-512x512 and PixArt-Sigma-XL-2-512-MS" in capsys.readouterr().out
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "x.ckpt", None, **QUIET)
    message = str(e.value)
    assert "\n" not in message and "PixArt-XL-2-512x512 and PixArt-Sigma-XL-2-512-MS" in message
    assert "--model" in message and "model_max_length" in message

    (folder.parent / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    assert main(["--source", str(folder), "--target", str(tmp_path / "y.ckpt")]) == 0
    net = load_transformer(tmp_path / "y.ckpt", None, **QUIET)
    assert net.config.model_max_length == 300
    with pytest.raises(CheckpointError, match="the file is PixArt-Sigma-XL-2-512-MS \\(reduced\\); pass --model "
                                              "PixArt-Sigma-XL-2-512-MS"):
        load_transformer(tmp_path / "y.ckpt", "PixArt-XL-2-512x512", **QUIET)


def test_ckpt_to_ckpt_keeps_the_preset(tmp_path, capsys):
    """A 2K model converted twice is still the 2K model (the recorded architecture travels)."""
    folder, _ = diffusers_folder("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", tmp_path)
    from tools.convert import main
    assert main(["--source", str(folder), "--target", str(tmp_path / "a.ckpt")]) == 0
    assert main(["--source", str(tmp_path / "a.ckpt"), "--target", str(tmp_path / "b.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("closest: PixArt-Sigma-XL-2-2K-MS") == 2 and "256x256" not in printed
    net = load_transformer(tmp_path / "b.ckpt", None, **QUIET)
    assert (net.config.input_size, net.config.pe_interpolation, net.config.model_max_length) == (256, 4.0, 300)


def test_four_heads_of_32_round_trip_without_flags(tmp_path):
    """Head size 32, not PixArt's 72: the head count comes from the file's record, not from width / 72."""
    cfg = preset_config("PixArt-Sigma-XL-2-256x256", depth=2, hidden_size=128, num_heads=4, caption_channels=32)
    model = PixArt(cfg)
    g = np.random.default_rng(0)
    for p in model.get_parameters():
        p.set_data(ms.Tensor((g.standard_normal(p.shape) * (p.shape[-1] ** -0.5 if len(p.shape) > 1 else 0.1))
                             .astype(np.float32)))
    state = {p.name: p.asnumpy() for p in model.get_parameters()}
    save_pixart(state, cfg, tmp_path / "a.ckpt")
    r = _cli("--source", tmp_path / "a.ckpt", "--target", tmp_path / "b.ckpt")
    assert r.returncode == 0, r.stderr
    assert "heads=4" in r.stdout
    x, t, y, mask, _ = inputs((16, 16), False, caption_channels=32)
    expected = run_ours(model, x, t, y, mask, None)
    for name in (None, "PixArt-Sigma-XL-2-256x256"):
        net = load_transformer(tmp_path / "b.ckpt", name, **QUIET)
        assert net.config.num_heads == 4
        assert rel_err(run_ours(net, x, t, y, mask, None), expected) <= 1e-5
    # the same weights with no record: refused in one line, never loaded with 128 // 72 = 1 head
    write_safetensors(state, tmp_path / "bare.safetensors")
    r = _cli("--source", tmp_path / "bare.safetensors", "--target", tmp_path / "c.ckpt")
    assert r.returncode == 1 and "--num_heads" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    r = _cli("--source", tmp_path / "bare.safetensors", "--target", tmp_path / "c.ckpt", "--num_heads", "4",
             "--model", "PixArt-Sigma-XL-2-256x256")  # a bare state dict does not say its training size either
    assert r.returncode == 0, r.stderr
    net = load_transformer(tmp_path / "c.ckpt", None, **QUIET)
    assert rel_err(run_ours(net, x, t, y, mask, None), expected) <= 1e-5


def test_recorded_architecture_must_fit_the_weights(tmp_path):
    cfg = preset_config("PixArt-XL-2-256x256", depth=1, hidden_size=144, num_heads=2, caption_channels=32,
                        model_max_length=8)
    state = {p.name: p.asnumpy() for p in PixArt(cfg).get_parameters()}
    save_pixart(state, preset_config("PixArt-XL-2-256x256", depth=2, hidden_size=144, num_heads=2,
                                     caption_channels=32, model_max_length=8), tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="recorded architecture does not fit the weights: depth 2"):
        load_transformer(tmp_path / "x.ckpt", None, **QUIET)


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.e2e
def test_convert_rejects_other_architectures_with_named_keys(tmp_path):
    small = PixArt(preset_config("PixArt-XL-2-256x256", depth=2, hidden_size=64, num_heads=4, caption_channels=32,
                                 model_max_length=8))
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
    from pixart.io import read_ckpt, write_ckpt
    from pixart.io.ckpt import _read_ckpt_stream
    g = np.random.default_rng(0)
    state = {"a.weight": g.standard_normal((7, 5)).astype(np.float32),  # odd sizes: unaligned contents follow
             "b": g.standard_normal((3,)).astype(np.float16), "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
             "long_name." * 9 + "w": g.standard_normal((2, 3, 4)).astype(np.float32),
             "steps": np.array([12], np.int64), "flag": np.array([True, False])}
    path = tmp_path / "x.ckpt"
    write_ckpt(state, path)
    ours, ref = _read_ckpt_stream(path)[0], {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
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


def _random_ckpt(path, cfg, preset, seed: int = 0) -> dict:
    """A .ckpt of `cfg` with every parameter random (also those PixArt's init zeroes) and a null caption."""
    g = np.random.default_rng(seed)
    with no_init_parameters():
        shapes = {p.name: tuple(p.shape) for p in PixArt(cfg).get_parameters()}
    state = {k: (g.standard_normal(s) * (s[-1] ** -0.5 if len(s) > 1 else 0.1)).astype(np.float32)
             for k, s in shapes.items()}
    save_pixart(state, cfg, path, preset)
    return state


def _assert_same_tensors(a, b):
    (sa, _), (sb, _) = read_ckpt_with_metadata(a), read_ckpt_with_metadata(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k


@pytest.mark.parity
def test_ckpt_to_diffusers_and_original_and_back_bit_exact(tmp_path, capsys):
    """.ckpt -> diffusers folder -> .ckpt and .ckpt -> .pth / .safetensors -> .ckpt keep every tensor bit for bit
    and the architecture; diffusers loads the exported folder as it is and computes what ours does."""
    from tools.convert import main
    preset = "PixArt-XL-2-1024-MS"  # the micro-conditions: every embedder travels
    cfg = preset_config(preset, depth=2, hidden_size=144, num_heads=2, caption_channels=32)
    _random_ckpt(tmp_path / "a.ckpt", cfg, preset)
    assert main(["-s", str(tmp_path / "a.ckpt"), "-t", str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert main(["-s", str(tmp_path / "d"), "-t", str(tmp_path / "b.ckpt")]) == 0
    _assert_same_tensors(tmp_path / "a.ckpt", tmp_path / "b.ckpt")
    for name in ("x.pth", "x.safetensors"):
        assert main(["--source", str(tmp_path / "a.ckpt"), "--target", str(tmp_path / name)]) == 0
        assert main(["-s", str(tmp_path / name), "-t", str(tmp_path / f"{name}.ckpt")]) == 0
        _assert_same_tensors(tmp_path / "a.ckpt", tmp_path / f"{name}.ckpt")
    assert main(["-s", str(tmp_path / "x.pth")]) == 0  # the reference port's default target: next to the source
    _assert_same_tensors(tmp_path / "a.ckpt", tmp_path / "x.ckpt")

    import diffusers
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(str(tmp_path / "d")).eval()
    ours = load_transformer(tmp_path / "b.ckpt", None, **QUIET)
    assert ours.config == load_transformer(tmp_path / "a.ckpt", None, **QUIET).config
    x, t, y, mask, info = inputs((16, 24), True, caption_channels=32)
    assert rel_err(run_ours(ours, x, t, y, mask, info), run_diffusers(ref, x, t, y, mask, info)) <= 1e-5


def test_export_refuses_what_diffusers_cannot_hold(tmp_path, capsys):
    from tools.convert import main
    cfg = preset_config("PixArt-Sigma-XL-2-2K-MS", depth=2, hidden_size=144, num_heads=2, caption_channels=32,
                        kv_compress_config={"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1]})
    _random_ckpt(tmp_path / "k.ckpt", cfg, None)
    assert main(["-s", str(tmp_path / "k.ckpt"), "-t", str(tmp_path / "d"), "--to", "diffusers"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KV compression in layers [1]" in err, err
    assert main(["-s", str(tmp_path / "k.ckpt"), "--to", "ckpt"]) == 1  # default target would be the source
    assert "is the source itself" in capsys.readouterr().err
