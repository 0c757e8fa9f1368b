"""Train the demo bundle's VAE and transformer from scratch on the synthetic demo world, and write the weights that
ship in pixart/demo_weights/ (then `python tools/make_demo_bundle.py --force` builds the bundle from them).

    python tools/train_demo_world.py [--work outputs/demo_world] [--out pixart/demo_weights] [--chunk_minutes M]

Stages, all with this project's code, on the CPU:
  1. the world: every scene (pixart.demo_world) at both aspect ratios, `--per_scene` images each, with captions;
  2. the VAE (SDXL layout, pixart.demo_bundle.VAE_CONFIG): `--vae_steps` of reconstruction + KL on random crops;
     its PSNR on held-out world images is printed; the latent scaling factor is 1 / the latents' std; resumable
     (`--chunk_minutes`: the same command continues it);
  3. the feature cache: tools/extract_features.py (the random tiny T5 encodes the captions, the VAE the images);
  4. the transformer: train.py runs in turn (PHASES: aspect-ratio buckets, EMA, then offset noise and a timestep
     bias), each continuing its newest checkpoint if it stopped; the last run's EMA weights are exported;
  5. the score: the bundle built from the new weights samples the 16 probe captions, and the attributes found in
     the pixels are counted (the figure tests/test_demo_world.py asserts).
The timings on 2 cores are in docs/demo.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from PIL import Image, ImageDraw

from pixart import backend, demo_bundle, demo_world
from pixart.cli import main as cli_main
from pixart.cli.options import ArgumentParser
from pixart.cli.sample import build_parser as sample_parser
from pixart.io import load_into, read_ckpt, read_safetensors, read_safetensors_metadata, write_safetensors
from pixart.models.vae import AutoencoderKL, VAEConfig
from pixart.training.autoencoder import psnr, to_model, train_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="outputs/demo_world", help="scratch folder (data, cache, runs)")
    p.add_argument("--out", default=str(demo_bundle.WEIGHTS), help="where the trained weights go")
    p.add_argument("--per_scene", type=int, default=3, help="training images per scene and aspect ratio")
    p.add_argument("--vae_steps", type=int, default=1400)
    p.add_argument("--chunk_minutes", type=float, default=None, help="stop the VAE stage after this long; the same "
                   "command continues it (train.py's stage continues from its newest checkpoint in the same way)")
    p.add_argument("--vae_crop", type=int, default=48, help="VAE training windows (pixels, a multiple of 8)")
    p.add_argument("--batch_size", type=int, default=16, help="transformer training batch (each run of PHASES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=["vae", "transformer", "score", "docs"],
                   choices=["vae", "transformer", "export", "score", "docs"], help="run only these (the later ones "
                   "read the earlier ones' results from --work and --out); export: the newest checkpoint's EMA "
                   "weights of the last run (the transformer stage ends with it); docs: the sample grid of "
                   "docs/demo.md and the README's picture")
    p.add_argument("--docs", default="docs", help="where the docs stage writes its PNGs")
    return p


def _run(*args) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(r.returncode)


def _world_images(work: Path) -> list[np.ndarray]:
    labels = json.loads((work / "world" / "labels.json").read_text())
    return [np.asarray(Image.open(work / "world" / "images" / x["path"]).convert("RGB")) for x in labels]


def train_vae(args, work: Path, out: Path) -> bool:
    """The VAE from scratch; resumable: a run stopped by --chunk_minutes continues from work/vae_state.safetensors.
    Returns whether it finished (then out/vae.safetensors is written)."""
    # PyNative: in graph mode (MindSpore 2.7.1, CPU) this training step stalls for minutes after a dozen steps
    backend.setup("CPU", "pynative")
    images = _world_images(work)
    vae = AutoencoderKL(VAEConfig.from_dict(demo_bundle.VAE_CONFIG))
    state = demo_bundle.random_vae_state()
    # the posterior starts narrow (log-variance -6): the decoder sees the encoder's signal from the first step, not
    # unit noise that the encoder would first have to learn to shrink
    state["quant_conv.bias"][vae.latent_channels:] = -6.0
    load_into(vae, state, "VAE")
    t0 = time.time()
    done = train_autoencoder(vae, images, args.vae_steps, batch_size=8, crop=args.vae_crop, learning_rate=1e-3,
                             seed=args.seed, log_every=25, state_file=work / "vae_state.safetensors",
                             stop_after=args.chunk_minutes * 60 if args.chunk_minutes else None)
    vae.set_train(False)
    held_out = demo_world.random_images(8, seed=10_000 + args.seed)
    print(f"VAE at step {done}/{args.vae_steps} ({time.time() - t0:.0f} s this run); PSNR on 8 held-out world "
          f"images: {psnr(vae, held_out):.2f} dB")
    if done < args.vae_steps:
        print("the VAE is not finished: run the same command again to continue")
        return False
    stds = [vae.encode(ms.Tensor(to_model(im[None])))[0].asnumpy().ravel() for im in images[::4]]
    scale = float(1.0 / np.concatenate(stds).std())
    state = {p.name: p.asnumpy() for p in vae.get_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "vae.safetensors", {"format": "pt", "scaling_factor": repr(scale)})
    print(f"wrote {out / 'vae.safetensors'} (latent scaling factor {scale:.4f})")
    return True


# The transformer's recipe: train.py runs in turn, each fine-tuning the EMA weights of the one before (a fresh
# optimizer). The first learns the world. The caption decides the background and the shape's colour and side only
# at high noise, where the noise-prediction loss weighs the clean image least, so the first run barely follows its
# captions; the next ones train with offset noise (the overall colour is then noise until the caption says it),
# the first of them drawing the noisiest 40% of the timesteps 5x as often. docs/demo.md gives each run's score.
PHASES = (
    dict(run="run", steps=2500, learning_rate=2e-3, ema_rate=0.995, warmup_steps=100, seed=0, extra=()),
    dict(run="run_high_noise", steps=1000, learning_rate=1e-3, ema_rate=0.99, warmup_steps=50, seed=1,
         extra=("--noise_offset", 0.1, "--timestep_bias_strategy", "later", "--timestep_bias_portion", 0.4,
                "--timestep_bias_multiplier", 5)),
    dict(run="run_offset", steps=1500, learning_rate=1e-3, ema_rate=0.99, warmup_steps=50, seed=1,
         extra=("--noise_offset", 0.1)),
    dict(run="run_offset_2", steps=2000, learning_rate=1e-3, ema_rate=0.99, warmup_steps=50, seed=2,
         extra=("--noise_offset", 0.1)),
)


def train_transformer(args, work: Path, out: Path) -> None:
    """The feature cache, then train.py's runs (PHASES) on it, with the new VAE and the bundle's tokenizer and T5.
    A run that stopped continues from its newest checkpoint; a finished one is not run again."""
    comp = work / "bundle" / demo_bundle.COMPONENTS
    scale = float(read_safetensors_metadata(out / "vae.safetensors")["scaling_factor"])
    demo_bundle.write_vae(comp / "vae", read_safetensors(out / "vae.safetensors"), scale)
    encoders = ["--vae_root", comp / "vae", "--text_encoder_root", comp / "text_encoder",
                "--tokenizer_root", comp / "tokenizer"]
    data = work / "world"
    cache = work / "cache"
    t0 = time.time()
    _run("tools/extract_features.py", "--json_path", data / "labels.json", "--image_dir", data / "images",
         "--output_dir", cache, "--resolution", 256, "--max_length", 300, "--captions", "prompt", *encoders)
    print(f"feature cache in {time.time() - t0:.0f} s")
    shrink = demo_bundle.PIXART_SHRINK
    start = []
    for phase in PHASES:
        run = work / phase["run"]
        t0 = time.time()
        if not (run / "checkpoints" / f"step_{phase['steps']:08d}").exists():
            resume = ["--resume", "latest"] if list((run / "checkpoints").glob("step_*")) else []  # exact resume
            _run("train.py", "--model", demo_bundle.PRESET, "--multi_scale", "true", "--depth", shrink["depth"],
                 "--hidden_size", shrink["hidden_size"], "--num_heads", shrink["num_heads"],
                 "--json_path", data / "labels.json", "--feature_dir", cache, "--batch_size", args.batch_size,
                 "--learning_rate", phase["learning_rate"], "--warmup_steps", phase["warmup_steps"],
                 "--sample_posterior", "false", "--sd_scale_factor", scale, "--use_ema", "true",
                 "--ema_rate", phase["ema_rate"], "--seed", args.seed + phase["seed"], "--max_steps", phase["steps"],
                 "--save_every", 500, "--keep_last", 2, "--log_every", 100, "--output_dir", run, "--mode", "graph",
                 *start, *phase["extra"], *resume)
            print(f"{phase['run']}: {phase['steps']} steps in {time.time() - t0:.0f} s")
        if phase is not PHASES[-1]:  # the next run starts from these weights; the last run's go to `out`
            start = ["--load_from", export_run(run, run / "transformer.safetensors")]
    export(args, work, out)


def export_run(run: Path, target: Path) -> Path:
    """The EMA weights of the newest checkpoint of the train.py run in `run` -> `target` (.safetensors)."""
    found = sorted((run / "checkpoints").glob("step_*"))
    if not found:
        raise SystemExit(f"error: no checkpoint in {run / 'checkpoints'}: run the transformer stage first")
    write_safetensors(read_ckpt(found[-1] / "ema.ckpt"), target, {"format": "pt"})
    return target


def export(args, work: Path, out: Path) -> None:
    """The last run's EMA weights (its newest checkpoint) -> out/transformer.safetensors."""
    export_run(work / PHASES[-1]["run"], out / "transformer.safetensors")
    print(f"wrote {out / 'transformer.safetensors'} (the EMA weights of {PHASES[-1]['run']})")


def _trained_bundle(work: Path, out: Path) -> Path:
    """The bundle built from the weights in `out` (under --work)."""
    backend.setup("CPU", "graph")
    demo_bundle.WEIGHTS, demo_bundle.VAE_WEIGHTS = out, out / "vae.safetensors"
    demo_bundle.TRANSFORMER_WEIGHTS = out / "transformer.safetensors"
    return demo_bundle.build(work / "trained")


def score(args, work: Path, out: Path) -> None:
    """Sample the 16 probe captions and count the attributes found in the pixels."""
    fraction, _ = demo_bundle.evaluate(_trained_bundle(work, out))
    print(f"attributes present in the samples of the 16 probe captions: {fraction:.1%}")


def docs(args, work: Path, out: Path, seeds: int = 4, thumb: int = 96) -> None:
    """docs/demo_grid.png (one row per example prompt, one column per seed, square images shown at `thumb` px,
    the caption on the left) and docs/demo_readme.png (what the README's first command draws: the default prompt, seed 42)."""
    prompts = demo_bundle.EXAMPLE_PROMPTS
    cases = [(demo_world.Scene.parse(p), "1.0") for p in prompts for _ in range(seeds)]
    _, rows = demo_bundle.evaluate(_trained_bundle(work, out), cases, log=lambda *_: None)
    folder = Path(args.docs)
    folder.mkdir(parents=True, exist_ok=True)
    # the README's picture is what its first command draws: the default prompt at sample.py's default seed
    _, first = demo_bundle.evaluate(_trained_bundle(work, out), [(demo_world.Scene.parse(demo_bundle.DEFAULT_PROMPT),
                                                                  "1.0")], seed=sample_parser().get_default("seed"), log=lambda *_: None)
    Image.fromarray(first[0]["image"]).save(folder / "demo_readme.png", optimize=True)
    label = 300
    grid = Image.new("RGB", (label + seeds * thumb, len(prompts) * thumb), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    for i, prompt in enumerate(prompts):
        pen.text((6, i * thumb + thumb // 2 - 6), prompt, fill=(0, 0, 0))
        for j in range(seeds):
            image = Image.fromarray(rows[i * seeds + j]["image"]).resize((thumb, thumb), Image.LANCZOS)
            grid.paste(image, (label + j * thumb, i * thumb))
    grid.save(folder / "demo_grid.png", optimize=True)
    found = sum(r["score"] for r in rows) / (3 * len(rows))
    print(f"wrote {folder / 'demo_grid.png'} and {folder / 'demo_readme.png'}; attributes present: {found:.1%}")


def run(args) -> None:
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    t0 = time.time()
    if not (work / "world" / "labels.json").exists():
        demo_world.make_dataset(work / "world", args.per_scene, args.seed)
    if not (work / "bundle" / demo_bundle.CHECKPOINT).exists():
        demo_bundle.build(work / "bundle", trained=False)  # the tokenizer and the random T5
    for stage, fn in (("vae", train_vae), ("transformer", train_transformer), ("export", export), ("score", score),
                      ("docs", docs)):
        if stage in args.stages and fn(args, work, out) is False:
            break  # an unfinished stage: the same command continues it
    print(f"done in {(time.time() - t0) / 60:.1f} min")


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
