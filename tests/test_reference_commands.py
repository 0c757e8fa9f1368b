"""The sampling-side commands of the reference port's README (mindone `examples/pixart_sigma`), run as written.

Each runs as a subprocess in a fresh folder that holds a `models/` laid out as that README lays it out:
`models/PixArt-Sigma-XL-2-{512,1024,2K}-MS.ckpt` (reduced copies of each preset: random weights at width 72, depth 2,
so that the shipped `configs/inference/pixart-sigma-*-MS.yaml` load them), and `models/vae/`, `models/text_encoder/`,
`models/tokenizer/` (the demo bundle's). Only weight paths differ from the README, and the 1024 and 2K runs take 2 and
1 sampling steps instead of the config's 20 (the 512 ones take the 20), to keep the file to minutes on two cores: a
1024 / 2048 px image is 4096 / 16384 tokens, whose attention dominates a step at any model width.

A test per flag group then shows each reference flag changes what it should (batches, grid shape, KV compression,
the split across msrun ranks). The training commands are in tests/test_reference_training.py.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart import backend
from pixart import demo_bundle as demo
from pixart.models.convert import save_pixart
from pixart.models.pixart import PixArt, preset_config
from pixart.pipelines.outputs import read_png_settings
from tests.utils import stop

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
SIGMA = ("PixArt-Sigma-XL-2-512-MS", "PixArt-Sigma-XL-2-1024-MS", "PixArt-Sigma-XL-2-2K-MS")
REDUCED = dict(caption_channels=demo.T5_CONFIG["d_model"], depth=2, hidden_size=72, num_heads=1)


def reduced_state(name: str, seed: int = 0, **overrides):
    cfg = preset_config(name, **{**REDUCED, **overrides})
    net = PixArt(cfg)
    net.initialize_weights(seed)
    rng = np.random.default_rng(seed)  # the initialisation zeroes the output layer: make every weight matter
    state = {p.name: p.asnumpy() for p in net.get_parameters()}
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        state[key] = (rng.standard_normal(state[key].shape) * 0.02).astype(np.float32)
    return state, cfg


@pytest.fixture(scope="module")
def models(bundle, tmp_path_factory) -> Path:
    """A models/ folder in the reference README's layout."""
    root = tmp_path_factory.mktemp("reference") / "models"
    root.mkdir()
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(bundle.components / part, root / part)
    vae_config = root / "vae" / "config.json"  # the SDXL VAE's training size: 2K images decode in 128-latent tiles
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "sample_size": 1024}))
    if backend.device_target() != "CPU":
        backend.setup("CPU")
    for name in SIGMA:
        state, cfg = reduced_state(name)
        save_pixart(state, cfg, root / f"{name}.ckpt", name)
    return root


def workdir(models: Path, tmp_path: Path, name: str = "work") -> Path:
    work = tmp_path / name
    work.mkdir()
    (work / "models").symlink_to(models, target_is_directory=True)
    return work


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}


def command(line: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a README command line as written: `python X.py ...` with X.py this checkout's script (the folder of the
    run holds only models/ and data, so the -c paths are found through the script's folder, as the reference does)."""
    argv = shlex.split(line)
    assert argv[0] == "python"
    argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    t0 = time.time()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=environment(), timeout=timeout)
    print(f"{time.time() - t0:5.0f}s  {line}")
    assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("grid"))


# ----------------------------------------------------------------------------------------------------------------
# The README's commands
# ----------------------------------------------------------------------------------------------------------------
def test_sample_512(models, tmp_path):
    work = workdir(models, tmp_path)
    command('python sample.py -c configs/inference/pixart-sigma-512-MS.yaml --prompt "your magic prompt"', work)
    (png,) = images(work / "samples")
    assert Image.open(png).size == (512, 512)
    s = read_png_settings(png)
    assert (s["prompt"], s["model"], s["steps"], s["seed"]) == ("your magic prompt", SIGMA[0], 20, 42)
    assert [r["prompt"] for r in json.loads((work / "samples" / "prompts.json").read_text())] == ["your magic prompt"]


def test_sample_with_own_checkpoint(models, tmp_path):
    work = workdir(models, tmp_path)
    mine = work / "path_to_your_checkpoint_file.ckpt"  # a checkpoint train.py wrote
    state, cfg = reduced_state(SIGMA[0], seed=5)
    save_pixart(state, cfg, mine, SIGMA[0])
    command('python sample.py -c configs/inference/pixart-sigma-512-MS.yaml --prompt "your magic prompt" '
            f'--checkpoint {mine.name}', work)
    (png,) = images(work / "samples")
    assert read_png_settings(png)["checkpoint"] == mine.name


@pytest.mark.parametrize("line,size,seed", [
    ('python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "your magic prompt" --image_width 1024 '
     '--image_height 512', (1024, 512), 42),
    ('python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --image_width 1024 --image_height 512 --seed 1024 '
     '--prompt "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"', (1024, 512), 1024),
])
def test_sample_1024_with_aspect_ratio(models, tmp_path, line, size, seed):
    work = workdir(models, tmp_path)
    command(line + " --sampling_steps 2", work)  # see the module docstring
    (png,) = images(work / "samples")
    assert Image.open(png).size == size  # width x height
    s = read_png_settings(png)
    assert (s["model"], s["seed"], s["width"], s["height"]) == (SIGMA[1], seed, *size)


@pytest.mark.parametrize("line,size", [
    ('python sample.py -c configs/inference/pixart-sigma-2K-MS.yaml --prompt "your magic prompt"', (2048, 2048)),
    ('python sample.py -c configs/inference/pixart-sigma-2K-MS.yaml --prompt "your magic prompt" --image_width 2048 '
     '--image_height 1024', (2048, 1024)),
])
def test_sample_2k(models, tmp_path, line, size):
    work = workdir(models, tmp_path)
    command(line + " --sampling_steps 1", work)  # see the module docstring
    (png,) = images(work / "samples")
    assert Image.open(png).size == size
    assert read_png_settings(png)["model"] == SIGMA[2]


PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow star", "a white cloud"]


def test_prompt_file_in_batches_of_4(models, tmp_path):
    work = workdir(models, tmp_path)
    (work / "path_to_yout_text_file").write_text("\n".join(PROMPTS) + "\n")
    r = command("python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt_path path_to_yout_text_file "
                "--batch_size 4 --sampling_steps 2", work)  # steps: see the module docstring
    pngs = images(work / "samples")
    assert [read_png_settings(p)["prompt"] for p in pngs] == PROMPTS  # one image of each, the config's prompt not used
    assert all(Image.open(p).size == (1024, 1024) for p in pngs)
    assert "prompts read from path_to_yout_text_file" in r.stdout + r.stderr
    records = json.loads((work / "samples" / "prompts.json").read_text())
    assert [rec["file"] for rec in records] == [p.name for p in pngs]


def test_sample_py_help_lists_reference_flags():
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "-h"], capture_output=True, text=True,
                       env=environment(), cwd=ROOT)
    assert r.returncode == 0
    for flag in ("--sample_size", "--use_resolution_binning", "--t5_max_length", "--negative_prompt", "--batch_size",
                 "--num_trials", "--num_images_per_prompt", "--imagegrid", "--nrows", "--ncols", "--use_parallel",
                 "--mode", "--jit_level", "--dtype", "--enable_flash_attention", "--kv_compress",
                 "--kv_compress_sampling", "--kv_compress_scale_factor", "--kv_compress_layer", "--sd_scale_factor",
                 "--device_target", "--checkpoint", "--vae_root", "--text_encoder_root", "--tokenizer_root"):
        assert flag in r.stdout, flag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_command_serves_and_answers_one_request(models, tmp_path):
    """The README's gradio command (on CPU: one warning for flash attention), on a free port instead of 7788 so
    that a demo running on this machine is not disturbed; one request through gradio's own client."""
    from gradio_client import Client
    work = workdir(models, tmp_path)
    port = free_port()
    line = ('python gradio_demo.py --image_height 1024 --image_width 1024 --sample_size 128 '
            '--checkpoint "models/PixArt-Sigma-XL-2-1024-MS.ckpt" --vae_root "models/vae" '
            '--text_encoder_root "models/text_encoder" --tokenizer_root "models/tokenizer" --sd_scale_factor 0.13025 '
            f'--enable_flash_attention True --dtype "fp16" --port {port}')
    argv = shlex.split(line)
    log_path = tmp_path / "server.log"
    env = {**environment(), "GRADIO_TEMP_DIR": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while f"serving on http://127.0.0.1:{port}" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() - t0 < 300, log_path.read_text()[-3000:]
            time.sleep(1)
        time.sleep(2)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict("a red square", "", "dpm", 2, 4.5, 3, False, 1024, 1024, 1, True, 1.0,
                                api_name="/generate")
        paths, status = result[1], result[-1]
        assert len(paths) == 1 and "1024x1024" in status, status
        with Image.open(paths[0]["path"] if isinstance(paths[0], dict) else paths[0]) as im:
            assert im.size == (1024, 1024)
        text = log_path.read_text()
        warnings = [l for l in text.splitlines() if l.startswith("warning:")]
        assert warnings == ["warning: running on CPU: flash attention off (Ascend only)"], text[-2000:]
    finally:
        stop(proc, timeout=30)


def test_lora_inference_command(bundle, tmp_path):
    """The README's LoRA inference command: the base model id is found as models/PixArt-XL-2-512x512 (a diffusers
    pipeline folder: this port reads no hub), the LoRA in the peft adapter folder training writes."""
    pytest.importorskip("diffusers")
    from pixart.models.lora import initialize_lora, inject_lora, save_lora
    from tests.utils import diffusers_model
    work = tmp_path / "work"
    folder = work / "models" / "PixArt-XL-2-512x512"
    diffusers_model(dict(sample_size=64, interpolation_scale=1, use_additional_conditions=False), heads=1,
                    caption_channels=REDUCED["caption_channels"]).save_pretrained(folder / "transformer")
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(bundle.components / part, folder / part)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    if backend.device_target() != "CPU":
        backend.setup("CPU")
    net = PixArt(preset_config("PixArt-XL-2-512x512", **REDUCED))
    params = inject_lora(net, rank=4)
    initialize_lora(params, seed=1)
    for p in params:  # B is zero after initialisation: make the LoRA change the image
        if "lora_B" in p.name:
            p.set_data(p + 0.05)
    save_lora(net, work / "output" / "pixart-pokemon-model" / "lora_checkpoint_path")
    command('python pixart/lora-finetuning/inference_pixart_lora.py --model_id="PixArt-alpha/PixArt-XL-2-512x512" '
            '--lora_path="output/pixart-pokemon-model/lora_checkpoint_path" '
            '--prompt="A grass-type Pokemon in a forest, highly detailed" --output_path="./generated_pokemon.png"', work)
    s = read_png_settings(work / "generated_pokemon.png")
    assert (s["model"], s["prompt"]) == ("PixArt-XL-2-512x512", "A grass-type Pokemon in a forest, highly detailed")
    assert Image.open(work / "generated_pokemon.png").size == (512, 512)


# ----------------------------------------------------------------------------------------------------------------
# msrun: the prompts split across ranks
# ----------------------------------------------------------------------------------------------------------------
def test_msrun_sampling_splits_prompts_across_two_workers(models, tmp_path):
    if shutil.which("msrun", path=environment()["PATH"]) is None:
        pytest.skip("no msrun on PATH")
    work = workdir(models, tmp_path)
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--log_dir=log",
            "--join=True", str(ROOT / "sample.py"), "-c", "configs/inference/pixart-sigma-512-MS.yaml",
            "--prompt_path", "prompts.txt", "--use_parallel", "True", "--sampling_steps", "2"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=work, env=environment(), timeout=900)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((work / "log").glob("worker_*.log")))
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n{logs}"
    pngs = images(work / "samples")
    assert [read_png_settings(p)["prompt"] for p in pngs] == PROMPTS  # every prompt once, no file twice
    records = json.loads((work / "samples" / "prompts.json").read_text())
    assert [rec["file"] for rec in records] == [p.name for p in pngs]
    saved = {k: [line.split()[-1] for line in (work / "log" / f"worker_{k}.log").read_text().splitlines()
                 if line.startswith("saved ")] for k in range(2)}
    assert saved[0] and saved[1] and not set(saved[0]) & set(saved[1])  # both ranks worked, on different prompts
    assert sorted(Path(p).name for p in saved[0] + saved[1]) == [p.name for p in pngs]


# ----------------------------------------------------------------------------------------------------------------
# Each flag group changes what it should (demo bundle, in-process parsing where enough)
# ----------------------------------------------------------------------------------------------------------------
def demo_sample(bundle, out: Path, *args) -> subprocess.CompletedProcess:
    """sample.py on the demo bundle, 2 steps at 64 px, in PyNative mode: a graph compile would cost more than the
    sampling, and these tests are about flags (graph-mode sampling: tests/test_sample.py, tests/test_exit.py)."""
    argv = [sys.executable, str(ROOT / "sample.py"), "-c", str(ROOT / "configs/inference/demo.yaml"), *bundle.flags,
            "--progress", "false", "--sampling_steps", "2", "--image_height", "64", "--image_width", "64",
            "--resolution_binning", "false", "--mode", "pynative", "--output_path", str(out), *map(str, args)]
    r = subprocess.run(argv, capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_batch_size_batches_prompts_and_grid_shape(bundle, tmp_path):
    """--batch_size 2 over 3 prompts: two pipeline calls (2 + 1 prompts), --num_trials 2 runs each twice; the grid
    has a row per trial of each batch and a column per prompt of a batch (the older --nrows / --ncols spelling gives
    the same); each image is the same whatever the batching (its seed is its index in the run)."""
    out = tmp_path / "batched"
    demo_sample(bundle, out, "--prompt", "a", "b", "c", "--batch_size", 2, "--num_trials", 2, "--imagegrid", "true",
                "--negative_prompt", "x", "y", "z")
    pngs = images(out)
    got = [(s["prompt"], s["negative_prompt"], s["trial"], s["seed"]) for s in map(read_png_settings, pngs)]
    assert got == [("a", "x", 0, 42), ("b", "y", 0, 43), ("c", "z", 0, 44),
                   ("a", "x", 1, 45), ("b", "y", 1, 46), ("c", "z", 1, 47)]
    assert Image.open(out / "grid.png").size == (2 * 64, 4 * 64)  # rows: 2 trials x 2 batches; columns: 2 prompts
    old = tmp_path / "nrows"
    demo_sample(bundle, old, "--prompt", "a", "b", "c", "--ncols", 2, "--nrows", 2, "--imagegrid", "true",
                "--negative_prompt", "x", "y", "z")
    assert [p.name for p in images(old)] == [p.name for p in pngs]
    assert np.array_equal(np.asarray(Image.open(old / "grid.png")), np.asarray(Image.open(out / "grid.png")))
    single = tmp_path / "single"
    demo_sample(bundle, single, "--prompt", "a", "b", "c", "--num_trials", 2, "--negative_prompt", "x", "y", "z")
    for a, b in zip(images(single), pngs):
        diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max()
        assert diff <= 2, (a.name, diff)  # batched or not: the same image (float rounding only)


def test_kv_compress_alone_compresses(bundle, tmp_path):
    """--kv_compress true alone compresses the second half of the blocks 2x (Σ's KV models' layout): the image
    changes; ave needs no weights, so the demo model runs it."""
    base, kv = tmp_path / "base", tmp_path / "kv"
    demo_sample(bundle, base, "--prompt", "a")
    demo_sample(bundle, kv, "--prompt", "a", "--kv_compress", "true", "--kv_compress_sampling", "ave")
    (a,), (b,) = images(base), images(kv)
    assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() > 0


def test_kv_compress_config_defaults():
    from pixart.cli.options import kv_compress_config, parse_args
    from pixart.cli.sample import build_parser
    args = parse_args(build_parser(), ["--kv_compress", "true"])
    assert kv_compress_config(args) == {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": []}
    assert kv_compress_config(args, 28)["kv_compress_layer"] == list(range(14, 28))
    args = parse_args(build_parser(), ["--kv_compress", "true", "--kv_compress_scale_factor", "4",
                                       "--kv_compress_layer", "1", "2"])
    assert kv_compress_config(args, 28) == {"sampling": "conv", "scale_factor": 4, "kv_compress_layer": [1, 2]}
    assert kv_compress_config(parse_args(build_parser(), [])) is None
