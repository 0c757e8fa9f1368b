"""Image-to-image (SDEdit), inpainting, guidance-free sampling and custom timesteps through the pipeline, on the
demo bundle (tiny untrained models) at 32-64 px: what strength means in transformer calls, what a mask keeps, what
guidance off costs, and the inputs that are refused."""
import re

import numpy as np
import pytest
from PIL import Image

from pixart import demo_bundle as demo
from pixart.diffusion import SAMPLERS
from pixart.pipelines.text_to_image import PixArtPipeline

SIZE = 32
COMMON = dict(height=SIZE, width=SIZE, use_resolution_binning=False, progress=False, output_type="np", seed=3)


def _load(bundle):
    comp = bundle.components
    return PixArtPipeline.from_pretrained(checkpoint=bundle.checkpoint, model=demo.PRESET, vae_root=comp / "vae",
                                          text_encoder_root=comp / "text_encoder",
                                          tokenizer_root=comp / "tokenizer", log=lambda *_: None)


@pytest.fixture(scope="module")
def pipe(bundle):
    return _load(bundle)


@pytest.fixture
def calls(pipe, monkeypatch):
    """The transformer's batch size at every denoiser call of the test."""
    seen = []
    encode, denoise = pipe.transformer.sampler_parts()

    def counting(x, *args):
        seen.append(x.shape[0])
        return denoise(x, *args)
    monkeypatch.setattr(pipe.transformer, "sampler_parts", lambda: (encode, counting))
    return seen


def _picture(h=SIZE, w=SIZE):
    """A smooth RGB picture in [0, 1], (h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return np.clip(np.stack([0.2 + 0.6 * x, 0.8 - 0.5 * y, 0.5 + 0.3 * np.sin(6 * x * y)], -1), 0, 1).astype(np.float32)


def _round_trip(pipe, image, size=SIZE):
    return pipe.decode_latents(pipe.encode_image(image, size, size), "np")


@pytest.fixture(scope="module")
def embeds(pipe):
    """T5 features of two prompts and of the empty negative prompt, encoded once (our (features, mask) form)."""
    y, mask = pipe.encode_prompt(["a cat", "a dog"])
    y_neg, mask_neg = pipe.encode_prompt(["", ""], y.shape[2])
    return dict(prompt_embeds=(y, mask), negative_prompt_embeds=(y_neg, mask_neg))


def test_strength_ends_and_calls_for_every_sampler(pipe, calls, embeds):
    """strength 1 = text-to-image from the same noise, bit for bit; strength 0 = the VAE round trip, no transformer
    call; in between exactly round(strength * steps) calls for every sampler but LCM, which re-spaces and runs all
    its steps (as diffusers' LCM img2img), at batch N with guidance off (N = 2 prompts) and 2N with it on; custom
    timesteps run those steps."""
    image = _picture()
    one = dict(COMMON, num_inference_steps=1, guidance_scale=1.0)
    t2i = pipe("a cat", **{**one, "output_type": "latent"}).images
    i2i = pipe("a cat", image=image, strength=1.0, **{**one, "output_type": "latent"}).images
    np.testing.assert_array_equal(i2i, t2i)
    calls.clear()
    out = pipe("a cat", image=image, strength=0.0, **one).images
    assert calls == []
    np.testing.assert_array_equal(out, _round_trip(pipe, image))
    tiny = dict(COMMON, height=16, width=16, output_type="latent", **embeds)  # one token: only the count matters
    for name in SAMPLERS:
        steps = 3 if name == "dpm" else 2  # 0.5 of 3 steps: 2 calls (rounded, not truncated); of 2: 1
        calls.clear()
        pipe(image=image, strength=0.5, num_inference_steps=steps, sampler=name, guidance_scale=1.0, **tiny)
        assert calls == [2] * (steps if name == "lcm" else round(0.5 * steps)), (name, calls)
    calls.clear()
    pipe(num_inference_steps=1, sampler="lcm", guidance_scale=0.0, **tiny)
    pipe(num_inference_steps=1, sampler="lcm", guidance_scale=4.5, **tiny)
    assert calls == [2, 4]  # guidance off: the prompts alone; on: [negative, positive]
    calls.clear()
    out = pipe(timesteps=[400], guidance_scale=1.0, **tiny)
    assert calls == [2] and out.settings[0]["timesteps"] == [400] and out.settings[0]["steps"] == 1


def test_input_image_of_any_size_goes_through_binning(pipe, embeds):
    out = pipe(image=_picture(50, 70), strength=0.5, num_inference_steps=2, seed=1, progress=False,
               output_type="np", guidance_scale=1.0, **embeds)
    assert out.images.shape == (2, 50, 70, 3)  # the image's own size by default, generated in a bucket
    assert out.settings[0]["strength"] == 0.5


@pytest.mark.slow
def test_inpainting_keeps_outside_and_repaints_inside(pipe, tmp_path):
    image = _picture()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 12:28] = 255
    repaint = mask > 0
    rt = _round_trip(pipe, image)[0]
    kw = dict(image=image, strength=0.5, num_inference_steps=2, guidance_scale=1.0, **COMMON)
    out = pipe("a cat", mask_image=mask, **kw).images[0]
    outside = np.abs(out - rt).max(-1)[~repaint]
    assert (outside <= 1 / 255).mean() >= 0.99
    assert np.abs(out - image).max(-1)[repaint].mean() > 0.05  # inside: repainted
    keep_all = pipe("a cat", mask_image=np.zeros((SIZE, SIZE), np.uint8), **kw).images[0]
    np.testing.assert_allclose(keep_all, rt, atol=1e-6)
    repaint_all = pipe("a cat", mask_image=np.full((SIZE, SIZE), 255, np.uint8), **kw).images
    np.testing.assert_array_equal(repaint_all, pipe("a cat", **kw).images)
    # a mask of another size is scaled onto the generated size, as the image is: the same as the resized mask
    big = Image.fromarray(mask).resize((3 * SIZE, 3 * SIZE), Image.Resampling.NEAREST)
    big.save(tmp_path / "mask.png")
    np.testing.assert_allclose(pipe("a cat", mask_image=str(tmp_path / "mask.png"), **kw).images[0], out, atol=1e-6)


def test_masks_in_pixels_and_latents():
    """Thresholded at 0.5, blurred after; a latent pixel repaints as much as the most-repainted pixel of its cell;
    an RGB(A) mask reads its colour."""
    from pixart.pipelines.image_inputs import latent_mask, load_mask, pixel_mask
    m = np.zeros((32, 48), np.uint8)
    m[:, 20:] = 200
    m[0, 0] = 100  # below the threshold: kept
    hard = pixel_mask(load_mask(m), 32, 48)
    assert set(np.unique(hard)) == {0.0, 1.0} and hard[0, 0] == 0 and hard[:, 20:].all()
    soft = pixel_mask(load_mask(m), 32, 48, blur=3)
    assert 0 < soft[10, 19] < 1 and soft[10, 0] == 0
    lat = latent_mask(load_mask(m), 32, 48)
    assert lat.shape == (1, 1, 4, 6) and (lat[0, 0, :, 2:] == 1).all() and (lat[0, 0, :, :2] == 0).all()
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., :3] = m[..., None]
    np.testing.assert_array_equal(pixel_mask(load_mask(rgba), 32, 48), hard)


def test_bad_image_inputs_are_refused_by_name(pipe, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(wide)
    image = _picture()
    for kwargs, message in [
        (dict(image=image, strength=1.5), r"strength must be in \[0, 1\]"),
        (dict(image=image, strength=-0.1), r"strength must be in \[0, 1\]"),
        (dict(mask_image=np.zeros((SIZE, SIZE))), "mask_image needs image"),
        (dict(image=str(tmp_path / "absent.png")), "image not found"),
        (dict(image=str(corrupt)), "is not a readable image"),
        (dict(image=image, mask_image=str(wide)), "cannot be read as a single-channel mask"),
        (dict(image=image, mask_image=np.zeros((SIZE, SIZE, 2))), "mask_image must be an"),
        (dict(image=image, mask_blur=-1), "mask_blur must be"),
        (dict(timesteps=[400], sampler="ddim"), "sampler 'ddim' cannot take custom timesteps"),
        (dict(timesteps=[200, 400]), "strictly decreasing"),
        (dict(timesteps=[1000]), "out of range"),
        (dict(sigmas=[1.0]), "not sigmas"),
        (dict(num_inference_steps=1000), "dpm: 1000 steps repeat timesteps"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe("a cat", **{**COMMON, **kwargs})


@pytest.mark.slow
def test_new_paths_compile_once_per_shape(bundle, graph_mode):
    """Graph mode: LCM, guidance off, image-to-image and inpainting of one shape reuse the denoiser's graph; only
    the guidance batch (N vs 2N) is a new shape."""
    pipe = _load(bundle)
    image = _picture()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    pipe("a cat", sampler="lcm", num_inference_steps=2, guidance_scale=0.0, **COMMON)
    first = pipe.transformer.compile_count()
    pipe("a dog", sampler="dpm", num_inference_steps=3, guidance_scale=1.0, image=image, strength=0.7, **COMMON)
    pipe("a dog", sampler="sa", num_inference_steps=2, guidance_scale=0.0, image=image, mask_image=mask, **COMMON)
    pipe("a dog", timesteps=[400], guidance_scale=1.0, **COMMON)
    assert pipe.transformer.compile_count() == first
    pipe("a dog", sampler="lcm", num_inference_steps=2, guidance_scale=4.5, image=image, mask_image=mask, **COMMON)
    assert pipe.transformer.compile_count() > first  # [negative, positive]: twice the batch, a new shape


def test_sample_py_refuses_bad_image_inputs_before_loading(bundle, tmp_path, monkeypatch, capsys):
    """sample.py: a missing / corrupt --image, a mask that cannot be single-channel, --strength outside [0, 1] or
    too small for LCM's steps, bad --timesteps or too many steps: exit 1 with one line, no model loaded, nothing written."""
    from pixart.cli import main, sample as sample_run

    def no_loading(*_a, **_k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(sample_run, "encode_first", no_loading)
    monkeypatch.setattr(sample_run, "load_pipeline", no_loading)
    good = tmp_path / "in.png"
    Image.fromarray((_picture() * 255).astype(np.uint8)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"GIF89a broken")
    int_mask = tmp_path / "int32.tif"
    Image.fromarray(np.zeros((8, 8), np.int32)).save(int_mask)  # 32-bit integer pixels
    base = ["-c", "configs/inference/demo.yaml", *bundle.flags, "--prompt", "x", "--output_path", str(tmp_path / "out")]
    for extra, message in [
        (["--image", str(tmp_path / "absent.png")], "--image not found"),
        (["--image", str(corrupt)], "is not a readable image"),
        (["--image", str(good), "--mask_image", str(int_mask)], "cannot be read as a single-channel mask"),
        (["--image", str(good), "--strength", "1.5"], r"--strength must be in \[0, 1\]"),
        (["--mask_image", str(good)], "--mask_image needs --image"),
        (["--timesteps", "400,600"], "strictly decreasing"),
        (["--timesteps", "1000"], "out of range"),
        (["--timesteps", "400", "--sampling_method", "sa"], "sampler 'sa' cannot take custom timesteps"),
        (["--timesteps", "4x"], "--timesteps must be comma-separated whole numbers"),
        (["--sampling_steps", "1000"], r"--sampling_steps must be in \[1, 999\]"),
        (["--image", str(good), "--sampling_method", "lcm", "--sampling_steps", "4", "--strength", "0.05"],
         "lcm: strength 0.05 keeps 2 of the 50 distillation timesteps"),
    ]:
        assert main(sample_run.run, sample_run.build_parser, None, base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(message, err[0]), (message, err[0])
    assert not (tmp_path / "out").exists()


def test_a_folder_with_dmd_ddpm_scheduler_says_how_to_sample_it(tmp_path):
    """PixArt-Alpha-DMD's folder ships a DDPMScheduler config, which is not one of our samplers: loading it is
    refused in one line that gives the one-step recipe (scheduler='dpm', timesteps=[400], guidance_scale=1)."""
    import json
    from pixart.pipelines.scheduler import read_scheduler
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
         "beta_schedule": "linear", "prediction_type": "epsilon", "variance_type": "fixed_small"}))
    with pytest.raises(ValueError, match=r"'DDPMScheduler' .* pass scheduler='dpm' .* timesteps=\[400\], "
                                         r"guidance_scale=1") as e:
        read_scheduler(tmp_path)
    assert "\n" not in str(e.value)
