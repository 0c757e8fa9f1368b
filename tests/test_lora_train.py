"""LoRA training (pixart/lora-finetuning/train_pixart_lora.py) end to end: the loss falls, the base weights stay
bit-identical, the LoRA file is small and applies with sample.py, a resumed run repeats an uninterrupted one, and
bad input exits 1 with one line.

The pretrained base is the demo bundle's transformer (a random reduced Σ-256: depth 2, width 144) with its tiny T5
and VAE; the data is the synthetic set (red squares / blue circles), cached once with tools/extract_features.py.
Training runs are subprocesses, as a user runs them, sharing one MindSpore compile cache (one configuration).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pixart import demo_bundle as demo
from pixart.io import read_ckpt, read_safetensors_metadata, read_state_dict
from pixart.cli.options import ConfigError, parse_args
from pixart.models.lora import LORA_WEIGHT_NAME, METADATA_KEY
from pixart.training import checkpoint as ckpt
from tests.synthetic import CAPTIONS, make_dataset
from tests.test_train import _free_port, compile_cache, environment, losses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pixart" / "lora-finetuning" / "train_pixart_lora.py"
STEPS, EVERY = 40, 10  # the learning run: checkpoints at 10, 20, 30, 40; the last two kept


def train(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=environment(env), timeout=600)


def load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_pixart_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-train")
    demo.build(root / "demo", log=lambda *_: None)
    comp = root / "demo" / demo.COMPONENTS
    labels, images = make_dataset(root / "data", per_kind_and_ratio=3)  # 12 images, square crops at 256 px
    cache = root / "cache"
    r = subprocess.run([sys.executable, "tools/extract_features.py", "--json_path", str(labels), "--image_dir",
                        str(images), "--output_dir", str(cache), "--resolution", "256", "--multi_scale", "false",
                        "--max_length", "300", "--vae_root", str(comp / "vae"), "--text_encoder_root",
                        str(comp / "text_encoder"), "--tokenizer_root", str(comp / "tokenizer")],
                       capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    base = root / "demo" / demo.CHECKPOINT
    common = ["--pretrained_model_name_or_path", base, "--model", demo.PRESET, "--json_path", labels,
              "--feature_dir", cache, "--train_batch_size", 4, "--learning_rate", 2e-3, "--log_every", EVERY,
              "--checkpointing_steps", EVERY, "--param_digest", "true", "--rank", 4, "--lora_targets", "blocks"]
    return dict(root=root, base=base, comp=comp, labels=labels, images=images, cache=cache, common=common,
                env=compile_cache(root / "compile_cache"))


@pytest.fixture(scope="module")
def trained(setup):
    out = setup["root"] / "lora"
    r = train(*setup["common"], "--max_train_steps", STEPS, "--checkpoints_total_limit", 2, "--output_dir", out,
              env=setup["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(out=out, stdout=r.stdout)


def tagged(stdout: str, what: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("[rank 0/1]") and what in line).split()[-1]


@pytest.mark.slow
@pytest.mark.e2e
def test_training_lowers_the_loss_keeps_the_base_and_writes_a_small_diffusers_lora(setup, trained):
    out = trained["out"]
    loss = losses(out)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = np.mean([loss[s] for s in range(1, 11)]), np.mean([loss[s] for s in range(STEPS - 9, STEPS + 1)])
    print(f"loss: mean of steps 1-10 {first:.4f}, of steps {STEPS - 9}-{STEPS} {last:.4f} ({last / first:.2f}x)")
    assert last < 0.8 * first

    # every non-LoRA parameter after training is bit-identical to the base checkpoint's
    assert tagged(trained["stdout"], "base weights digest") == ckpt.digest(read_ckpt(setup["base"]))

    # checkpoint-N folders (diffusers' naming), the last two kept, each complete; the final file is the last one's
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{STEPS - EVERY}", f"checkpoint-{STEPS}"]
    for folder in out.glob("checkpoint-*"):
        assert {p.name for p in folder.iterdir()} == {LORA_WEIGHT_NAME, ckpt.TRAIN_STATE, ckpt.STATE}
    final = out / LORA_WEIGHT_NAME
    assert final.read_bytes() == (out / f"checkpoint-{STEPS}" / LORA_WEIGHT_NAME).read_bytes()

    # diffusers' layout and LoraConfig metadata; a small fraction of the base model
    keys = set(read_state_dict(final))
    assert "transformer.transformer_blocks.1.attn1.to_v.lora_B.weight" in keys and "transformer.transformer_blocks." \
        "0.ff.net.0.proj.lora_A.weight" in keys and all(k.startswith("transformer.") for k in keys)
    config = json.loads(read_safetensors_metadata(final)[METADATA_KEY])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 4.0)
    size, base_size = final.stat().st_size, setup["base"].stat().st_size
    print(f"LoRA file {size / 1e3:.0f} kB, base checkpoint {base_size / 1e3:.0f} kB ({100 * size / base_size:.1f}%)")
    assert size < 0.1 * base_size


@pytest.mark.slow
@pytest.mark.e2e
def test_the_trained_lora_changes_the_model_and_samples_with_sample_py(setup, trained, tmp_path):
    from mindspore import Tensor
    from pixart.models.lora import set_lora_scale
    from pixart.pipelines.loading import load_transformer
    from pixart.pipelines.outputs import read_png_settings
    g = np.random.default_rng(0)
    x = Tensor(g.standard_normal((1, 4, 16, 16)).astype(np.float32))
    t = Tensor(np.array([500.0], np.float32))
    y = Tensor(g.standard_normal((1, 1, 8, 64)).astype(np.float32))
    quiet = dict(log=lambda *_: None)
    base = load_transformer(setup["base"], demo.PRESET, **quiet)(x, t, y).asnumpy()
    model = load_transformer(setup["base"], demo.PRESET, lora_path=trained["out"], **quiet)
    with_lora = model(x, t, y).asnumpy()
    set_lora_scale(model, 0.0)
    off = model(x, t, y).asnumpy()
    change = float(np.abs(with_lora - base).max() / np.abs(base).max())
    print(f"trained LoRA: output changes by {change:.3f} of the base output's scale")
    assert change > 1e-3 and np.abs(off - base).max() < 1e-5

    c = setup["comp"]
    r = subprocess.run([sys.executable, "sample.py", "--model", demo.PRESET, "--checkpoint", str(setup["base"]),
                        "--vae_root", str(c / "vae"), "--text_encoder_root", str(c / "text_encoder"),
                        "--tokenizer_root", str(c / "tokenizer"), "--lora_path", str(trained["out"]), "--prompt",
                        CAPTIONS["square"], "--sampling_steps", "2", "--image_height", "64", "--image_width", "64",
                        "--resolution_binning", "false", "--output_path", str(tmp_path), "--progress", "false"],
                       capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    settings = read_png_settings(next(tmp_path.glob("0000-*.png")))
    assert settings["lora"] == str(trained["out"]) and settings["lora_scale"] == 1.0


@pytest.mark.slow
@pytest.mark.e2e
def test_resume_repeats_the_uninterrupted_run(setup, trained, tmp_path):
    """checkpoint-30 of the learning run, copied into a fresh output folder, resumed with `latest` to step 40: the
    same losses, LoRA file and optimizer state, bit for bit."""
    full, part = trained["out"], tmp_path / "resumed"
    part.mkdir()
    shutil.copytree(full / f"checkpoint-{STEPS - EVERY}", part / f"checkpoint-{STEPS - EVERY}")
    r = train(*setup["common"], "--max_train_steps", STEPS, "--output_dir", part, "--resume_from_checkpoint", "latest",
              env=setup["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {part / f'checkpoint-{STEPS - EVERY}'}: step {STEPS - EVERY}" in r.stdout
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(STEPS - EVERY + 1, STEPS + 1))
    assert all(a[s] == b[s] for s in b), (a, b)
    assert (part / LORA_WEIGHT_NAME).read_bytes() == (full / LORA_WEIGHT_NAME).read_bytes()
    x, y = (read_ckpt(d / f"checkpoint-{STEPS}" / ckpt.TRAIN_STATE) for d in (full, part))
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert tagged(r.stdout, "parameter digest") == tagged(trained["stdout"], "parameter digest")


@pytest.mark.slow
@pytest.mark.e2e
def test_msrun_two_ranks_train_what_one_process_trains(setup, trained, tmp_path):
    """Two CPU workers with batch 2 each (PyNative) against the learning run's first two steps (one process, batch
    4, graph mode): each rank trains its half of the same batches, both ranks end with bit-identical LoRA weights
    and the base untouched, and the losses match the single process (the second one after an all-reduced update)."""
    out, logs = tmp_path / "dp", tmp_path / "logs"
    r = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                        f"--log_dir={logs}", "--join=True", str(SCRIPT), *map(str, setup["common"]),
                        "--train_batch_size", "2", "--max_train_steps", "2", "--log_every", "1", "--mode", "pynative",
                        "--output_dir", str(out), "--use_parallel", "True"],
                       capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=600)
    worker = [(logs / f"worker_{i}.log").read_text() for i in range(2)]
    assert r.returncode == 0, r.stdout[-2000:] + "\n".join(w[-2000:] for w in worker)

    def line(text, rank, what):
        return next(ln for ln in text.splitlines() if ln.startswith(f"[rank {rank}/") and what in ln)
    halves = [line(worker[i], i, "first batch").split(": ", 1)[1].split(", ") for i in range(2)]
    assert halves[0] + halves[1] == line(trained["stdout"], 0, "first batch").split(": ", 1)[1].split(", ")
    digests = [line(worker[i], i, "parameter digest").split()[-1] for i in range(2)]
    assert digests[0] == digests[1]
    base = ckpt.digest(read_ckpt(setup["base"]))
    assert all(line(worker[i], i, "base weights digest").split()[-1] == base for i in range(2))
    a, b = losses(trained["out"]), losses(out)
    print(f"msrun vs one process: loss step 1 {b[1]:.7f} / {a[1]:.7f}, step 2 {b[2]:.7f} / {a[2]:.7f}")
    assert abs(a[1] - b[1]) < 1e-5 and abs(a[2] - b[2]) < 1e-5
    assert (out / LORA_WEIGHT_NAME).exists()


@pytest.mark.parametrize("case,message", [
    ("no_base", "--pretrained_model_name_or_path is required"),
    ("rank", "--rank must be >= 1, got 0"),
    ("dropout", "--lora_dropout must be in [0, 1), got 1.5"),
    ("batch", "--train_batch_size must be >= 1, got 0"),
    ("yaml_alias", "--num_train_epochs must be >= 1, got 0"),
    ("yaml_typo", "unknown key(s) rnak"),
    ("resume", "--resume_from_checkpoint path not found: "),
    ("targets", "--lora_targets: LoRA targets match no linear layer: attn.qkvv"),
    ("other_rank", "trained a LoRA with --rank 4, this run asks for 8"),
])
@pytest.mark.slow
@pytest.mark.e2e
def test_bad_input_exits_1_with_one_line(setup, trained, tmp_path, capsys, case, message):
    """In-process (the script's main()); the cases that pass the checks run in PyNative up to the refusal."""
    args = [*map(str, setup["common"]), "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"),
            "--mode", "pynative"]
    config = tmp_path / "c.yaml"
    extra = {
        "no_base": ["--pretrained_model_name_or_path", ""],
        "rank": ["--rank", "0"],
        "dropout": ["--lora_dropout", "1.5"],
        "batch": ["--train_batch_size", "0"],
        "yaml_alias": ["-c", str(config)],
        "yaml_typo": ["-c", str(config)],
        "resume": ["--resume_from_checkpoint", str(tmp_path / "nowhere")],
        "targets": ["--lora_targets", "blocks", "attn.qkvv"],
        "other_rank": ["--rank", "8", "--resume_from_checkpoint", str(trained["out"] / f"checkpoint-{STEPS}")],
    }[case]
    config.write_text({"yaml_alias": "epochs: 0\n", "yaml_typo": "rnak: 4\n"}.get(case, ""))
    assert load_script().main(args + extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()


def test_flags_yaml_and_aliases(tmp_path):
    from pixart.cli.lora_train import build_parser, complete_args
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({"train_batch_size": 3, "save_every": 7, "rank": 16, "random_flip": True,
                                      "max_token_length": 120, "mixed_precision": "no"}))
    a = parse_args(build_parser(), ["-c", str(config), "--rank", "8", "--json_path", "x.json"])
    assert (a.batch_size, a.save_every, a.rank, a.random_flip, a.max_length) == (3, 7, 8, True, 120)
    assert (a.mixed_precision, a.learning_rate, a.lora_alpha, a.class_dropout_prob) == ("fp32", 1e-6, None, 0.0)
    complete_args(a)
    assert (a.betas, a.eps, a.weight_decay, a.keep_last, a.warmup_steps) == ([0.9, 0.999], [1e-8], 1e-2, 0, 0)
    a = parse_args(build_parser(), ["--random_flip", "--gradient_checkpointing", "--batch_size", "2",
                                    "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5"])
    complete_args(a)
    assert (a.random_flip, a.recompute, a.batch_size, a.warmup_steps) == (True, True, 2, 5)
    config.write_text("train_batch_size: 3\nbatch_size: 4\n")
    with pytest.raises(ConfigError, match="train_batch_size and batch_size set the same option"):
        parse_args(build_parser(), ["-c", str(config)])


def test_lr_schedules_equal_diffusers_get_scheduler():
    """Every --lr_scheduler name, with warm-up or not, against diffusers' get_scheduler stepping a torch optimizer,
    including steps past the end."""
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_scheduler
    from pixart.training.optimizers import LR_SCHEDULES, learning_rate_at
    base = 1e-4
    for name in LR_SCHEDULES:
        for warmup, total, cycles, power in ((0, 10, 1, 1.0), (3, 17, 3, 2.0), (2, 9, 2, 0.5)):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
            sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles,
                                  power=power)
            want = []
            for _ in range(total + 3):
                want.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            got = [learning_rate_at(name, k, base, warmup, total, cycles, power) for k in range(total + 3)]
            assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-7 * base, (name, warmup, total, got, want)
