"""End to end: `sample.py` (ours, MindSpore) vs diffusers' PixArtAlphaPipeline (PyTorch) doing the same work: full
PixArt-XL/2 256 px, T5 at XXL width (`--t5_layers`, 24 for the real encoder), the SD VAE, 20 DPM-Solver++ steps,
guidance 4.5, random weights shared by both sides (one diffusers pipeline folder, written once; T5 as fp16
safetensors like the public checkpoint).

    python bench/bench_sample.py                        # writes /tmp/pixart-bench/alpha-256-t5x2 on first use
    python bench/bench_sample.py --runs 3 --images 2 --t5_layers 2
    python bench/bench_sample.py --t5_layers 24 --runs 1 --sides ours,torch_t5bf16,torch_bf16,ours_fp32,torch

Sides, each in a precision its users pick: `ours` (sample.py's defaults: on a CPU with AVX512_BF16 the transformer
and T5 in bf16, else fp32 and fp16-stored T5), `ours_fp32` (`--dtype fp32 --text_encoder_dtype fp32`), `torch` (all
fp32), `torch_t5bf16` (T5 in bf16, the rest fp32), `torch_bf16` (`torch_dtype=torch.bfloat16`: everything). Each
side's images are compared with its fp32 side's (ours with ours_fp32, diffusers with torch) where both ran: the
largest mean absolute difference per image, in 8-bit levels.

Each run is a fresh process per side, alternating; it loads the pipeline (timed apart) and generates `--images`
images from as many prompts (ours: `sample.py`'s own code path, `pixart.cli.sample.run`, in graph mode: T5
loaded alone, prompts encoded, T5 freed, then the transformer and VAE loaded, then denoise + decode + PNG per image;
diffusers: `pipe(prompt)` + PNG per image). Ours' load time is T5's plus the pipeline's; its encoding is counted in
the first image, as diffusers' is.
The table's time is the whole generation phase (encode + denoise + decode + save, every image, the first image's
graph compilation included for ours); the first image alone and the rest are listed below it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench_t5 import write_weights
from common import machine, parse_or_run_child, run_children, summary, table

PROMPTS = ["a small cactus with a happy face in the Sahara desert", "an old lighthouse on a rocky coast, storm",
           "a bowl of ramen, studio photo", "a watercolor fox in the snow"]
SIZE, STEPS, GUIDANCE = 256, 20, 4.5
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False)


def prepare(folder: Path, t5_layers: int) -> None:
    """A random-weight diffusers PixArt-α 256 pipeline folder (transformer, VAE, T5, tokenizer, scheduler); T5 written
    as fp16 shards a block at a time (`bench_t5.write_weights`: a 24-layer fp32 T5 would not fit in memory)."""
    if (folder / "model_index.json").exists():
        return
    import torch
    import diffusers
    import transformers
    from pixart.models.t5_tokenizer import make_tiny_tokenizer
    print(f"writing the benchmark pipeline to {folder} (once)", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(folder / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), num_layers=1, **T5_XXL))
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215, sample_size=256)
    net = diffusers.PixArtTransformer2DModel(
        num_layers=28, sample_size=SIZE // 8, caption_channels=4096, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
        num_embeds_ada_norm=1000, out_channels=8, use_additional_conditions=False)
    with torch.no_grad():  # diffusers zero-initialises the output layers; random ones give a real image's work
        for p in net.proj_out.parameters():
            p.normal_(0, 0.02)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000, solver_order=2,
        algorithm_type="dpmsolver++", prediction_type="epsilon")
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=net,
                                         scheduler=scheduler)
    pipe.save_pretrained(folder)
    for f in (folder / "text_encoder").iterdir():  # the real depth, fp16, as the public checkpoint
        f.unlink()
    shared = Path(f"/tmp/pixart-bench-t5-xxl-L{t5_layers}")  # bench_t5.py's weights of this depth, if written
    if (shared / "model.safetensors.index.json").exists():
        for f in shared.iterdir():  # linked, not copied: ~9.5 GB at 24 layers
            (folder / "text_encoder" / f.name).symlink_to(f)
    else:
        write_weights(folder / "text_encoder", t5_layers)


def folder_of(a) -> Path:
    return Path(a.folder or f"/tmp/pixart-bench/alpha-256-t5x{a.t5_layers}")


def child(side: str, a) -> dict:
    folder = folder_of(a)
    prompts = PROMPTS[:a.images]
    out_dir = Path(a.out) / side
    stamps = {}  # ours: when the pipeline finished loading
    if side.startswith("ours"):
        from pixart.cli.options import parse_args
        from pixart.cli.sample import build_parser, run
        argv = ["--model", "PixArt-XL-2-256x256", "--checkpoint", str(folder / "transformer"),
                "--vae_root", str(folder / "vae"), "--text_encoder_root", str(folder / "text_encoder"),
                "--tokenizer_root", str(folder / "tokenizer"), "--image_height", str(SIZE), "--image_width",
                str(SIZE), "--sampling_method", "dpm", "--sampling_steps", str(STEPS), "--guidance_scale",
                str(GUIDANCE), "--mode", a.mode, "--output_path", str(out_dir), "--progress", "false",
                "--prompt", *prompts]
        if side == "ours_fp32":
            argv += ["--dtype", "fp32", "--text_encoder_dtype", "fp32"]
        saved = []

        def log(msg, *_, **__):
            if str(msg).startswith("saved"):
                saved.append(time.perf_counter())

        t0 = time.perf_counter()
        args = parse_args(build_parser(), argv)
        import pixart.cli.sample as sr
        spans = {}

        def timed(name, fn, module):  # how long each call of module.fn takes, summed under `name`
            def wrapper(*x, **k):
                t1 = time.perf_counter()
                out = fn(*x, **k)
                spans[name] = spans.get(name, 0.0) + time.perf_counter() - t1
                stamps[name] = time.perf_counter()
                return out
            setattr(module, fn.__name__, wrapper)
        timed("t5_load", sr.load_t5, sr)  # the name sample.py's code calls
        timed("encode", sr.encode_first, sr)
        timed("loaded", sr.load_pipeline, sr)
        run(args, log=log)
        # T5 is loaded, run and freed before the transformer loads: loading = T5's + the pipeline's, and the
        # generation phase starts with the prompts' encoding (as diffusers' pipe(prompt) does)
        load_s = spans["t5_load"] + spans["loaded"]
        encode_s = spans["encode"] - spans["t5_load"]
        per_image = [encode_s + saved[0] - stamps["loaded"]] + [b - a_ for a_, b in zip(saved, saved[1:])]
    else:
        import torch
        from diffusers import PixArtAlphaPipeline
        if a.threads:
            torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        if side == "torch_t5bf16":
            from transformers import T5EncoderModel
            t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.bfloat16)
            pipe = PixArtAlphaPipeline.from_pretrained(str(folder), text_encoder=t5, torch_dtype=torch.float32)
        else:
            dtype = torch.bfloat16 if side == "torch_bf16" else torch.float32
            pipe = PixArtAlphaPipeline.from_pretrained(str(folder), torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        denoiser = PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=None, vae=pipe.vae,
                                       transformer=pipe.transformer, scheduler=pipe.scheduler)
        denoiser.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        out_dir.mkdir(parents=True, exist_ok=True)
        per_image = []
        for i, prompt in enumerate(prompts):
            t1 = time.perf_counter()
            with torch.no_grad():
                given, run_pipe = dict(prompt=prompt), pipe
                if side == "torch_t5bf16":  # the pipeline gives the transformer T5's dtype: embeddings cast to fp32
                    embeds, mask, neg, neg_mask = pipe.encode_prompt(prompt, clean_caption=False)
                    given = dict(negative_prompt=None, prompt_embeds=embeds.float(), prompt_attention_mask=mask,
                                 negative_prompt_embeds=neg.float(), negative_prompt_attention_mask=neg_mask)
                    run_pipe = denoiser  # without T5: its embeddings then keep the transformer's dtype
                image = run_pipe(**given, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                             generator=torch.Generator().manual_seed(42 + i), clean_caption=False).images[0]
            image.save(out_dir / f"{i:04d}.png")
            per_image.append(time.perf_counter() - t1)
    return dict(side=side, load_s=load_s, times=[sum(per_image)], per_image=per_image, first_s=per_image[0])


def image_difference(a: Path, b: Path, count: int) -> float:
    """The largest mean absolute difference, in 8-bit levels, between the first `count` PNGs (in name order) of two
    folders."""
    from PIL import Image
    pairs = zip(sorted(a.rglob("*.png"))[:count], sorted(b.rglob("*.png"))[:count])
    return max(float(np.abs(np.asarray(Image.open(x), np.float64) - np.asarray(Image.open(y), np.float64)).mean())
               for x, y in pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=None, help="the random-weight pipeline folder (written if missing)")
    p.add_argument("--t5_layers", type=int, default=2, help="T5-XXL-wide encoder depth (full: 24)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--images", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="ours: MindSpore mode")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="/tmp/pixart-bench/samples")
    a = parse_or_run_child(p, child)
    if a is None:
        return
    prepare(folder_of(a), a.t5_layers)
    forward = ["--folder", str(folder_of(a)), "--t5_layers", str(a.t5_layers), "--images", str(a.images),
               "--mode", a.mode, "--threads", str(a.threads), "--out", a.out]
    sides = tuple(a.sides.split(","))
    results = run_children(__file__, sides, a.runs, forward)
    rows = [(side, summary(results[side])) for side in sides]
    print()
    print(table(f"End to end, {a.images} image(s) of {SIZE} px, {STEPS} DPM-Solver++ steps, CFG 4.5, T5-XXL width "
                f"x {a.t5_layers} layers, SD VAE (ours: sample.py code path, {a.mode})", rows,
                ours=next((s for s in sides if s.startswith("ours")), "ours"),
                ref=next((s for s in sides if s.startswith("torch")), "torch"),
                first_header="first image s (ours: incl. compile)"))
    for side in sides:
        base = "ours_fp32" if side.startswith("ours") else "torch"
        if side != base and base in sides:
            print(f"{side} vs {base}: largest mean |difference| per image "
                  f"{image_difference(Path(a.out) / side, Path(a.out) / base, a.images):.2f} / 255")
    for side in sides:
        loads = [r["load_s"] for r in results[side]]
        rest = [t for r in results[side] for t in r["per_image"][1:]]
        print(f"{side}: load {min(loads):.1f}-{max(loads):.1f} s; later images "
              + (f"{min(rest):.1f}-{max(rest):.1f} s each" if rest else "-"))
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
