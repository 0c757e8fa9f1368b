"""train.py end to end on a synthetic set (red squares / blue circles, two aspect ratios) with the demo bundle's tiny
T5 and VAE: learning, exact resume, msrun data parallel, the feature-cache tool, loading into sample.py, bad input.

Runs are subprocesses, as a user runs them. Runs that repeat one configuration share a MindSpore compile cache
(one folder per configuration: the cache replays graphs in compile order, so configurations must not mix).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pixart import demo_bundle as demo
from pixart.io import read_ckpt
from tests.synthetic import CAPTIONS, make_dataset
from tests.utils import exit_status

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "PixArt-XL-2-256x256", "--multi_scale", "true", "--depth", "2", "--hidden_size", "72",
        "--log_every", "5"]


def environment(extra=None) -> dict:
    """This checkout's pixart first (tools/ scripts would otherwise import whatever `pip install -e` points at) and
    this interpreter's `python` first on PATH (msrun starts `python`)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            **(extra or {})}


def run(script, *args, env=None, timeout=600):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=environment(env), timeout=timeout)


def compile_cache(path) -> dict:
    return {"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": str(path)}


def losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "step" in r}


def summary(output_dir) -> dict:
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return [r["summary"] for r in rows if "summary" in r][-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo bundle, the synthetic set (plus a corrupt and a missing image), its feature cache via the tool. The
    bundle's VAE is the untrained one: the caption test below is sized (300 steps) for its latents; on the trained
    demo VAE's latents the captions are learned far more slowly (docs/demo.md, 'What is left')."""
    root = tmp_path_factory.mktemp("train")
    bundle = demo.build(root / "demo", log=lambda *_: None, trained=False) / demo.COMPONENTS
    labels, images = make_dataset(root / "data", per_kind_and_ratio=3)
    items = json.loads(labels.read_text())
    (images / "sub" / "corrupt.png").write_bytes(b"\x89PNG but not really")
    items += [{"path": "sub/corrupt.png", "prompt": CAPTIONS["square"], "height": 64, "width": 64, "ratio": 1.0},
              {"path": "sub/missing.png", "prompt": CAPTIONS["circle"], "height": 64, "width": 64, "ratio": 1.0}]
    labels.write_text(json.dumps(items))
    square = root / "data" / "square.json"  # the ratio-1.0 half: one bucket, one compiled graph per run
    square.write_text(json.dumps([i for i in items if i["height"] == i["width"]]))
    encoders = ["--vae_root", bundle / "vae", "--text_encoder_root", bundle / "text_encoder",
                "--tokenizer_root", bundle / "tokenizer"]
    cache = root / "cache"
    r = run("tools/extract_features.py", "--json_path", labels, "--image_dir", images, "--output_dir", cache,
            "--resolution", 256, "--max_length", 120, *encoders)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "latents: 12 encoded" in r.stdout and "captions: 4 encoded" in r.stdout
    assert "skipped 2" in r.stdout and "sub/corrupt.png (unreadable" in r.stdout and "sub/missing.png (missing)" in r.stdout
    means = {}
    for item in items[:12]:
        with np.load(cache / "latents" / (item["path"].replace("/", "__") + ".npz")) as f:
            means.setdefault((item["prompt"], str(f["bucket"])), []).append(f["mean"])
    scale = 1.0 / np.concatenate([np.ravel(m) for v in means.values() for m in v]).std()  # unit-variance latents
    return dict(root=root, bundle=bundle, labels=labels, square=square, images=images, cache=cache, means=means,
                scale=float(scale), encoders=[str(a) for a in encoders])


# ----------------------------------------------------------------------------------------------------------------
# Learning: the loss falls well below its start, and samples for each caption land nearer its training latents
# ----------------------------------------------------------------------------------------------------------------
LEARN_STEPS = 300


def learn_args(setup, out, *extra):
    return ["--model", "PixArt-XL-2-256x256", "--multi_scale", "true", "--depth", 2, "--hidden_size", 144,
            "--json_path", setup["labels"], "--batch_size", 6, "--learning_rate", 1e-3, "--warmup_steps", 0,
            "--sample_posterior", "false", "--sd_scale_factor", setup["scale"], "--output_dir", out,
            "--log_every", 50, *extra]


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """The tiny model trained from the cache (graph mode)."""
    out = tmp_path_factory.mktemp("learn") / "run"
    r = run("train.py", *learn_args(setup, out, "--feature_dir", setup["cache"], "--max_steps", LEARN_STEPS,
                                    "--save_every", 1000))
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(out=out, stdout=r.stdout, checkpoint=out / "checkpoints" / f"step_{LEARN_STEPS:08d}")


@pytest.mark.slow
@pytest.mark.e2e
def test_training_learns_the_two_captions(setup, trained, graph_mode):
    from pixart.pipelines.loading import load_components
    from pixart.pipelines.text_to_image import PixArtPipeline
    out = trained["out"]
    assert "skipped 2: sub/corrupt.png (not in the feature cache: unreadable" in trained["stdout"]
    assert "sub/missing.png (not in the feature cache: missing)" in trained["stdout"]
    loss = losses(out)
    start = np.mean([loss[s] for s in range(1, 6)])
    end = np.mean([loss[s] for s in range(LEARN_STEPS - 49, LEARN_STEPS + 1)])
    s = summary(out)
    print(f"loss: first 5 steps {start:.4f}, last 50 steps {end:.4f}; median step {s['median_step_s']:.3f}s, "
          f"peak RSS {s['peak_rss_mb']:.0f} MB")
    assert end < 0.3 * start

    # sample each caption in each bucket with the learned variance (IDDPM) and guidance, compare with the data
    b = setup["bundle"]
    pipe = PixArtPipeline(**load_components(trained["checkpoint"] / "model.ckpt", "PixArt-XL-2-256x256", b / "vae",
                                            b / "text_encoder", b / "tokenizer", log=lambda *_: None))
    centroids = {k: np.mean(v, 0) * setup["scale"] for k, v in setup["means"].items()}
    report = []
    for bucket, (h, w) in {"1.0": (256, 256), "0.5": (176, 352)}.items():
        for caption in CAPTIONS.values():
            other = next(c for c in CAPTIONS.values() if c != caption)
            result = pipe(caption, height=h, width=w, sampler="iddpm", num_inference_steps=50, guidance_scale=4.5,
                          num_images_per_prompt=2, seed=1, use_resolution_binning=False, output_type="np",
                          progress=False)
            for z in result.latents:
                own = float(np.sqrt(((z - centroids[(caption, bucket)]) ** 2).mean()))
                far = float(np.sqrt(((z - centroids[(other, bucket)]) ** 2).mean()))
                report.append((bucket, caption, own, far))
    print("sample distance to own / other caption's training latents (rms):",
          "; ".join(f"{b} {c}: {o:.3f} / {f:.3f}" for b, c, o, f in report))
    assert all(own < far for _, _, own, far in report)


@pytest.mark.slow
@pytest.mark.e2e
def test_trained_checkpoint_loads_into_sample_py(setup, trained, tmp_path):
    from pixart.pipelines.loading import load_transformer
    r = run("sample.py", "--model", "PixArt-XL-2-256x256", "--checkpoint", trained["checkpoint"] / "model.ckpt",
            *setup["encoders"], "--prompt", CAPTIONS["circle"], "--sampling_steps", 2, "--image_height", 256,
            "--image_width", 256, "--output_path", tmp_path, "--progress", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(tmp_path.glob("0000-*.png"))) == 1
    # the EMA weights beside it load the same way (sample.py's loader), and differ from the weights
    ema = load_transformer(trained["checkpoint"] / "ema.ckpt", "PixArt-XL-2-256x256", log=lambda *_: None)
    weights = read_ckpt(trained["checkpoint"] / "model.ckpt")
    name = "final_layer.linear.weight"
    assert not np.array_equal(ema.final_layer.linear.weight.asnumpy(), weights[name])


@pytest.mark.slow
@pytest.mark.e2e
def test_on_the_fly_pynative_gives_the_cached_graph_losses(setup, trained, tmp_path):
    """No cache: T5 and VAE encode every batch, in PyNative mode; the first steps repeat the cached graph run.
    Validation images (fixed prompt and seed) come out at step 2."""
    from pixart.pipelines.outputs import read_png_settings
    out = tmp_path / "fly"
    r = run("train.py", *learn_args(setup, out, "--image_dir", setup["images"], "--mode", "pynative",
                                    "--max_steps", 2, "--log_every", 1, "--validation_every", 2,
                                    "--validation_prompts", CAPTIONS["square"], "--validation_steps", 2,
                                    *setup["encoders"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 2: sub/corrupt.png (unreadable" in r.stdout
    png = out / "validation" / "step_00000002" / "00.png"
    assert read_png_settings(png)["prompt"] == CAPTIONS["square"] and read_png_settings(png)["training_step"] == 2
    a, b = losses(trained["out"]), losses(out)
    print(f"cached graph vs on-the-fly PyNative: step 1 {a[1]:.7f} / {b[1]:.7f}, step 2 {a[2]:.7f} / {b[2]:.7f}")
    assert abs(a[1] - b[1]) < 1e-5 and abs(a[2] - b[2]) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Resume: kill a run, resume it, and get the same losses and weights as a run that was never interrupted
# ----------------------------------------------------------------------------------------------------------------
def kill_after_checkpoint(step: int, *args, env=None) -> Path:
    """Start train.py `args` (with --output_dir), SIGKILL it once the checkpoint of `step` is written; its state.json."""
    out = Path(args[list(map(str, args)).index("--output_dir") + 1])
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=environment(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / f"step_{step:08d}" / "state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    return marker


def assert_same_run(full, part, steps: int) -> None:
    """Runs `full` and `part` logged the same losses for steps 1..steps and wrote the same last checkpoint, bit for
    bit."""
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), (a, b)  # bit for bit
    for name in ("model.ckpt", "ema.ckpt", "train_state.ckpt"):
        x = read_ckpt(full / "checkpoints" / f"step_{steps:08d}" / name)
        y = read_ckpt(part / "checkpoints" / f"step_{steps:08d}" / name)
        assert x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x), name


@pytest.mark.slow
@pytest.mark.e2e
def test_resume_after_kill_equals_an_uninterrupted_run(setup, tmp_path):
    k = 4
    common = [*TINY, "--json_path", setup["square"], "--feature_dir", setup["cache"], "--batch_size", 2,
              "--grad_accumulation", 2, "--optimizer", "came", "--learning_rate", 1e-3, "--warmup_steps", 3,
              "--real_prompt_ratio", 0.5, "--sd_scale_factor", setup["scale"], "--recompute", "true",
              "--max_steps", 2 * k, "--save_every", k, "--keep_last", 0, "--log_every", 1]
    env = compile_cache(tmp_path / "compile_cache")
    full = tmp_path / "full"
    r = run("train.py", *common, "--output_dir", full, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    part = tmp_path / "part"
    marker = kill_after_checkpoint(k, *common, "--output_dir", part, env=env)
    r = run("train.py", *common, "--output_dir", part, "--resume", marker.parent, "--keep_last", 1, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {marker.parent}: step {k}" in r.stdout

    assert_same_run(full, part, 2 * k)
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step_00000008"]  # --keep_last 1

    # --resume latest takes the newest checkpoint and goes on
    r = run("train.py", *common, "--output_dir", part, "--resume", "latest", "--keep_last", 1, "--max_steps", 2 * k + 1,
            env=env)
    assert r.returncode == 0 and f"resumed from {part / 'checkpoints' / 'step_00000008'}: step 8" in r.stdout
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step_00000009"]
    assert sorted(losses(part)) == list(range(1, 2 * k + 2))


# ----------------------------------------------------------------------------------------------------------------
# msrun: two CPU workers on different halves of a batch == one process on the whole batch
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_common_args(setup) -> list[str]:
    """One tiny step configuration for every data-parallel comparison (2 steps, PyNative, digest logged)."""
    return [*map(str, TINY), "--json_path", str(setup["square"]), "--feature_dir", str(setup["cache"]),
            "--max_steps", "2", "--learning_rate", "1e-3", "--warmup_steps", "0", "--real_prompt_ratio", "0.5",
            "--sd_scale_factor", str(setup["scale"]), "--param_digest", "true", "--log_every", "1",
            "--mode", "pynative"]  # graph: same (1e-7)


def single_process_run(setup, out):
    """The reference: one process on the whole batch of 4."""
    r = run("train.py", *msrun_common_args(setup), "--batch_size", 4, "--output_dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def check_data_parallel(single, single_stdout, dp, worker) -> float:
    """Two ranks (batch 2 each, `worker` = their logs) trained what one process (batch 4) trained: different halves
    of the same batch per rank, bit-identical weights on both ranks, equal to one process up to the all-reduce
    order; only rank 0 saved. Returns the max |weight difference| to the single process."""
    def tagged(text, rank, what):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"[rank {rank}/") and what in ln)
        return line.split(": ", 1)[1] if what == "first batch" else line.rsplit(" ", 1)[1]

    batches = [tagged(worker[i], i, "first batch").split(", ") for i in range(2)]
    assert not set(batches[0]) & set(batches[1])  # different data per rank ...
    assert batches[0] + batches[1] == tagged(single_stdout, 0, "first batch").split(", ")  # ... halves of one batch
    digests = [tagged(worker[i], i, "parameter digest") for i in range(2)]
    assert digests[0] == digests[1]  # both ranks hold bit-identical weights
    assert not (dp / "checkpoints").exists() or len(list((dp / "checkpoints").iterdir())) == 1  # only rank 0 saves
    a = read_ckpt(single / "checkpoints" / "step_00000002" / "model.ckpt")
    b = read_ckpt(dp / "checkpoints" / "step_00000002" / "model.ckpt")
    diff = max(float(np.abs(a[n] - b[n]).max()) for n in a)
    assert diff < 1e-6, diff  # equal up to the order of the all-reduce sum
    la, lb = losses(single), losses(dp)
    assert all(abs(la[s] - lb[s]) < 1e-6 for s in la)
    return diff


def msrun_two_workers(logs, *args) -> list[str]:
    """train.py `args` on two msrun workers (--use_parallel True); their logs."""
    r = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                        f"--log_dir={logs}", "--join=True", "train.py", *map(str, args), "--use_parallel", "True"],
                       capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=600)
    worker = [(logs / f"worker_{i}.log").read_text() for i in range(2)]
    assert r.returncode == 0, r.stdout[-2000:] + "\n".join(w[-2000:] for w in worker)
    return worker


@pytest.mark.slow
@pytest.mark.e2e
def test_msrun_data_parallel_equals_one_process_on_the_concatenated_batch(setup, tmp_path):
    single = tmp_path / "single"
    r1 = single_process_run(setup, single)
    dp = tmp_path / "dp"
    worker = msrun_two_workers(tmp_path / "logs", *msrun_common_args(setup), "--batch_size", "2", "--output_dir", dp)
    diff = check_data_parallel(single, r1.stdout, dp, worker)
    print(f"msrun vs one process: max |weight difference| {diff:.2e}")


# ----------------------------------------------------------------------------------------------------------------
# Bad input: exit 1 with one line
# ----------------------------------------------------------------------------------------------------------------
BAD_INPUT = [
    ("missing_field", "entry 0 (sub/a.png) is missing field 'prompt'"),
    ("no_image_dir", "--image_dir not found: "),
    ("batch_too_large", "--batch_size 7 x 1 rank(s) = 7 is larger than every aspect-ratio bucket"),
    ("resume_missing", "--resume path not found: "),
    ("unknown_yaml_key", "unknown key(s) learning_rat"),
    ("bf16_on_cpu", "bf16 is not supported on MindSpore's CPU backend"),
    ("parallel_without_msrun", "--use_parallel True needs the msrun launcher"),
]


def bad_input_argv(setup, tmp_path, case) -> list[str]:
    args = [*TINY, "--json_path", setup["labels"], "--feature_dir", setup["cache"], "--batch_size", 2,
            "--max_steps", 1, "--output_dir", tmp_path / "out"]
    if case == "missing_field":
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([{"path": "sub/a.png", "height": 8, "width": 8, "ratio": 1}]))
        args += ["--json_path", bad]
    elif case == "no_image_dir":
        args += ["--image_dir", tmp_path / "nowhere"]
    elif case == "batch_too_large":
        args += ["--batch_size", 7]
    elif case == "resume_missing":
        args += ["--resume", tmp_path / "no_such_checkpoint"]
    elif case == "unknown_yaml_key":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("learning_rat: 0.1\n")
        args += ["-c", cfg]
    elif case == "bf16_on_cpu":
        args += ["--mixed_precision", "bf16"]
    elif case == "parallel_without_msrun":
        args += ["--use_parallel", "true"]
    return list(map(str, args))


def assert_refused(status: int, stdout: str, stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr


@pytest.mark.parametrize("case,message", BAD_INPUT)
@pytest.mark.slow  # the module's set-up (feature extraction) is
def test_bad_input_exits_1_with_one_line(setup, tmp_path, graph_mode, capsys, case, message):
    """train.py's main in this process (a real process per case would cost seconds of start-up each; the test
    below runs one as a user does). train.py defaults to graph mode: `graph_mode` restores PyNative afterwards."""
    import train as script
    status = exit_status(script.main, bad_input_argv(setup, tmp_path, case))
    out = capsys.readouterr()
    assert_refused(status, out.out, out.err, message)


@pytest.mark.slow
@pytest.mark.e2e
def test_bad_input_exits_1_with_one_line_as_a_user_runs_it(setup, tmp_path):
    case, message = BAD_INPUT[0]
    r = run("train.py", *bad_input_argv(setup, tmp_path, case))
    assert_refused(r.returncode, r.stdout, r.stderr, message)


def test_train_configs_parse_with_the_published_settings():
    from pixart.cli.options import parse_args
    from pixart.cli.train import build_parser, resolve_reference_options
    configs = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"pixart-alpha-256x256", "pixart-alpha-512x512", "pixart-alpha-1024-MS",
                                         "pixart-sigma-256x256", "pixart-sigma-512-MS", "pixart-sigma-1024-MS",
                                         "pixart-sigma-2K-MS"}
    for c in configs:
        a = parse_args(build_parser(), ["-c", str(c), "--json_path", "x.json"])
        resolve_reference_options(a)  # the optimizer's own betas / eps keys
        assert a.learning_rate == 2e-5 and a.clip_grad == 0.01 and a.recompute and a.auto_lr == "sqrt", c.name
        if "sigma" in c.stem:
            assert a.optimizer == "came" and a.real_prompt_ratio == 0.5 and not a.use_ema, c.name
        else:
            assert a.optimizer == "adamw" and a.weight_decay == 0.03 and a.eps == [1e-10] and a.use_ema, c.name
