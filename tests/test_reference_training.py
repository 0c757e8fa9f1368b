"""train.py and the LoRA script as a user of the reference MindSpore port (mindone's examples/pixart_sigma) runs them:
its training command, its msrun command, its YAML file, and each of its flag groups doing what it says.

The end-to-end runs happen in a temporary working folder laid out as the reference README lays out `models/`
(`models/PixArt-Sigma-XL-2-512-MS.ckpt`, `models/vae`, `models/text_encoder`, `models/tokenizer`), filled with the
demo bundle's tiny model, and with this checkout's `configs/` linked in. The shipped configs train 10+ epochs at
batch 48; the runs add only flags that shrink them (`--batch_size`, `--max_steps` / `--epochs`, `--sampling_steps`),
each named in the test.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pixart.cli import lora_train, main, options, train
from pixart.cli.options import add_aliases, parse_args
from tests.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_YAML = """\
# model
sample_size: 64
batch_size: 32
checkpoint: "models/PixArt-Sigma-XL-2-512-MS.ckpt"
vae_root: "models/vae"
text_encoder_root: "models/text_encoder"
tokenizer_root: "models/tokenizer"
sd_scale_factor: 0.13025
enable_flash_attention: True
dtype: "fp16"

# training hyper-parameters
epochs: 100
scheduler: "constant"
start_learning_rate: 2.0e-5
optim: "came"
came_betas: [0.9, 0.999, 0.9999]
came_eps: [1.0e-30, 1.0e-16]
weight_decay: 0.0
loss_scaler_type: "dynamic"
init_loss_scale: 65536.0
gradient_accumulation_steps: 1
clip_grad: True
max_grad_norm: 0.01
ckpt_save_interval: 5
log_loss_interval: 1
recompute: True
multi_scale: True
class_dropout_prob: 0.1
real_prompt_ratio: 0.5
warmup_steps: 1000
auto_lr: sqrt

# visualization
visualize: True
visualize_interval: 5
sampling_method: "dpm"
sampling_steps: 20
guidance_scale: 4.5
validation_prompts:
  - "portrait photo of a girl, photograph, highly detailed face, depth of field"
  - "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"
  - "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
  - "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece"
"""


def cli_main(module, argv) -> int:
    """The exit status of the entry point of `module` (pixart.cli.train or .lora_train) run with `argv` (argparse's
    own errors exit)."""
    try:
        return main(module.run, module.build_parser, None, argv)
    except SystemExit as e:
        return e.code


def parsed(argv, build=train.build_parser):
    return parse_args(build(), [str(a) for a in argv])


def resolved(argv):
    args = parsed(argv)
    train.resolve_reference_options(args)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Parsing: the reference names, its YAML, its value forms
# ----------------------------------------------------------------------------------------------------------------
def test_reference_yaml_loads_unchanged_with_the_reference_meaning(tmp_path, capsys):
    config = tmp_path / "pixart-sigma-512-MS.yaml"
    config.write_text(REFERENCE_YAML)
    a = resolved(["-c", config, "--json_path", "x.json", "--device_target", "CPU"])
    assert (a.model, a.load_from, a.vae_root, a.sd_scale_factor) == (
        "PixArt-Sigma-XL-2-512-MS", "models/PixArt-Sigma-XL-2-512-MS.ckpt", "models/vae", 0.13025)
    assert (a.optimizer, a.betas, a.eps, a.learning_rate, a.weight_decay, a.auto_lr) == (
        "came", [0.9, 0.999, 0.9999], [1e-30, 1e-16], 2e-5, 0.0, "sqrt")
    assert (a.loss_scaler, a.init_loss_scale, a.grad_accumulation, a.clip_grad) == ("dynamic", 65536.0, 1, 0.01)
    assert (a.ckpt_save_interval, a.log_every, a.recompute, a.multi_scale, a.warmup_steps, a.epochs) == (
        5, 1, True, True, 1000, 100)
    assert (a.visualize, a.visualize_interval, a.sampling_method, a.validation_steps, a.validation_guidance) == (
        True, 5, "dpm", 20, 4.5)
    assert len(a.validation_prompts) == 4 and a.batch_size == 32 and a.scheduler == "constant"
    # Ascend-only requests on CPU: one warning line each, then plain attention and fp32
    assert (a.enable_flash_attention, a.mixed_precision) == (None, "fp32")
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings), warnings


@pytest.mark.parametrize("reference,value,dest,expected", [
    ("--checkpoint", "w.ckpt", "load_from", "w.ckpt"),
    ("--output_path", "out", "output_dir", "out"),
    ("--t5_max_length", "120", "max_length", 120),
    ("--dtype", "bf16", "mixed_precision", "bf16"),
    ("--start_learning_rate", "1e-4", "learning_rate", 1e-4),
    ("--optim", "came", "optimizer", "came"),
    ("--loss_scaler_type", "static", "loss_scaler", "static"),
    ("--scale_window", "7", "loss_scale_window", 7),
    ("--loss_scale_factor", "4", "loss_scale_factor", 4.0),
    ("--gradient_accumulation_steps", "3", "grad_accumulation", 3),
    ("--ckpt_max_keep", "5", "keep_last", 5),
    ("--ckpt_save_interval", "2", "ckpt_save_interval", 2),
    ("--log_loss_interval", "4", "log_every", 4),
    ("--sampling_steps", "9", "validation_steps", 9),
    ("--guidance_scale", "3.5", "validation_guidance", 3.5),
    ("--sampling_method", "iddpm", "sampling_method", "iddpm"),
    ("--num_parallel_workers", "4", "num_parallel_workers", 4),
    ("--use_parallel", "True", "use_parallel", True),
    ("--recompute", "True", "recompute", True),
    ("--enable_flash_attention", "False", "enable_flash_attention", False),
    ("--mode", "1", "mode", "1"),
    ("--jit_level", "O0", "jit_level", "O0"),
    ("--auto_lr", "", "auto_lr", "none"),
    ("--optim_eps", "1e-9", "adamw_eps", 1e-9),
])
def test_reference_flag_sets_our_option(reference, value, dest, expected):
    assert getattr(parsed([reference, value]), dest) == expected


def test_help_names_both_spellings():
    text = add_aliases(train.build_parser()).format_help()  # as parse_args shows -h
    for both in ("--load_from LOAD_FROM, --checkpoint", "--output_dir OUTPUT_DIR, --output_path",
                 "--mixed_precision {fp32,fp16,bf16}, --dtype", "--keep_last KEEP_LAST, --ckpt_max_keep",
                 "--grad_accumulation GRAD_ACCUMULATION, --gradient_accumulation_steps"):
        assert both in text, both


@pytest.mark.parametrize("argv,clip", [
    ([], 0.01),                                                   # on at --max_grad_norm's default
    (["--clip_grad", "True", "--max_grad_norm", "0.5"], 0.5),     # the reference's switch
    (["--clip_grad", "False", "--max_grad_norm", "0.5"], 0.0),
    (["--clip_grad", "0.2"], 0.2),                                # a number: the norm itself
    (["--clip_grad", "0"], 0.0),
])
def test_clip_grad_switch_or_norm(argv, clip):
    assert resolved(argv).clip_grad == clip


def test_optimizer_specific_betas_and_eps():
    a = resolved(["--optim", "adamw", "--adamw_eps", "1e-8"])
    assert (a.eps, a.betas) == ([1e-8], None)
    a = resolved(["--optim", "came", "--came_betas", "0.8", "0.9", "0.99", "--came_eps", "1e-29", "1e-15"])
    assert (a.betas, a.eps) == ([0.8, 0.9, 0.99], [1e-29, 1e-15])


@pytest.mark.parametrize("model,size,preset", [
    ("PixArt-Sigma-XL-2-512-MS", 32, "PixArt-Sigma-XL-2-256x256"),
    ("PixArt-Sigma-XL-2-512-MS", 128, "PixArt-Sigma-XL-2-1024-MS"),
    ("PixArt-Sigma-XL-2-512-MS", 256, "PixArt-Sigma-XL-2-2K-MS"),
    ("PixArt-XL-2-256x256", 64, "PixArt-XL-2-512x512"),
    ("PixArt-Sigma-XL-2-1024-MS-KV", 128, "PixArt-Sigma-XL-2-1024-MS-KV"),  # already that size: kept
])
def test_sample_size_picks_the_preset_of_that_latent_size(model, size, preset):
    assert resolved(["--model", model, "--sample_size", size]).model == preset


def test_dtype_fp16_falls_back_on_cpu_only(capsys, monkeypatch):
    monkeypatch.setattr(options, "device_available", lambda device: True)  # as on a machine with an NPU
    assert resolved(["--dtype", "fp16", "--device_target", "Ascend"]).mixed_precision == "fp16"
    assert capsys.readouterr().err == ""
    assert resolved(["--dtype", "fp16", "--device_target", "CPU"]).mixed_precision == "fp32"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --mixed_precision fp16"), err


@pytest.mark.parametrize("extra,message", [
    (["--drop_overflow_update", "False"], "--drop_overflow_update false is not supported"),
    (["--path_column", "dir"], "--path_column 'dir': the label JSON's image path is read from its 'path' key only"),
    (["--scheduler", "cosine_decay"], "argument --scheduler: invalid choice: 'cosine_decay'"),
    (["--clip_grad", "maybe"], "expected true/false (clip at --max_grad_norm) or a norm, got 'maybe'"),
    (["--visualize", "True"], "--visualize true needs --validation_prompts"),
    (["--sample_size", "256", "--model", "PixArt-XL-2-512x512"], "--sample_size 256: no alpha preset"),
    (["--validation_prompts", "a", "b", "--validation_negative_prompts", "x"],
     "--validation_negative_prompts: 1 given for 2 validation prompt(s)"),
    (["--ckpt_save_interval", "0"], "--ckpt_save_interval must be >= 1"),
    (["-c", ROOT / "configs" / "train" / "pixart-sigma-256x256.yaml", "--optim", "adamw", "--betas", "0.9"],
     "--betas: adamw takes 2 value(s), got [0.9]"),
])
def test_flags_we_cannot_honour_exit_1_with_one_line(tmp_path, capsys, extra, message):
    labels = tmp_path / "labels.json"
    labels.write_text("[]")
    assert cli_main(train, ["--json_path", str(labels), "--image_dir", str(tmp_path), *map(str, extra)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert sum(line.startswith("error: ") for line in err) == 1


def test_lora_script_reference_defaults_and_names():
    a = parsed(["--json_path", "x.json"], lora_train.build_parser)
    assert (a.rank, a.lora_alpha, a.lora_targets, a.learning_rate, a.warmup_steps, a.lr_scheduler) == (
        16, None, ["all"], 1e-6, 500, "constant")  # alpha None: alpha = rank, as the reference
    assert (a.batch_size, a.epochs, a.save_every, a.clip_grad, a.max_length, a.output_dir) == (
        16, 100, 500, 1.0, None, "pixart-model-finetuned-lora")
    a = parsed(["--lorarank", "8", "--max_token_length", "120", "--lr_scheduler", "cosine", "--lr_warmup_steps",
                "0", "--mixed_precision", "no", "--validation_epochs", "5", "--checkpoints_total_limit", "10"],
               lora_train.build_parser)
    assert (a.rank, a.max_length, a.lr_scheduler, a.warmup_steps, a.mixed_precision, a.validation_epochs,
            a.keep_last) == (8, 120, "cosine", 0, "fp32", 5, 10)


@pytest.mark.parametrize("extra,message", [
    (["--push_to_hub"], "--push_to_hub: this script does not upload"),
    (["--prediction_type", "v_prediction"], "--prediction_type v_prediction: PixArt predicts epsilon"),
])
def test_lora_reference_options_we_do_not_have_exit_1(tmp_path, capsys, extra, message):
    labels = tmp_path / "labels.json"
    labels.write_text("[]")
    assert cli_main(lora_train, ["--pretrained_model_name_or_path", str(labels), "--json_path", str(labels),
                                 "--image_dir", str(tmp_path), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    a = parsed(["--prediction_type", "epsilon", "--noise_offset", "0.1", "--snr_gamma", "5"], lora_train.build_parser)
    lora_train.check_refused(a)  # what this trainer does anyway, and what it implements, is accepted
    assert (a.noise_offset, a.snr_gamma) == (0.1, 5.0)


def test_lora_fp16_falls_back_on_cpu(capsys):
    a = parsed(["--mixed_precision", "fp16", "--device_target", "CPU"], lora_train.build_parser)
    lora_train.device_fallbacks(a)
    assert a.mixed_precision == "fp32" and capsys.readouterr().err.startswith("warning: --mixed_precision fp16")


@pytest.mark.parametrize("script", ["train", "lora"])
@pytest.mark.parametrize("extra,message", [
    (["--lr_scheduler", "polynomial", "--learning_rate", "1e-8"],
     "--lr_scheduler polynomial decays to 1e-07, so --learning_rate must be larger; got 1e-08"),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "0"], "--lr_num_cycles must be >= 1, got 0"),
    (["--timestep_bias_strategy", "range", "--timestep_bias_begin", "600", "--timestep_bias_end", "400"],
     "--timestep_bias_begin 600 must be below --timestep_bias_end 400"),
    (["--timestep_bias_multiplier", "0"], "--timestep_bias_multiplier"),
    (["--noise_offset", "-0.1"], "--noise_offset"),
])
def test_lr_schedule_settings_diffusers_rejects_exit_1(tmp_path, capsys, script, extra, message):
    labels = tmp_path / "labels.json"
    labels.write_text("[]")
    module, model = (lora_train, ["--pretrained_model_name_or_path", str(labels)]) if script == "lora" else \
        (train, ["--model", "PixArt-XL-2-256x256"])
    assert cli_main(module, [*model, "--json_path", str(labels), "--image_dir", str(tmp_path), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    for name in ("polynomial", "cosine_with_restarts", "linear"):  # every diffusers name parses in both scripts
        assert parsed(["--lr_scheduler", name], module.build_parser).lr_scheduler == name


# ----------------------------------------------------------------------------------------------------------------
# End to end, in a working folder with the reference models/ layout
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """models/ as the reference README lays it out (the demo bundle's files), configs/ of this checkout, 8 labelled
    images at 2 aspect ratios (data/labels.json) and their square half (data/square.json)."""
    from pixart import demo_bundle as demo
    root = tmp_path_factory.mktemp("reference")
    demo.build(root / "demo", log=lambda *_: None)
    models = root / "cwd" / "models"
    models.mkdir(parents=True)
    for name in ("PixArt-Sigma-XL-2-512-MS.ckpt", "PixArt-Sigma-XL-2-256x256.ckpt"):
        (models / name).symlink_to(root / "demo" / demo.CHECKPOINT)
    for part in ("vae", "text_encoder", "tokenizer"):
        (models / part).symlink_to(root / "demo" / demo.COMPONENTS / part)
    (root / "cwd" / "configs").symlink_to(ROOT / "configs")
    labels, images = make_dataset(root / "cwd" / "data", per_kind_and_ratio=2)
    items = json.loads(labels.read_text())
    (root / "cwd" / "data" / "square.json").write_text(json.dumps([i for i in items if i["ratio"] == 1.0]))
    return root / "cwd"


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run_train(cwd, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environment(), timeout=timeout)


def step_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r]


@pytest.mark.slow
@pytest.mark.e2e
def test_reference_training_command_trains_on_cpu(workdir):
    """The README's `python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path ... --image_dir ...`,
    shrunk by `--batch_size 2 --max_steps 2` (the config's batch 48 is more than the 8 test images)."""
    r = run_train(workdir, "-c", "configs/train/pixart-sigma-512-MS.yaml", "--json_path", "data/labels.json",
                  "--image_dir", "data/images", "--batch_size", 2, "--max_steps", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PixArt-Sigma-XL-2-512-MS at 512 px (multi-aspect buckets)" in r.stdout
    assert "loaded pretrained weights models/PixArt-Sigma-XL-2-512-MS.ckpt" in r.stdout
    assert "warning: --mixed_precision fp16" in r.stderr and "Traceback" not in r.stderr
    assert (workdir / "output" / "pixart-sigma-512-MS" / "checkpoints" / "step_00000002" / "model.ckpt").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_reference_msrun_command_with_two_workers(workdir, tmp_path):
    """The README's `msrun --worker_num=8 --local_worker_num=8 --log_dir="log" train.py -c ... --use_parallel True`
    with 2 workers, shrunk by `--batch_size 1 --max_steps 1`: both ranks train, rank 0 saves."""
    out = tmp_path / "out"
    r = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                        f"--log_dir={tmp_path / 'log'}", "--join=True", str(ROOT / "train.py"),
                        "-c", "configs/train/pixart-sigma-512-MS.yaml", "--json_path", "data/labels.json",
                        "--image_dir", "data/images", "--use_parallel", "True", "--batch_size", "1", "--max_steps",
                        "1", "--output_path", str(out)],
                       capture_output=True, text=True, cwd=workdir, env=environment(), timeout=600)
    worker = [(tmp_path / "log" / f"worker_{i}.log").read_text() for i in range(2)]
    assert r.returncode == 0, r.stdout[-2000:] + "\n".join(w[-2000:] for w in worker)
    assert "2 rank(s)" in worker[0] and "[rank 1/2] first batch" in worker[1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]


@pytest.mark.slow
@pytest.mark.e2e
def test_checkpoint_log_and_visualisation_flags(workdir, tmp_path):
    """--ckpt_save_interval counts epochs, --ckpt_max_keep keeps the newest N, --log_loss_interval spaces the log
    lines, --visualize writes validation images every --visualize_interval epochs and at the end (4 square images,
    batch 2: 2 steps an epoch; 5 epochs; `--sampling_steps 2` shrinks the validation sampling; `--mode 1`, PyNative:
    graph compiles would cost more than these few steps)."""
    out = tmp_path / "out"
    r = run_train(workdir, "-c", "configs/train/pixart-sigma-256x256.yaml", "--json_path", "data/square.json",
                  "--image_dir", "data/images", "--batch_size", 2, "--epochs", 5, "--recompute", "False",
                  "--output_path", out, "--ckpt_save_interval", 2, "--ckpt_max_keep", 2, "--log_loss_interval", 4,
                  "--visualize", "True", "--visualize_interval", 2, "--validation_prompts", "a red square",
                  "a blue circle", "--validation_negative_prompts", "blurry", "", "--sampling_method", "ddim",
                  "--sampling_steps", 2, "--guidance_scale", 3.0, "--mode", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = [line.rsplit("/", 1)[1] for line in r.stdout.splitlines() if line.startswith("saved checkpoint")]
    assert saved == ["step_00000004", "step_00000008", "step_00000010"]  # epochs 2, 4 and the last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]
    logged = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("step ")]
    assert logged == ["1/10", "4/10", "8/10", "10/10"]
    for step in (4, 8, 10):
        assert sorted(p.name for p in (out / "validation" / f"step_{step:08d}").iterdir()) == ["00.png", "01.png"]
    assert not (out / "validation" / "step_00000002").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_optimisation_and_precision_flags(workdir, tmp_path):
    """--gradient_accumulation_steps accumulates micro-batches into one step, --clip_grad True clips at
    --max_grad_norm, --dtype fp16 falls back to fp32 on CPU, --scale_window / --loss_scale_factor drive the dynamic
    loss scale, --num_parallel_workers decodes with threads (4 square images, batch 1, one epoch, `--mode 1`)."""
    out = tmp_path / "out"
    r = run_train(workdir, "-c", "configs/train/pixart-sigma-256x256.yaml", "--json_path", "data/square.json",
                  "--image_dir", "data/images", "--batch_size", 1, "--epochs", 1, "--recompute", "False",
                  "--output_path", out, "--gradient_accumulation_steps", 2, "--clip_grad", "True",
                  "--max_grad_norm", 0.5, "--dtype", "fp16", "--loss_scaler_type", "dynamic", "--scale_window", 1,
                  "--loss_scale_factor", 4, "--num_parallel_workers", 2, "--optim", "adamw",
                  "--start_learning_rate", 1e-4, "--auto_lr", "", "--mode", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training steps 1..2: batch 1 x 1 rank(s) x 2 accumulation, 4 batches per epoch" in r.stdout
    assert "adamw lr 0.0001 (warm-up 1000), clip 0.5" in r.stdout and "fp32 + dynamic loss scale" in r.stdout
    assert r.stderr.count("warning: --mixed_precision fp16") == 1
    rows = step_rows(out)
    assert [row["loss_scale"] for row in rows] == [65536.0, 262144.0]  # x4 after a window of 1 finite step


def test_shipped_configs_name_no_device():
    for config in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        values = yaml.safe_load(config.read_text())
        assert "device_target" not in values, config.name
        assert values["checkpoint"].startswith("models/") and values["vae_root"].startswith("models/"), config.name


def test_kv_compression_is_one_checked_constructor_for_sampling_and_training():
    from pixart.cli.options import kv_compress_config
    from pixart.models.pixart import KVCompression
    from pixart.training.setup import model_config
    for argv in (["--kv_compress", "true"], ["--kv_compress", "true", "--kv_compress_scale_factor", "4",
                                              "--kv_compress_layer", "0", "3", "--kv_compress_sampling", "ave"]):
        a = parsed(["--model", "PixArt-Sigma-XL-2-256x256", "--depth", "4", "--hidden_size", "72", *argv])
        assert model_config(a, 64).kv_compress_config == kv_compress_config(a, 4)
    assert kv_compress_config(parsed(["--kv_compress", "true"]), 4) == \
        {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [2, 3]}  # Σ's KV models' layout
    with pytest.raises(ValueError, match=r"^kv_compress_scale_factor 0 is not allowed: an integer >= 1"):
        KVCompression.from_options("conv", 0)
    with pytest.raises(ValueError, match=r"^kv_compress_layer 4 -1: the model has 4 blocks \(layers 0 \.\. 3\)$"):
        KVCompression.from_options("conv", 2, [1, 4, -1], depth=4)
    with pytest.raises(ValueError, match=r"^kv_compress_layer -1: layers are whole numbers from 0$"):
        KVCompression.from_options("conv", 2, [1, -1])  # the depth not known yet: only the sign is checked
    with pytest.raises(ValueError, match=r"^kv_compress_sampling 'max' is not one of conv, ave, uniform$"):
        KVCompression.from_options("max", 2)
