"""T5 v1.1 XXL text encoding: ours (MindSpore, `load_t5` + the CPU kernels) vs transformers' T5EncoderModel
(PyTorch), each in the precision its users pick, against an fp32 reference; random weights of the real width.

    python bench/bench_t5.py                         # 24 layers, 120- and 300-token prompts, 2 runs per side
    python bench/bench_t5.py --layers 4 --runs 3     # a quicker, smaller stack of the same width
    python bench/bench_t5.py --sides ours,torch,ours_fp16

The weights are written once as fp16 safetensors like the public checkpoint (`--folder`, default under /tmp: ~9.5 GB
at 24 layers, one shard per layer), then every side loads that folder as a user's run does. Sides: `ours`
(`--text_encoder_dtype bf16`: Linear weights in bf16 through the CPU bf16 GEMM, the rest fp32; needs AVX512_BF16),
`ours_fp16` (fp16 storage computed in fp32: the configs' choice where the CPU lacks bf16), `ours_fp32`, `torch`
(`T5EncoderModel.from_pretrained(dtype=torch.bfloat16)`), `torch_fp32`. Each child encodes each prompt once (the
first call) and then `--steps` more times (timed); its output goes to a file, and the parent reports the largest
difference from the fp32 reference (`ref`: transformers' T5 blocks in fp32, built and run one block at a time so
that 24 fp32 layers never sit in memory at once), relative to the reference's largest magnitude. Peak RSS includes
loading (the weights are the memory). Run one process at a time on a shared machine (`flock`): a side at 24 layers
holds ~10 GB.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import machine, parse_or_run_child, run_children, summary, table

XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
           relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
           model_type="t5", is_encoder_decoder=True, tie_word_embeddings=False, dense_act_fn="gelu_new",
           is_gated_act=True, architectures=["T5EncoderModel"])


def folder_for(a) -> Path:
    return Path(a.folder or f"/tmp/pixart-bench-t5-xxl-L{a.layers}")


def write_weights(folder: Path, layers: int, seed: int = 0) -> None:
    """Random T5 v1.1 XXL-width encoder weights as fp16 safetensors, one shard per block (with the embedding and the
    final norm in the first and last), HF's sharded layout; T5's init scales keep activations in range."""
    from pixart.io import write_safetensors
    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    d, f, inner = XXL["d_model"], XXL["d_ff"], XXL["num_heads"] * XXL["d_kv"]

    def normal(shape, std):
        return (g.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    index = {}
    for i in range(layers):
        p = f"encoder.block.{i}.layer."
        shard = {p + "0.SelfAttention.q.weight": normal((inner, d), (d * XXL["d_kv"]) ** -0.5),
                 p + "0.SelfAttention.k.weight": normal((inner, d), d ** -0.5),
                 p + "0.SelfAttention.v.weight": normal((inner, d), d ** -0.5),
                 p + "0.SelfAttention.o.weight": normal((d, inner), inner ** -0.5),
                 p + "0.layer_norm.weight": np.ones(d, np.float16),
                 p + "1.DenseReluDense.wi_0.weight": normal((f, d), d ** -0.5),
                 p + "1.DenseReluDense.wi_1.weight": normal((f, d), d ** -0.5),
                 p + "1.DenseReluDense.wo.weight": normal((d, f), f ** -0.5),
                 p + "1.layer_norm.weight": np.ones(d, np.float16)}
        if i == 0:
            shard["shared.weight"] = normal((XXL["vocab_size"], d), 1.0)
            shard[p + "0.SelfAttention.relative_attention_bias.weight"] = normal(
                (XXL["relative_attention_num_buckets"], XXL["num_heads"]), 1.0)
        if i == layers - 1:
            shard["encoder.final_layer_norm.weight"] = np.ones(d, np.float16)
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        write_safetensors(shard, folder / name)
        index.update(dict.fromkeys(shard, name))
    (folder / "config.json").write_text(json.dumps({**XXL, "num_layers": layers, "torch_dtype": "float16"}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def prompt(tokens: int, seed: int = 0) -> np.ndarray:
    """(1, tokens) ids as a tokenizer gives them: words, then </s> (id 1)."""
    ids = np.random.default_rng(seed + tokens).integers(3, XXL["vocab_size"], (1, tokens)).astype(np.int32)
    ids[0, -1] = 1
    return ids


def reference(folder: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' T5 encoder in fp32, one block built, loaded, run and freed at a time."""
    import torch
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm
    from pixart.io import read_state_dict
    cfg = T5Config(**{k: v for k, v in json.loads((folder / "config.json").read_text()).items()})
    state = read_state_dict(folder)  # maps of the file: nothing is read until used

    def load(module, prefix):
        module.load_state_dict({k[len(prefix):]: torch.from_numpy(np.asarray(v, np.float32))
                                for k, v in state.items() if k.startswith(prefix)})
        return module.eval()

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(state["shared.weight"], np.float32)[ids[0]])[None]
        bias = None
        for i in range(cfg.num_layers):
            block = load(T5Block(cfg, has_relative_attention_bias=i == 0), f"encoder.block.{i}.")
            x, bias, _ = block(x, attention_mask=None, position_bias=bias)
            del block
        norm = load(T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon), "encoder.final_layer_norm.")
        return norm(x).numpy()


def child(side: str, a) -> dict:
    folder, lengths = folder_for(a), [int(n) for n in a.tokens.split(",")]
    t0 = time.perf_counter()
    if side == "ref":
        out = {}
        for n in lengths:
            out[n] = reference(folder, prompt(n))
        encode = None
    elif side.startswith("ours"):
        from pixart import backend, cpu  # before mindspore: sets the OpenMP wait policy
        import mindspore as ms
        from pixart.models.t5 import load_t5
        backend.setup("CPU", "pynative", threads=a.threads or None)
        dtype = {"ours": "bf16", "ours_fp16": "fp16", "ours_fp32": "fp32"}[side]
        model = cpu.accelerate(load_t5(folder, dtype))

        def encode(ids):
            return model(ms.Tensor(ids), ms.Tensor(np.ones_like(ids))).asnumpy()
    else:
        import torch
        from transformers import T5EncoderModel
        if a.threads:
            torch.set_num_threads(a.threads)
        dt = {"torch": torch.bfloat16, "torch_fp32": torch.float32}[side]
        model = T5EncoderModel.from_pretrained(str(folder), dtype=dt).eval()

        def encode(ids):
            with torch.no_grad():
                ids = torch.from_numpy(ids.astype(np.int64))
                return model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float().numpy()
    result = dict(side=side, load_s=time.perf_counter() - t0)
    for n in lengths:
        if encode is not None:
            t0 = time.perf_counter()
            first = encode(prompt(n))
            result[f"first_{n}"] = time.perf_counter() - t0
            result.setdefault("first_s", result[f"first_{n}"])
            times = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                encode(prompt(n))
                times.append(time.perf_counter() - t0)
            result[f"times_{n}"] = times
        else:
            first = out[n]
            result[f"times_{n}"] = [0.0]
        path = Path(a.out_dir) / f"{side}-{n}.npy"
        np.save(path, first.astype(np.float32))
        result[f"out_{n}"] = str(path)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24, help="encoder blocks (T5 v1.1 XXL: 24)")
    p.add_argument("--tokens", default="120,300", help="prompt lengths, comma-separated")
    p.add_argument("--runs", type=int, default=2, help="child processes per side, alternating")
    p.add_argument("--steps", type=int, default=2, help="timed encodes per prompt and child, after the first")
    p.add_argument("--folder", default=None, help="where the random fp16 weights are written once")
    p.add_argument("--out_dir", default="/tmp", help="where the children leave their outputs")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for every side (0: library default)")
    a = parse_or_run_child(p, child)
    if a is None:
        return
    if a.sides == "ours,torch":  # the default: with the fp32 reference
        a.sides = "ref,ours,torch"
    write_weights(folder_for(a), a.layers)
    forward = ["--layers", str(a.layers), "--tokens", a.tokens, "--steps", str(a.steps), "--out_dir", a.out_dir,
               "--threads", str(a.threads)] + (["--folder", a.folder] if a.folder else [])
    sides = tuple(a.sides.split(","))
    timed_sides = [s for s in sides if s != "ref"]
    results = run_children(__file__, ("ref",) if "ref" in sides else (), 1, forward)
    results.update(run_children(__file__, tuple(timed_sides), a.runs, forward))
    ref = {n: np.load(results["ref"][0][f"out_{n}"]) for n in a.tokens.split(",")} if "ref" in sides else None
    for n in a.tokens.split(","):
        rows = [(side, summary(results[side], f"times_{n}")) for side in timed_sides]
        ours = next((s for s in timed_sides if s.startswith("ours")), "ours")
        refside = next((s for s in timed_sides if s.startswith("torch")), "torch")
        print()
        print(table(f"T5 v1.1 XXL width, {a.layers} layers, one {n}-token prompt: s per encode", rows, ours=ours,
                    ref=refside))
        if ref is not None:
            scale = float(np.abs(ref[n]).max())
            for side in timed_sides:
                errs = [float(np.abs(np.load(r[f"out_{n}"]) - ref[n]).max()) / scale for r in results[side]]
                print(f"{side}: max |out - fp32 reference| / max |reference|: {max(errs):.2e}")
    for side in timed_sides:
        print(f"{side}: load s {[round(r['load_s'], 1) for r in results[side]]}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
