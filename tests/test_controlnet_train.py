"""train.py --controlnet end to end with the demo bundle as the frozen base: exact resume after a kill, msrun data
parallel equal to one process, the base weights untouched, bad input.

Condition images come from --control_dir (the synthetic shapes' own images, --control_type none), so these runs need
no edge extractor; PyNative keeps each run free of graph compilation.
"""
import json
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pixart import demo_bundle as demo
from pixart.io import read_ckpt
from tests.synthetic import make_dataset
from tests.test_train import (ROOT, assert_same_run, check_data_parallel, kill_after_checkpoint, msrun_two_workers,
                              run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-train")
    comp = demo.build(root / "demo", log=lambda *_: None) / demo.COMPONENTS
    labels, images = make_dataset(root / "data", per_kind_and_ratio=2, ratios=("1.0",))  # 4 images, one bucket
    return dict(root=root, common=[
        "--model", demo.PRESET, "--load_from", root / "demo" / demo.CHECKPOINT, "--vae_root", comp / "vae",
        "--text_encoder_root", comp / "text_encoder", "--tokenizer_root", comp / "tokenizer", "--json_path", labels,
        "--image_dir", images, "--controlnet", "--control_dir", images, "--mode", "pynative", "--learning_rate",
        1e-3, "--warmup_steps", 1, "--real_prompt_ratio", 0.5, "--param_digest", "true", "--log_every", 1])


@pytest.mark.slow
@pytest.mark.e2e
def test_controlnet_resume_after_kill_equals_an_uninterrupted_run(data, tmp_path):
    k = 2
    common = [*data["common"], "--batch_size", 2, "--max_steps", 2 * k, "--save_every", k, "--keep_last", 0]
    full = tmp_path / "full"
    r = run("train.py", *common, "--output_dir", full)
    assert r.returncode == 0, r.stderr[-3000:]
    base_digest = next(ln for ln in r.stdout.splitlines() if "base weights digest" in ln).rsplit(" ", 1)[1]
    assert (full / "controlnet.ckpt").is_file()
    assert set(read_ckpt(full / "controlnet.ckpt")) == set(read_ckpt(full / "checkpoints" / "step_00000004" /
                                                                      "model.ckpt"))
    assert all(n.startswith("controlnet.") for n in read_ckpt(full / "controlnet.ckpt"))

    part = tmp_path / "part"
    marker = kill_after_checkpoint(k, *common, "--output_dir", part)
    r = run("train.py", *common, "--output_dir", part, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {marker.parent}: step {k}" in r.stdout
    assert f"base weights digest {base_digest}" in r.stdout  # the base stays frozen

    assert_same_run(full, part, 2 * k)


@pytest.mark.slow
@pytest.mark.e2e
def test_controlnet_msrun_equals_one_process(data, tmp_path):
    common = [*map(str, data["common"]), "--max_steps", "2"]
    single = tmp_path / "single"
    r1 = run("train.py", *common, "--batch_size", 4, "--output_dir", single)
    assert r1.returncode == 0, r1.stderr[-3000:]
    dp = tmp_path / "dp"
    worker = msrun_two_workers(tmp_path / "logs", *common, "--batch_size", 2, "--output_dir", dp)
    diff = check_data_parallel(single, r1.stdout, dp, worker)
    print(f"msrun vs one process: max |control-branch weight difference| {diff:.2e}")


@pytest.mark.parametrize("extra, message", [
    (["--control_dir", "{root}/nowhere"], "--control_dir not found: {root}/nowhere"),
    (["--control_type", "hed"], "--control_type hed needs HED maps made beforehand, as images under --control_dir"),
    (["--recompute", "true"], "--recompute with --controlnet"),
    (["--copy_blocks_num", "0"], "--copy_blocks_num must be >= 1, got 0"),
])
def test_controlnet_train_bad_input(tmp_path, capsys, extra, message):
    """One line, exit 1, before any model loads."""
    sys.path.insert(0, str(ROOT))
    import train
    (tmp_path / "vae").mkdir()
    status = train.main(["--model", demo.PRESET, "--controlnet", "--vae_root", str(tmp_path / "vae"),
                         *[e.format(root=tmp_path) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and message.format(root=tmp_path) in err[0], err


# ----------------------------------------------------------------------------------------------------------------
# Learning: a control branch trained on shapes whose Canny edges are the condition uses the condition
# ----------------------------------------------------------------------------------------------------------------
def shape_image(rng, size: int = 64) -> Image.Image:
    """A dark square or disc of random size and place on a light background."""
    im = Image.new("RGB", (size, size), (230, 230, 230))
    r = rng.uniform(0.15, 0.3) * size
    cx, cy = rng.uniform(r, size - r, 2)
    draw = ImageDraw.Draw(im)
    (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([cx - r, cy - r, cx + r, cy + r], fill=(40, 40, 40))
    return im


def denoising_errors(net, x0, condition, y, mask) -> float:
    """Mean epsilon MSE of the ControlNet over the latents `x0` with `condition`, at fixed timesteps and noise."""
    import mindspore as ms
    from pixart.training.controlnet import ControlNetLoss
    loss, rng, n, errors = ControlNetLoss(net), np.random.default_rng(3), len(x0), []
    for t in (100, 300, 500, 700, 900):
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        _, terms = loss(ms.Tensor(np.concatenate([x0, condition], 1)), ms.Tensor(np.full(n, t, np.int32)),
                        ms.Tensor(noise), ms.Tensor(y), ms.Tensor(mask), ms.Tensor(np.full((n, 2), 256, np.float32)),
                        ms.Tensor(np.ones((n, 1), np.float32)), ms.Tensor(np.zeros(n, np.int32)))
        errors.append(terms.asnumpy()[1].mean())
    return float(np.mean(errors))


@pytest.mark.slow
@pytest.mark.e2e
def test_controlnet_learns_to_follow_canny_edges(data, tmp_path):
    """300 CPU steps on 16 shapes (the condition: each image's Canny edges, made on the fly and cached). The demo
    bundle's base and VAE are random, so its decoded samples say nothing: the measurable is the denoising error of
    held-out shapes, which the trained branch lowers more with their own edge map than with another shape's, while
    the untrained branch (zero projections) is the base whatever the condition."""
    import mindspore as ms
    from pixart.data.dataset import load_image
    from pixart.data.features import TextEncoder, pad_captions
    from pixart.models.controlnet import ControlPixArt
    from pixart.models.vae import load_vae
    from pixart.pipelines.controlnet import condition_image, encode_condition, load_controlnet
    from pixart.pipelines.loading import load_transformer

    root, comp = data["root"], data["root"] / "demo" / demo.COMPONENTS
    rng = np.random.default_rng(0)
    (tmp_path / "shapes").mkdir()
    items = []
    for i in range(20):
        shape_image(rng).save(tmp_path / "shapes" / f"{i:02d}.png")
        items.append({"path": f"{i:02d}.png", "prompt": "a shape", "height": 64, "width": 64, "ratio": 1.0})
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(items[:16]))
    encoders = ["--vae_root", comp / "vae", "--text_encoder_root", comp / "text_encoder", "--tokenizer_root",
                comp / "tokenizer"]
    r = run("tools/extract_features.py", "--json_path", labels, "--image_dir", tmp_path / "shapes", "--output_dir",
            tmp_path / "cache", "--resolution", 256, "--multi_scale", "false", "--max_length", 300, *encoders)
    assert r.returncode == 0, r.stderr[-3000:]
    means = [np.load(f)["mean"] for f in (tmp_path / "cache" / "latents").iterdir()]
    scale = float(1.0 / np.concatenate([m.ravel() for m in means]).std())  # unit-variance latents
    out = tmp_path / "run"
    r = run("train.py", "--model", demo.PRESET, "--load_from", root / "demo" / demo.CHECKPOINT, "--vae_root",
            comp / "vae", "--json_path", labels, "--image_dir", tmp_path / "shapes", "--feature_dir",
            tmp_path / "cache", "--controlnet", "--control_type", "canny", "--max_steps", 300, "--batch_size", 4, "--learning_rate", 2e-3,
            "--warmup_steps", 0, "--use_ema", "false", "--sample_posterior", "false", "--sd_scale_factor", scale,
            "--class_dropout_prob", 0, "--log_every", 100, "--save_every", 1000, "--output_dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "control" / "canny-image").glob("*.npy"))) == 16  # conditions cached

    base = load_transformer(root / "demo" / demo.CHECKPOINT, demo.PRESET, log=lambda *_: None)
    net = load_controlnet(out / "controlnet.ckpt", base, log=lambda *_: None)
    vae = load_vae(comp / "vae")
    held = [tmp_path / "shapes" / item["path"] for item in items[16:]]
    x0 = np.concatenate([vae.encode(ms.Tensor(load_image(p, (256, 256))[None]))[0].asnumpy() for p in held]) * scale
    condition = np.concatenate([encode_condition(vae, condition_image(Image.open(p), "canny", 256, 256), scale)
                                for p in held])
    y, mask = pad_captions(TextEncoder(comp / "text_encoder", comp / "tokenizer", 300)(["a shape"]) * len(held), 300)
    x0, swapped = x0.astype(np.float32), np.roll(condition, 1, 0)
    own, other = (denoising_errors(net, x0, c, y, mask) for c in (condition, swapped))
    untrained = ControlPixArt(base, net.copy_blocks_num)
    untrained.initialize_from_base()
    assert denoising_errors(untrained, x0, condition, y, mask) == denoising_errors(untrained, x0, swapped, y, mask)
    print(f"held-out denoising error of the trained branch: own edges {own:.4f}, another shape's edges {other:.4f}")
    assert own < 0.95 * other
