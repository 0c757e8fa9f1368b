"""DreamBooth (--instance_data_dir ... --with_prior_preservation) with the demo bundle as the base model: class images
sampled from the base (resumable, deterministic), prior preservation keeps the class prompt's denoising of the base
model's class samples better than training without it, the instance prompt learns the instance images; full
fine-tuning and LoRA; bad input.

The measurable: the denoising error (epsilon MSE at fixed timesteps and noise) of a model with a prompt on a set of
images. Class images the runs never trained on (held out, sampled by the same base model) stand for "the base
model's class"; the instance images for the subject.
"""
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart import demo_bundle as demo
from pixart.data.dataset import load_image
from pixart.data.features import ImageEncoder, TextEncoder, pad_captions
from pixart.diffusion.loss import DiffusionLoss
from pixart.pipelines.loading import load_transformer
from pixart.training.distributed import Context
from pixart.training.dreambooth import generate_class_images
from tests.synthetic import draw

ROOT = Path(__file__).resolve().parents[1]
INSTANCE, CLASS = "a photo of sks square", "a photo of a square"
MAX_LENGTH = 300


def train_main():
    sys.path.insert(0, str(ROOT))
    import train
    return train.main


def lora_main():
    from tests.test_lora_train import load_script
    return load_script().main


def common(bundle, root):
    comp = bundle.components
    return ["--vae_root", comp / "vae", "--text_encoder_root", comp / "text_encoder", "--tokenizer_root",
            comp / "tokenizer", "--instance_data_dir", root / "instance", "--instance_prompt", INSTANCE,
            "--class_prompt", CLASS, "--num_class_images", 2, "--class_inference_steps", 3, "--max_steps", 12,
            "--mode", 1, "--learning_rate", 1e-3, "--warmup_steps", 0, "--log_every", 100]


class Log:
    def info(self, line):
        print(line)

    rank = info


def denoising_error(model, prompt: str, latents: np.ndarray, encoder: TextEncoder) -> float:
    """Mean epsilon MSE over `latents` at five fixed timesteps with fixed noise (the measurable of this file)."""
    import mindspore as ms
    loss = DiffusionLoss(model)
    y, mask = pad_captions(encoder([prompt]) * len(latents), MAX_LENGTH)
    rng = np.random.default_rng(7)
    errors = []
    for t in (100, 300, 500, 700, 900):
        noise = rng.standard_normal(latents.shape).astype(np.float32)
        n = len(latents)
        _, terms = loss(ms.Tensor(latents), ms.Tensor(np.full(n, t, np.int32)), ms.Tensor(noise), ms.Tensor(y),
                        ms.Tensor(mask), ms.Tensor(np.full((n, 2), 256, np.float32)),
                        ms.Tensor(np.ones((n, 1), np.float32)), ms.Tensor(np.zeros(n, np.int32)))
        errors.append(terms.asnumpy()[1].mean())
    return float(np.mean(errors))


@pytest.mark.slow
@pytest.mark.e2e
def test_dreambooth_prior_preservation(bundle, tmp_path, capsys):
    root = tmp_path
    (root / "instance").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        draw("square", 64, 64, rng).save(root / "instance" / f"{i}.png")
    comp = bundle.components
    base = load_transformer(bundle.checkpoint, demo.PRESET, log=lambda *_: None)
    text = TextEncoder(comp / "text_encoder", comp / "tokenizer", MAX_LENGTH)
    images = ImageEncoder(comp / "vae")

    # The base model's class samples, 4 of them: 0 and 1 train (prior preservation), 2 and 3 are held out.
    held = root / "held"
    settings = types.SimpleNamespace(class_data_dir=str(held), num_class_images=4, class_prompt=CLASS, seed=43,
                                     class_inference_steps=3, validation_guidance=4.5)
    generate_class_images(settings, Context(), Log(), base, text, images.vae, images.scaling_factor, MAX_LENGTH, 256)
    assert sorted(p.name for p in held.iterdir()) == [f"class_0000{k}.png" for k in range(4)]

    # An interrupted generation resumes: class_00000 is there, the run samples class_00001 with seed 43 + 1.
    (root / "class").mkdir()
    shutil.copy(held / "class_00000.png", root / "class")
    runs = {"plain": [], "prior": ["--with_prior_preservation", "--class_data_dir", root / "class"]}
    for name, extra in runs.items():
        argv = [*common(bundle, root), "--model", demo.PRESET, "--load_from", bundle.checkpoint, "--batch_size", 1,
                "--clip_grad", 0, "--use_ema", "false", "--class_dropout_prob", 0, "--output_dir", root / name, *extra]
        assert train_main()([str(a) for a in argv]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr()
    assert "sampling 1 more" in out.out and "class images" in out.err  # the progress bar
    assert sorted(p.name for p in (root / "class").iterdir()) == ["class_00000.png", "class_00001.png"]
    pixels = lambda p: np.asarray(Image.open(p).convert("RGB"), np.int16)  # noqa: E731
    diff = np.abs(pixels(root / "class" / "class_00001.png") - pixels(held / "class_00001.png"))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # the same draw (the trainer's model runs unaccelerated)

    def latents(paths):
        mean, _ = images(np.stack([load_image(p, (256, 256)) for p in paths]))
        return (mean * images.scaling_factor).astype(np.float32)

    held_out = latents([held / "class_00002.png", held / "class_00003.png"])
    instance = latents(sorted((root / "instance").iterdir()))
    models = {"base": base, **{name: load_transformer(root / name / "checkpoints" / "step_00000012" / "model.ckpt",
                                                      demo.PRESET, log=lambda *_: None) for name in runs}}
    class_err = {k: denoising_error(m, CLASS, held_out, text) for k, m in models.items()}
    instance_err = {k: denoising_error(m, INSTANCE, instance, text) for k, m in models.items()}
    with capsys.disabled():
        print("class-prompt error on held-out class samples", class_err, "instance-prompt error", instance_err)
    assert class_err["prior"] < class_err["plain"]  # the class keeps the base model's samples
    assert instance_err["plain"] < instance_err["base"] and instance_err["prior"] < instance_err["base"]

    # LoRA: the same flags on the LoRA script (class images now complete: nothing is sampled)
    argv = [*common(bundle, root), "--pretrained_model_name_or_path", bundle.checkpoint, "--model", demo.PRESET,
            "--train_batch_size", 1, "--rank", 4, "--max_train_steps", 4, "--learning_rate", 1e-2,
            "--with_prior_preservation", "--class_data_dir", root / "class", "--output_dir", root / "lora"]
    assert lora_main()([str(a) for a in argv]) == 0, capsys.readouterr().err[-3000:]
    assert "sampling" not in capsys.readouterr().out
    lora = load_transformer(bundle.checkpoint, demo.PRESET, log=lambda *_: None, lora_path=root / "lora")
    assert denoising_error(lora, INSTANCE, instance, text) < instance_err["base"]


@pytest.mark.parametrize("extra, message", [
    (["--instance_data_dir", "{root}/nowhere"], "--instance_data_dir not found: {root}/nowhere"),
    (["--instance_data_dir", "{root}/empty"], "--instance_data_dir {root}/empty holds no images"),
    (["--instance_data_dir", "{root}/instance", "--instance_prompt", "x", "--with_prior_preservation"],
     "--with_prior_preservation needs --class_data_dir"),
    (["--instance_data_dir", "{root}/instance", "--instance_prompt", "x", "--with_prior_preservation",
      "--class_data_dir", "{root}/c"],
     "--with_prior_preservation needs --class_prompt"),
    (["--instance_data_dir", "{root}/instance"], "--instance_prompt is required with --instance_data_dir"),
    (["--instance_data_dir", "{root}/instance", "--instance_prompt", "x", "--json_path", "{root}/l.json"],
     "give one data source: --instance_data_dir (DreamBooth) or --json_path"),
])
@pytest.mark.parametrize("script", ["train", "lora"])
def test_dreambooth_bad_input(tmp_path, capsys, script, extra, message):
    """One line, exit 1, before any model loads."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "instance").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "instance" / "a.png")
    extra = [e.format(root=tmp_path) for e in extra]
    if script == "train":
        status = train_main()(["--model", demo.PRESET, *extra])
    else:
        weights = tmp_path / "w.ckpt"
        weights.write_bytes(b"")
        status = lora_main()(["--pretrained_model_name_or_path", str(weights), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(root=tmp_path) in err[0], err
