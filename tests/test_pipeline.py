"""Pipeline parity with diffusers: the same tiny random T5, VAE and PixArt transformer in diffusers'
`PixArtSigmaPipeline` / `PixArtAlphaPipeline` (PyTorch) and in our `PixArtPipeline` (MindSpore), the same prompt,
negative prompt and initial latents, DPM-Solver++(2M) on both sides: the decoded images agree to within 1/255 on at
least 99% of pixels.

Cases: Σ-512-MS at 256x256 without resolution binning (the multi-scale position embedding off its native grid);
Σ-256 at 200x320 with binning on (bucket 192x320, then diffusers' resize_and_crop_tensor back to 200x320), two prompts
in one batch; α-1024-MS at 256x384 without binning, with the size / aspect-ratio micro-conditions.

The diffusers-shaped API: a pipeline folder diffusers saved -> `PixArtSigmaPipeline.from_pretrained` here (the
sampler from its scheduler_config.json) -> the same images, 20 steps; our `save_pretrained` -> diffusers'
`from_pretrained` -> the same images again; per-step callbacks; output_type="latent" then decoding.
"""
import numpy as np
import pytest
import torch

import pixart
from pixart.models.convert import convert_pixart_file
from pixart.pipelines.loading import load_transformer
from pixart.pipelines.scheduler import sampler_from_config
from pixart.pipelines.text_to_image import PixArtPipeline
from pixart.models.t5_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.parity

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

STEPS = 10  # fewer than the usual 20 to keep the file fast; still enough to tell a guidance change of 0.1
GUIDANCE = 4.5
PROMPTS = ["  A small Cactus with a HAPPY face in the Sahara desert ", "an old lighthouse on a rocky coast, storm"]
T5_CONFIG = dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                 is_encoder_decoder=False)
VAE_CONFIG = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
VAE_SCALING = {"sigma": 0.13025, "alpha": 0.18215}  # SDXL VAE (Σ), SD VAE (α)
# our preset -> (family, diffusers transformer config making the same model, T5 tokens)
PRESETS = {
    "PixArt-Sigma-XL-2-512-MS": ("sigma", dict(sample_size=64, interpolation_scale=1, use_additional_conditions=False),
                                 300),
    "PixArt-Sigma-XL-2-256x256": ("sigma", dict(sample_size=32, interpolation_scale=0.5,
                                                use_additional_conditions=False), 300),
    "PixArt-XL-2-1024-MS": ("alpha", dict(sample_size=128, interpolation_scale=2, use_additional_conditions=True), 120),
}
# id -> (preset, prompts, height, width, resolution binning)
CASES = {
    "sigma512-256x256": ("PixArt-Sigma-XL-2-512-MS", PROMPTS[:1], 256, 256, False),
    "sigma256-200x320-binned": ("PixArt-Sigma-XL-2-256x256", PROMPTS, 200, 320, True),
    "alpha1024-256x384-microcond": ("PixArt-XL-2-1024-MS", PROMPTS[:1], 256, 384, False),
}


def _randomize(module, seed: int):
    """Every weight random (the default init zeroes PixArt's output layers), deterministic in `seed`."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return module.eval()


def _diffusers_transformer(extra: dict, seed: int):
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=144, caption_channels=T5_CONFIG["d_model"], norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
        num_embeds_ada_norm=1000, **extra)
    return _randomize(model, seed)


@pytest.fixture(scope="module")
def diffusers_bundle(tmp_path_factory):
    """Tiny random components saved in diffusers' layout: {'root', 'tokenizer', 't5', 'vae': {family: model},
    'transformer': {preset: model}}; our transformers are converted to `<preset>.ckpt` by the tools/convert path."""
    root = tmp_path_factory.mktemp("pipeline")
    make_tiny_tokenizer(root / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))

    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), **T5_CONFIG))
    _randomize(t5, 0).save_pretrained(root / "text_encoder")

    vaes = {}
    for i, (family, scaling) in enumerate(VAE_SCALING.items()):
        vae = _randomize(diffusers.AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling, sample_size=256), 1 + i)
        vae.save_pretrained(root / f"vae_{family}")
        vaes[family] = vae

    nets = {}
    for i, (preset, (_, extra, tokens)) in enumerate(PRESETS.items()):
        net = _diffusers_transformer(extra, seed=10 + i)
        net.save_pretrained(root / preset)
        convert_pixart_file(root / preset, root / f"{preset}.ckpt", model_max_length=tokens, log=lambda *a: None)
        nets[preset] = net
    return dict(root=root, tokenizer=tokenizer, t5=t5, vae=vaes, transformer=nets)


def _scheduler(name: str = "DPMSolverMultistepScheduler"):
    """diffusers' schedulers for PixArt: DPM-Solver++(2M) as the hub folders ship it, DDIM and SA-Solver as a user
    swaps them in (SA-Solver without noise, tau = 0, so both sides are deterministic)."""
    betas = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    if name == "DDIMScheduler":
        return diffusers.DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    if name == "SASolverScheduler":
        return diffusers.SASolverScheduler(**betas, tau_func=lambda t: 0.0)
    return diffusers.DPMSolverMultistepScheduler(**betas, solver_order=2, algorithm_type="dpmsolver++",
                                                 prediction_type="epsilon")


def _run_diffusers(diffusers_bundle, preset, prompts, height, width, binning, latents):
    family, _, tokens = PRESETS[preset]
    cls = diffusers.PixArtSigmaPipeline if family == "sigma" else diffusers.PixArtAlphaPipeline
    pipe = cls(tokenizer=diffusers_bundle["tokenizer"], text_encoder=diffusers_bundle["t5"],
               vae=diffusers_bundle["vae"][family], transformer=diffusers_bundle["transformer"][preset],
               scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompts, negative_prompt="", height=height, width=width, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
                    use_resolution_binning=binning, clean_caption=False, max_sequence_length=tokens).images


def _ours(diffusers_bundle, preset):
    family = PRESETS[preset][0]
    root = diffusers_bundle["root"]
    return PixArtPipeline.from_pretrained(checkpoint=root / f"{preset}.ckpt", model=preset,
                                          vae_root=root / f"vae_{family}", text_encoder_root=root / "text_encoder",
                                          tokenizer_root=root / "tokenizer", log=lambda *a: None)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_images_match_diffusers_pipeline(diffusers_bundle, case):
    preset, prompts, height, width, binning = CASES[case]
    ours = _ours(diffusers_bundle, preset)
    assert ours.max_sequence_length == PRESETS[preset][2]
    if binning:  # both sides denoise in the same bucket
        from pixart.data.buckets import closest_bucket
        lh, lw = (s // 8 for s in closest_bucket(height, width, ours._table_resolution())[:2])
    else:
        lh, lw = height // 8, width // 8
    latents = np.random.default_rng(0).standard_normal((len(prompts), 4, lh, lw)).astype(np.float32)

    ref = _run_diffusers(diffusers_bundle, preset, prompts, height, width, binning, latents)
    out = ours(prompts, negative_prompt="", height=height, width=width, sampler="dpm", num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, latents=latents, use_resolution_binning=binning, output_type="np",
               progress=False)
    img = np.asarray(out.images)
    assert img.shape == ref.shape == (len(prompts), height, width, 3)
    diff = np.abs(img.astype(np.float64) - ref)
    within = float((diff <= 1 / 255).mean())
    print(f"{case}: {within:.4%} of pixels within 1/255, max |diff| {diff.max():.2e}, "
          f"image std {ref.std():.3f}, clipped {float(((ref == 0) | (ref == 1)).mean()):.2%}, "
          f"latent std {out.latents.std():.2f}")
    assert ref.std() > 0.05, "degenerate reference image: the test would prove nothing"
    assert within >= 0.99, f"{case}: only {within:.2%} of pixels within 1/255 (max |diff| {diff.max():.3f})"


def test_transformer_loads_from_diffusers_folder(diffusers_bundle):
    net = load_transformer(diffusers_bundle["root"] / "PixArt-Sigma-XL-2-512-MS", "PixArt-Sigma-XL-2-512-MS",
                           log=lambda *a: None)
    assert net.config.model_max_length == 300


# id -> (preset, diffusers scheduler, height, width): 20 steps each
FOLDER_CASES = {
    "sigma256-dpm": ("PixArt-Sigma-XL-2-256x256", "DPMSolverMultistepScheduler", 256, 256),
    "sigma256-ddim": ("PixArt-Sigma-XL-2-256x256", "DDIMScheduler", 256, 256),
    "sigma256-sa": ("PixArt-Sigma-XL-2-256x256", "SASolverScheduler", 256, 256),
    "alpha1024-microcond-dpm": ("PixArt-XL-2-1024-MS", "DPMSolverMultistepScheduler", 256, 384),
}
FOLDER_STEPS = 20


def _diffusers_pipeline(diffusers_bundle, preset, scheduler):
    family = PRESETS[preset][0]
    cls = diffusers.PixArtSigmaPipeline if family == "sigma" else diffusers.PixArtAlphaPipeline
    pipe = cls(tokenizer=diffusers_bundle["tokenizer"], text_encoder=diffusers_bundle["t5"],
               vae=diffusers_bundle["vae"][family], transformer=diffusers_bundle["transformer"][preset],
               scheduler=_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_images(pipe, latents, height, width, tokens):
    with torch.no_grad():
        return pipe(PROMPTS[0], negative_prompt="", height=height, width=width, num_inference_steps=FOLDER_STEPS,
                    guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
                    use_resolution_binning=False, clean_caption=False, max_sequence_length=tokens).images


def _assert_close(img, ref, what):
    diff = np.abs(np.asarray(img, np.float64) - ref)
    within = float((diff <= 1 / 255).mean())
    assert ref.std() > 0.05, "degenerate reference image: the test would prove nothing"
    assert within >= 0.99, f"{what}: only {within:.2%} of pixels within 1/255 (max |diff| {diff.max():.3f})"


@pytest.mark.parametrize("case", list(FOLDER_CASES))
@pytest.mark.slow
def test_diffusers_folder_both_ways(diffusers_bundle, case, tmp_path):
    """diffusers' save_pretrained -> our from_pretrained (sampler from the folder's scheduler) -> the same images;
    our save_pretrained -> diffusers' from_pretrained -> the same images."""
    preset, scheduler, height, width = FOLDER_CASES[case]
    family, _, tokens = PRESETS[preset]
    ref_pipe = _diffusers_pipeline(diffusers_bundle, preset, scheduler)
    if scheduler == "SASolverScheduler":  # its tau function is code, not config: saved as the default
        ref_pipe.scheduler = diffusers.SASolverScheduler.from_config({**ref_pipe.scheduler.config, "tau_func": None})
        ref_pipe.save_pretrained(tmp_path / "diffusers")
        ref_pipe.scheduler = _scheduler(scheduler)
    else:
        ref_pipe.save_pretrained(tmp_path / "diffusers")
    cls = pixart.PixArtSigmaPipeline if family == "sigma" else pixart.PixArtAlphaPipeline
    ours = pixart.PixArtPipeline.from_pretrained(tmp_path / "diffusers")
    assert type(ours) is cls and isinstance(ours.transformer, pixart.PixArtTransformer2DModel)
    assert ours.sampler == {"DDIMScheduler": "ddim", "SASolverScheduler": "sa"}.get(scheduler, "dpm")
    latents = np.random.default_rng(0).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)
    ref = _diffusers_images(ref_pipe, latents, height, width, tokens)
    options = {"eta": 0.0} if scheduler == "SASolverScheduler" else None  # tau = 0 on both sides
    out = ours(PROMPTS[0], negative_prompt="", height=height, width=width, num_inference_steps=FOLDER_STEPS,
               guidance_scale=GUIDANCE, latents=latents, output_type="np", use_resolution_binning=False,
               max_sequence_length=tokens, progress=False, sampler_options=options)
    assert out[0].shape == ref.shape == (1, height, width, 3)
    _assert_close(out[0], ref, f"{case}: ours from diffusers' folder")

    ours.save_pretrained(tmp_path / "ours")
    back = type(ref_pipe).from_pretrained(tmp_path / "ours")
    if scheduler == "SASolverScheduler":
        back.scheduler = _scheduler(scheduler)  # tau = 0 again
    back.set_progress_bar_config(disable=True)
    _assert_close(_diffusers_images(back, latents, height, width, tokens), ref, f"{case}: diffusers from our folder")


@pytest.fixture(scope="module")
def sigma_folder(diffusers_bundle):
    """A Σ-256 pipeline folder as diffusers saves it, loaded here."""
    folder = diffusers_bundle["root"] / "sigma256-pipeline"
    _diffusers_pipeline(diffusers_bundle, "PixArt-Sigma-XL-2-256x256", "DPMSolverMultistepScheduler").save_pretrained(
        folder)
    return folder, pixart.PixArtSigmaPipeline.from_pretrained(folder)


def _small_call(pipe, **kw):
    args = dict(height=128, width=128, num_inference_steps=4, generator=3, use_resolution_binning=False,
                progress=False)
    return pipe(PROMPTS[0], **{**args, **kw})


def test_latent_output_then_decode_equals_np(sigma_folder):
    _, pipe = sigma_folder
    images = _small_call(pipe, output_type="np")[0]
    latents = _small_call(pipe, output_type="latent")[0]
    assert latents.shape == (1, 4, 16, 16)
    np.testing.assert_array_equal(pipe.decode_latents(latents, "np"), images)
    pil = _small_call(pipe, return_dict=False)[0][0]
    assert pil.size == (128, 128)


def test_callback_on_step_end_stops_early_and_edits_latents(sigma_folder):
    _, pipe = sigma_folder
    seen = []

    def stop_after_two(p, i, t, kwargs):
        seen.append((i, t))
        p._interrupt = i == 1
        return {"latents": kwargs["latents"] * 0}  # edited latents are the ones that go on

    out = _small_call(pipe, output_type="latent", callback_on_step_end=stop_after_two,
                      callback_on_step_end_tensor_inputs=["latents"])
    assert [i for i, _ in seen] == [0, 1] and seen[0][1] > seen[1][1]
    np.testing.assert_array_equal(out.latents, 0)


def test_generator_forms_agree(sigma_folder):
    """A seed means np.random.default_rng(seed) per image, however it is given."""
    _, pipe = sigma_folder
    a = _small_call(pipe, output_type="latent", generator=7)[0]
    b = _small_call(pipe, output_type="latent", generator=[np.random.default_rng(7)])[0]
    c = _small_call(pipe, output_type="latent", generator=None, seed=7)[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_type="pt"), "output_type must be one of"),
    (dict(prompt_embeds=np.zeros((1, 300, 64), np.float32)), "pass prompt or prompt_embeds"),
    (dict(prompt=None, prompt_embeds=np.zeros((1, 300, 64), np.float32)), "prompt_attention_mask must be given"),
    (dict(prompt=None, prompt_embeds=np.zeros((2, 300, 64), np.float32), prompt_attention_mask=np.ones((2, 300)),
          negative_prompt_embeds=np.zeros((1, 300, 64), np.float32), negative_prompt_attention_mask=np.ones((1, 300))),
     "negative_prompt_embeds has batch size 1"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries for 1 prompts"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs may hold latents"),
    (dict(timesteps=[999, 500], sampler="sa"), "sampler .sa. cannot take custom timesteps"),
    (dict(sigmas=[1.0, 0.5]), "not sigmas"),
    (dict(generator=[1, 2]), "generator has 2 entries for 1 images"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), "latents must have shape"),
])
def test_check_inputs_name_the_argument(sigma_folder, kwargs, message):
    _, pipe = sigma_folder
    prompt = kwargs.pop("prompt", PROMPTS[0])
    with pytest.raises(ValueError, match=message):
        pipe(prompt, height=128, width=128, num_inference_steps=2, use_resolution_binning=False, progress=False,
             **kwargs)


def _config(scheduler, **changes) -> dict:
    """What diffusers writes to scheduler_config.json."""
    return dict(scheduler.config, _class_name=type(scheduler).__name__, **changes)


def test_scheduler_configs_refuse_what_they_cannot_reproduce():
    assert sampler_from_config(_config(_scheduler())) == "dpm"
    assert sampler_from_config(_config(_scheduler("DDIMScheduler"))) == "ddim"
    assert sampler_from_config(_config(_scheduler("SASolverScheduler"))) == "sa"
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        sampler_from_config(_config(_scheduler(), use_karras_sigmas=True))
    # DDIM built from the DPM config, as users often do, clips the predicted latents (its default): named
    with pytest.raises(ValueError, match="clip_sample=True"):
        sampler_from_config(_config(diffusers.DDIMScheduler.from_config(_scheduler().config)))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        sampler_from_config({"_class_name": "EulerDiscreteScheduler"})


def test_import_pixart_is_cheap_and_exports_diffusers_names():
    import subprocess
    import sys
    code = ("import sys, pixart; assert 'mindspore' not in sys.modules; "
            "from pixart import (PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtPipeline, PixArtTransformer2DModel, "
            "AutoencoderKL, T5EncoderModel); assert issubclass(PixArtSigmaPipeline, PixArtPipeline)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_id_loads_from_the_local_cache_only(sigma_folder, tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the local Hugging Face cache; one not there is a one-line error."""
    import shutil
    import huggingface_hub.constants
    folder, pipe = sigma_folder
    repo = tmp_path / "models--PixArt-test--tiny-sigma"
    shutil.copytree(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    net = pixart.PixArtTransformer2DModel.from_pretrained("PixArt-test/tiny-sigma", subfolder="transformer")
    assert net.config == pipe.transformer.config
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        pixart.PixArtSigmaPipeline.from_pretrained("PixArt-test/absent")


# -- few-step sampling against diffusers: PixArt-LCM (LCMScheduler, guidance 0) and DMD's one step (timesteps=[400]) --
def _alpha_pair(diffusers_bundle, scheduler):
    preset = "PixArt-XL-2-1024-MS"
    ref = diffusers.PixArtAlphaPipeline(tokenizer=diffusers_bundle["tokenizer"], text_encoder=diffusers_bundle["t5"],
                                        vae=diffusers_bundle["vae"]["alpha"],
                                        transformer=diffusers_bundle["transformer"][preset], scheduler=scheduler)
    ref.set_progress_bar_config(disable=True)
    return ref, _ours(diffusers_bundle, preset)


@pytest.mark.slow
def test_lcm_and_one_step_timesteps_match_diffusers(diffusers_bundle, monkeypatch, tmp_path):
    """PixArt-LCM as its model card runs it (LCMScheduler, 4 steps, guidance 0; the re-injected noise drawn from the
    same NumPy generator on both sides), then PixArt-α-DMD's one step (timesteps=[400], guidance 1) as the official
    app runs it in diffusers: a DDPMScheduler, whose predicted x_0 diffusers' pipeline returns after a single step.
    Images within 1/255 on 99% of pixels. The LCM pipeline
    also goes through save_pretrained / from_pretrained: the LCMScheduler config selects our lcm sampler."""
    import diffusers.schedulers.scheduling_lcm as lcm_module
    betas = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    height = width = 128
    latents = np.random.default_rng(0).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)
    kw = dict(negative_prompt="", height=height, width=width, output_type="np", use_resolution_binning=False,
              max_sequence_length=120)

    noise = np.random.default_rng(7 + 1)  # what our pipeline gives the sampler for generator=7
    monkeypatch.setattr(lcm_module, "randn_tensor",
                        lambda shape, **_: torch.from_numpy(noise.standard_normal(shape, dtype=np.float32)))
    ref_pipe, ours = _alpha_pair(diffusers_bundle, diffusers.LCMScheduler(**betas, original_inference_steps=50))
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=0.0, latents=torch.from_numpy(latents),
                       **kw).images
    ref_pipe.save_pretrained(tmp_path / "lcm")
    loaded = pixart.PixArtPipeline.from_pretrained(tmp_path / "lcm")
    assert loaded.sampler == "lcm"
    out = loaded(PROMPTS[0], num_inference_steps=4, guidance_scale=0.0, latents=latents, generator=7,
                 progress=False, **kw)
    _assert_close(out.images, ref, "lcm 4 steps, guidance 0")

    ref_pipe.scheduler = diffusers.DDPMScheduler(**betas, clip_sample=False)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[0], timesteps=[400], guidance_scale=1.0, latents=torch.from_numpy(latents),
                       **kw).images
    out = ours(PROMPTS[0], timesteps=[400], guidance_scale=1.0, latents=latents, sampler="dpm", progress=False, **kw)
    _assert_close(out.images, ref, "one step at 400 vs DDPMScheduler")
