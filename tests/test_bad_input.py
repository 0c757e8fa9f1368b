"""Hostile but realistic input on every entry point: each bad value, file or fault ends with exit status 1, exactly one
`error:` line naming the bad value or file, no traceback, and nothing new in the output folder.

The table runs in this process (`pixart.cli.main` with an argv, stderr captured): most cases are refused by the
options layer (`pixart.cli.options.validate`) before any model loads, so the whole table takes seconds. A handful
of real subprocesses (slow tier) check the same promise as a user sees it. Disk faults: a full disk is simulated by
making the writer raise ENOSPC in-process (that needs no privileges); a read-only file system is a real read-only
tmpfs where the test may mount one (root), else skipped with the reason.
"""
import contextlib
import errno
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixart.cli import convert, extract_features, gradio, lora_inference, lora_train, main, make_labels, sample, train
from pixart.io import read_ckpt, write_ckpt, write_safetensors
from tests.synthetic import make_dataset
from tools import merge_lora

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = str(ROOT / "configs" / "inference" / "demo.yaml")
TINY = ["--model", "PixArt-XL-2-256x256", "--depth", "2", "--hidden_size", "72"]
RUN = {"sample": sample.run, "train": train.run, "lora_train": lora_train.run, "lora_inference": lora_inference.run,
       "extract_features": extract_features.run, "gradio": gradio.serve, "convert": convert.run,
       "make_labels": make_labels.run}
PARSER = {"sample": sample.build_parser, "train": train.build_parser, "lora_train": lora_train.build_parser,
          "lora_inference": lora_inference.build_parser, "extract_features": extract_features.build_parser,
          "gradio": gradio.build_parser, "convert": convert.build_parser, "make_labels": make_labels.build_parser}


def call(script: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of an entry point run in this process with `argv`."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if script == "merge_lora":
                rc = merge_lora.main(argv)
            else:
                rc = main(RUN[script], PARSER[script], None, argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def snapshot(folder: Path) -> set:
    return {(str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


def assert_refused(rc: int, err: str, expect: str, case: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1, f"{case}: exit {rc}\n{err[-2000:]}"
    assert len(errors) == 1, f"{case}: {len(errors)} error lines\n{err[-2000:]}"
    assert "Traceback" not in err, f"{case}: traceback\n{err[-3000:]}"
    assert expect in errors[0], f"{case}: {expect!r} not in {errors[0]!r}"


# ----------------------------------------------------------------------------------------------------------------
# Files the cases use
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    f = dict(root=root, folder=root / "a_folder", file=root / "a_file.txt")
    f["folder"].mkdir()
    f["file"].write_text("not a folder\n")
    rng = np.random.default_rng(0)
    f["labels"], f["images"] = make_dataset(root / "data", per_kind_and_ratio=1, ratios=("1.0",))
    escaping = root / "data" / "escaping.json"
    escaping.write_text(json.dumps([{"path": "../../../../etc/hostname", "prompt": "x"},
                                    {"path": "/etc/hostname", "prompt": "y"}]))
    f["escaping"] = escaping

    nan_lora = root / "nan_lora.safetensors"
    a = rng.standard_normal((4, 72)).astype(np.float32)
    a[1, 3] = np.nan
    write_safetensors({"transformer.blocks.0.attn.qkv.lora_A.weight": a,
                       "transformer.blocks.0.attn.qkv.lora_B.weight": np.zeros((216, 4), np.float32)}, nan_lora)
    f["nan_lora"] = nan_lora
    f["random"] = root / "random.safetensors"
    f["random"].write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    f["list_header"] = root / "list_header.safetensors"
    head = b"[1, 2, 3]"
    f["list_header"].write_bytes(struct.pack("<Q", len(head)) + head)
    f["huge_header"] = root / "huge_header.safetensors"
    f["huge_header"].write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    state = read_ckpt(bundle.checkpoint)
    name = sorted(k for k in state if state[k].dtype == np.float32)[0]
    state[name] = state[name].copy()
    state[name].flat[0] = np.inf
    f["nan_ckpt"], f["nan_name"] = root / "inf.ckpt", name
    write_ckpt(state, f["nan_ckpt"])
    f["random_ckpt"] = root / "random.ckpt"
    f["random_ckpt"].write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())

    def yaml(name, text):
        path = root / f"{name}.yaml"
        path.write_text(text)
        return str(path)
    f["yaml"] = yaml
    run_dir = root / "resume_list"  # a train.py checkpoint whose state.json is a list
    step = run_dir / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text("[1, 2]")
    (step / "model.ckpt").write_bytes(b"")
    (step / "train_state.ckpt").write_bytes(b"")
    f["resume_list"] = run_dir
    return f


def sample_args(bundle, out, *extra):
    return ["-c", DEMO_YAML, *bundle.flags, "--prompt", "x", "--output_path", str(out), "--progress", "false",
            "--sampling_steps", "2", *map(str, extra)]


def train_args(f, out, *extra):
    return [*TINY, "--json_path", str(f["labels"]), "--image_dir", str(f["images"]), "--output_dir", str(out),
            "--max_steps", "1", *map(str, extra)]


# (name, script, argv builder (bundle, files, out) -> argv, text the error line must contain)
CASES = [
    # -- sample.py: numbers -------------------------------------------------------------------------------------
    ("sample_guidance_inf", "sample", lambda b, f, o: sample_args(b, o, "--guidance_scale", "inf"), "--guidance_scale"),
    ("sample_guidance_nan", "sample", lambda b, f, o: sample_args(b, o, "--guidance_scale", "nan"), "nan"),
    ("sample_guidance_negative", "sample", lambda b, f, o: sample_args(b, o, "--guidance_scale", "-2"), "-2"),
    ("sample_steps_1000", "sample", lambda b, f, o: sample_args(b, o, "--sampling_steps", "1000"), "1000"),
    ("sample_steps_million", "sample", lambda b, f, o: sample_args(b, o, "--sampling_steps", "1000000"), "999"),
    ("sample_steps_0", "sample", lambda b, f, o: sample_args(b, o, "--sampling_steps", "0"), "--sampling_steps"),
    ("sample_width_huge", "sample", lambda b, f, o: sample_args(b, o, "--image_width", "100000"), "4096"),
    ("sample_height_negative", "sample", lambda b, f, o: sample_args(b, o, "--image_height", "-64"), "-64"),
    ("sample_height_word", "sample", lambda b, f, o: sample_args(b, o, "--image_height", "big"), "'big'"),
    ("sample_seed_negative", "sample", lambda b, f, o: sample_args(b, o, "--seed", "-1"), "--seed"),
    ("sample_seed_huge", "sample", lambda b, f, o: sample_args(b, o, "--seed", str(2 ** 40)), str(2 ** 40)),
    ("sample_scale_factor_0", "sample", lambda b, f, o: sample_args(b, o, "--sd_scale_factor", "0"),
     "--sd_scale_factor"),
    ("sample_scale_factor_nan", "sample", lambda b, f, o: sample_args(b, o, "--sd_scale_factor", "nan"), "nan"),
    ("sample_kv_layer_99", "sample", lambda b, f, o: sample_args(b, o, "--kv_compress", "true",
                                                                 "--kv_compress_layer", "99"), "99"),
    ("sample_kv_factor_0", "sample", lambda b, f, o: sample_args(b, o, "--kv_compress", "true",
                                                                 "--kv_compress_scale_factor", "0"),
     "--kv_compress_scale_factor"),
    ("sample_lora_scale_inf", "sample", lambda b, f, o: sample_args(b, o, "--lora_scale", "inf"), "--lora_scale"),
    ("sample_batch_0", "sample", lambda b, f, o: sample_args(b, o, "--batch_size", "0"), "--batch_size"),
    ("sample_copies_negative", "sample", lambda b, f, o: sample_args(b, o, "--num_images_per_prompt", "-3"), "-3"),
    ("sample_max_length_0", "sample", lambda b, f, o: sample_args(b, o, "--max_length", "0"), "--max_length"),
    ("sample_max_length_huge", "sample", lambda b, f, o: sample_args(b, o, "--max_length", "100000"), "100000"),
    ("sample_sampler_unknown", "sample", lambda b, f, o: sample_args(b, o, "--sampling_method", "euler"), "euler"),
    ("sample_mode_bad", "sample", lambda b, f, o: sample_args(b, o, "--mode", "7"), "--mode"),
    # -- sample.py: paths ---------------------------------------------------------------------------------------
    ("sample_prompt_path_folder", "sample", lambda b, f, o: sample_args(b, o, "--prompt_path", f["folder"]),
     "a_folder"),
    ("sample_prompt_path_binary", "sample", lambda b, f, o: sample_args(b, o, "--prompt_path", f["random"]),
     "random.safetensors"),
    ("sample_config_folder", "sample", lambda b, f, o: ["-c", str(f["folder"]), "--output_path", str(o)], "a_folder"),
    ("sample_output_is_file", "sample", lambda b, f, o: sample_args(b, f["file"]), "a_file.txt"),
    ("sample_output_under_file", "sample", lambda b, f, o: sample_args(b, f["file"] / "out"), "a_file.txt"),
    ("sample_vae_is_file", "sample", lambda b, f, o: sample_args(b, o, "--vae_root", f["file"]), "a_file.txt"),
    ("sample_checkpoint_missing", "sample", lambda b, f, o: sample_args(b, o, "--checkpoint", f["root"] / "no.ckpt"),
     "no.ckpt"),
    # -- sample.py: YAML types ----------------------------------------------------------------------------------
    ("yaml_height_list", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("h", "image_height: [64, 64]\n")),
     "image_height"),
    ("yaml_sampler_unknown", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("s", "sampling_method: euler\n")),
     "euler"),
    ("yaml_guidance_inf", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("g", "guidance_scale: .inf\n")),
     "--guidance_scale"),
    ("yaml_seed_bool", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("b", "seed: true\n")), "seed"),
    ("yaml_steps_mapping", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("m", "sampling_steps: {a: 1}\n")),
     "sampling_steps"),
    ("yaml_unknown_key", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("u", "sampling_stepz: 3\n")),
     "sampling_stepz"),
    ("yaml_top_level_list", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("l", "- 1\n- 2\n")), "l.yaml"),
    ("yaml_not_yaml", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("n", "a: [\n")), "n.yaml"),
    ("yaml_steps_words", "sample", lambda b, f, o: sample_args(b, o, "-c", f["yaml"]("w", "sampling_steps: many\n")),
     "many"),
    # -- train.py -----------------------------------------------------------------------------------------------
    ("train_lr_inf", "train", lambda b, f, o: train_args(f, o, "--learning_rate", "inf"), "--learning_rate"),
    ("train_lr_nan", "train", lambda b, f, o: train_args(f, o, "--learning_rate", "nan"), "nan"),
    ("train_lr_0", "train", lambda b, f, o: train_args(f, o, "--learning_rate", "0"), "--learning_rate"),
    ("train_ema_rate", "train", lambda b, f, o: train_args(f, o, "--ema_rate", "1.5"), "--ema_rate"),
    ("train_dropout_prob", "train", lambda b, f, o: train_args(f, o, "--class_dropout_prob", "2"),
     "--class_dropout_prob"),
    ("train_betas_inf", "train", lambda b, f, o: train_args(f, o, "--betas", "0.9", "inf"), "--betas"),
    ("train_seed_negative", "train", lambda b, f, o: train_args(f, o, "--seed", "-1"), "--seed"),
    ("train_validation_steps", "train", lambda b, f, o: train_args(f, o, "--sampling_steps", "5000"), "5000"),
    ("train_loss_scale_factor", "train", lambda b, f, o: train_args(f, o, "--loss_scale_factor", "1"),
     "--loss_scale_factor"),
    ("train_init_loss_scale", "train", lambda b, f, o: train_args(f, o, "--init_loss_scale=-inf"), "-inf"),
    ("train_scale_factor_0", "train", lambda b, f, o: train_args(f, o, "--sd_scale_factor", "0"), "--sd_scale_factor"),
    ("train_kv_layer", "train", lambda b, f, o: train_args(f, o, "--kv_compress", "true", "--kv_compress_layer", "5"),
     "5"),
    ("train_json_folder", "train", lambda b, f, o: train_args(f, o, "--json_path", f["folder"]), "a_folder"),
    ("train_output_is_file", "train", lambda b, f, o: train_args(f, f["file"]), "a_file.txt"),
    ("train_yaml_max_steps_list", "train",
     lambda b, f, o: train_args(f, o, "-c", f["yaml"]("t1", "max_steps: [1, 2]\n")), "max_steps"),
    ("train_yaml_optimizer", "train", lambda b, f, o: train_args(f, o, "-c", f["yaml"]("t2", "optimizer: sgd\n")),
     "sgd"),
    ("train_state_json_list", "train",
     lambda b, f, o: train_args(f, f["resume_list"], "--resume", "latest", "--mode", "pynative"), "state.json"),
    # -- the LoRA training script -------------------------------------------------------------------------------
    ("lora_train_lr_inf", "lora_train",
     lambda b, f, o: ["--pretrained_model_name_or_path", str(b.checkpoint), "--json_path", str(f["labels"]),
                      "--image_dir", str(f["images"]), "--output_dir", str(o), "--learning_rate", "inf"],
     "--learning_rate"),
    ("lora_train_rank_0", "lora_train",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--json_path", str(f["labels"]), "--output_dir", str(o),
                      "--rank", "0"], "--rank"),
    ("lora_train_alpha_nan", "lora_train",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--json_path", str(f["labels"]), "--output_dir", str(o),
                      "--lora_alpha", "nan"], "--lora_alpha"),
    ("lora_train_beta2_1", "lora_train",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--json_path", str(f["labels"]), "--output_dir", str(o),
                      "--adam_beta2", "1"], "--adam_beta2"),
    ("lora_train_epsilon_0", "lora_train",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--json_path", str(f["labels"]), "--output_dir", str(o),
                      "--adam_epsilon", "0"], "--adam_epsilon"),
    ("lora_train_grad_norm", "lora_train",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--json_path", str(f["labels"]), "--output_dir", str(o),
                      "--max_grad_norm", "-1"], "--max_grad_norm"),
    ("lora_train_output_file", "lora_train",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--json_path", str(f["labels"]), "--output_dir",
                      str(f["file"])], "a_file.txt"),
    # -- the LoRA inference script ------------------------------------------------------------------------------
    ("lora_inference_scale_inf", "lora_inference",
     lambda b, f, o: sample_args(b, o / "x.png", "--lora_path", f["nan_lora"], "--lora_scale", "inf"),
     "--lora_scale"),
    ("lora_inference_nan", "lora_inference", lambda b, f, o: sample_args(b, o / "x.png", "--lora_path", f["nan_lora"]),
     "nan_lora"),
    ("lora_inference_list_header", "lora_inference",
     lambda b, f, o: sample_args(b, o / "x.png", "--lora_path", f["list_header"]), "list_header"),
    ("lora_inference_huge_header", "lora_inference",
     lambda b, f, o: sample_args(b, o / "x.png", "--lora_path", f["huge_header"]), "huge_header"),
    ("lora_inference_random", "lora_inference",
     lambda b, f, o: sample_args(b, o / "x.png", "--lora_path", f["random"]), "random.safetensors"),
    ("lora_inference_output_under_file", "lora_inference",
     lambda b, f, o: sample_args(b, f["file"] / "x.png", "--lora_path", f["nan_lora"]), "a_file.txt"),
    # -- tools/extract_features.py ------------------------------------------------------------------------------
    ("features_output_file", "extract_features",
     lambda b, f, o: ["--json_path", str(f["labels"]), "--image_dir", str(f["images"]), "--output_dir",
                      str(f["file"])], "a_file.txt"),
    ("features_shard", "extract_features",
     lambda b, f, o: ["--json_path", str(f["labels"]), "--output_dir", str(o / "c"), "--num_shards", "2",
                      "--shard_id", "5"], "--shard_id"),
    ("features_batch_0", "extract_features",
     lambda b, f, o: ["--json_path", str(f["labels"]), "--output_dir", str(o / "c"), "--batch_size", "0"],
     "--batch_size"),
    ("features_json_folder", "extract_features",
     lambda b, f, o: ["--json_path", str(f["folder"]), "--output_dir", str(o / "c")], "a_folder"),
    ("features_image_dir_file", "extract_features",
     lambda b, f, o: ["--json_path", str(f["labels"]), "--image_dir", str(f["file"]), "--output_dir", str(o / "c")],
     "a_file.txt"),
    # -- gradio_demo.py -----------------------------------------------------------------------------------------
    ("gradio_port_0", "gradio", lambda b, f, o: sample_args(b, o, "--port", "0"), "--port"),
    ("gradio_port_huge", "gradio", lambda b, f, o: sample_args(b, o, "--port", "70000"), "70000"),
    ("gradio_max_image_size", "gradio", lambda b, f, o: sample_args(b, o, "--max_image_size", "100000"),
     "--max_image_size"),
    ("gradio_guidance_nan", "gradio", lambda b, f, o: sample_args(b, o, "--guidance_scale", "nan"), "nan"),
    # -- tools/convert.py, tools/merge_lora.py, tools/make_labels.py --------------------------------------------
    ("convert_inf_weights", "convert", lambda b, f, o: ["-s", str(f["nan_ckpt"]), "-t", str(o / "x.ckpt")],
     "non-finite"),
    ("convert_random", "convert", lambda b, f, o: ["-s", str(f["random"]), "-t", str(o / "x.ckpt")],
     "random.safetensors"),
    ("convert_list_header", "convert", lambda b, f, o: ["-s", str(f["list_header"]), "-t", str(o / "x.ckpt")],
     "list_header"),
    ("convert_target_under_file", "convert",
     lambda b, f, o: ["-s", str(b.checkpoint), "-t", str(f["file"] / "x.ckpt")], "a_file.txt"),
    ("merge_lora_scale_inf", "merge_lora",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--lora_path", str(f["nan_lora"]), "--target",
                      str(o / "m.ckpt"), "--lora_scale", "inf"], "--lora_scale"),
    ("merge_lora_nan", "merge_lora",
     lambda b, f, o: ["--checkpoint", str(b.checkpoint), "--lora_path", str(f["nan_lora"]), "--target",
                      str(o / "m.ckpt")], "nan_lora"),
    ("make_labels_output_folder", "make_labels",
     lambda b, f, o: ["--image_dir", str(f["images"]), "--output", str(f["folder"])], "a_folder"),
    ("make_labels_image_dir_file", "make_labels",
     lambda b, f, o: ["--image_dir", str(f["file"]), "--output", str(o / "l.json")], "a_file.txt"),
]


# cases that load a model first (seconds each): the weights themselves are bad
LOADING_CASES = [
    ("sample_checkpoint_inf", "sample", lambda b, f, o: sample_args(b, o, "--checkpoint", f["nan_ckpt"]), "inf.ckpt"),
    ("sample_checkpoint_random", "sample", lambda b, f, o: sample_args(b, o, "--checkpoint", f["random_ckpt"]),
     "random.ckpt"),
    ("sample_lora_nan", "sample", lambda b, f, o: sample_args(b, o, "--lora_path", f["nan_lora"]), "lora_A"),
]


def test_the_tables_have_every_entry_point_and_60_cases():
    names = [c[0] for c in CASES + LOADING_CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert {c[1] for c in CASES} == set(RUN) | {"merge_lora"}


def test_every_bad_input_is_one_error_line_exit_1_and_writes_nothing(bundle, files, tmp_path):
    check_table(CASES, bundle, files, tmp_path)


@pytest.mark.slow
def test_bad_weights_are_one_error_line_after_loading(bundle, files, tmp_path):
    check_table(LOADING_CASES, bundle, files, tmp_path)


def check_table(cases, bundle, files, tmp_path):
    failures = []
    for name, script, argv, expect in cases:
        out = tmp_path / name
        out.mkdir()
        watched = [out, files["root"]]
        args = argv(bundle, files, out)
        before = [snapshot(w) for w in watched]
        rc, err = call(script, args)
        try:
            assert_refused(rc, err, expect, name)
            assert [snapshot(w) for w in watched] == before, f"{name}: files written"
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_handful_of_cases_as_a_user_runs_them(bundle, files, tmp_path):
    """Real processes: the scripts themselves, not only `pixart.cli.main`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for script, argv, expect in [
            ("sample.py", sample_args(bundle, tmp_path, "--guidance_scale", "inf"), "--guidance_scale"),
            ("tools/extract_features.py", ["--json_path", str(files["folder"]), "--output_dir", str(tmp_path / "c")],
             "a_folder")]:
        r = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
        assert_refused(r.returncode, r.stderr, expect, script)
        assert not list(tmp_path.iterdir()), script


# ----------------------------------------------------------------------------------------------------------------
# Label paths stay inside --image_dir; long prompts warn
# ----------------------------------------------------------------------------------------------------------------
def test_label_paths_outside_the_image_folder_are_skipped_like_missing_images(files, tmp_path, monkeypatch):
    from pixart.data import sources
    items = json.loads(files["labels"].read_text())
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(items + json.loads(files["escaping"].read_text())))
    opened = []
    real_open = sources.Image.open
    monkeypatch.setattr(sources.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    found, skipped = sources.label_items(sources.LabelSource(labels, files["images"]))
    assert [i["path"] for i in found] == [i["path"] for i in items]
    assert [(s.path, s.reason) for s in skipped] == [("../../../../etc/hostname", "missing"), ("/etc/hostname", "missing")]
    assert not any("hostname" in p for p in opened)


class WordTokenizer:
    """The two calls `warn_truncated` makes of a Hugging Face tokenizer, one token per word plus </s> (the real
    tokenizer runs in every sample.py case above)."""

    def __call__(self, prompts, add_special_tokens, truncation, verbose):
        return {"input_ids": [p.split() + ["</s>"] for p in prompts]}

    def decode(self, ids, skip_special_tokens):
        return " ".join(i for i in ids if i != "</s>")


def test_a_prompt_longer_than_the_token_limit_warns_once(capsys):
    from pixart.pipelines.text_to_image import warn_truncated
    warn_truncated(WordTokenizer(), ["a red square", "a red square " * 40], 16)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: a prompt has ") and "16" in lines[0], lines


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: failed saves leave nothing, killed saves are cleaned up, diverged runs are never saved
# ----------------------------------------------------------------------------------------------------------------
def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_saves_leave_nothing_behind_on_failure_and_re_save(tmp_path):
    from pixart.training import checkpoint as ckpt
    root = tmp_path / "checkpoints"
    w = {"w": np.ones(3, np.float32)}

    def save(step, state=w):
        return ckpt.save(root, step, state, None, {"t": np.zeros(1, np.float32)}, {"step": step, "batches_done": step})
    save(2)
    save(2)  # re-saving a step: swapped, nothing left over
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]

    def failing(folder):
        (folder / "model.ckpt").write_bytes(b"partial")
        _enospc()
    with pytest.raises(OSError, match="No space"):
        ckpt.save_folder(root, 4, failing)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert ckpt.digest(ckpt.load(root / "step_00000002")["model"]) == ckpt.digest(w)

    bad = {"w": np.array([1.0, np.nan, 2.0], np.float32)}
    with pytest.raises(ckpt.NonFiniteError, match="model weight w is not finite"):
        save(6, bad)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_leftovers_of_killed_saves_are_cleaned_at_the_next_start(tmp_path):
    from pixart.training import checkpoint as ckpt
    root = tmp_path
    for name in (".step_00000004.tmp", ".step_00000006.old", ".step_00000002.old", "step_00000002"):
        (root / name).mkdir()
        (root / name / "state.json").write_text(json.dumps({"step": 1, "batches_done": 1}))
    (root / ".notes.tmp").mkdir()  # not ours: kept
    done = ckpt.clean_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == [".notes.tmp", "step_00000002", "step_00000006"]
    assert len(done) == 3 and any("restored" in line for line in done)


def test_state_json_of_the_wrong_shape_is_one_checkpoint_error(tmp_path):
    from pixart.io import CheckpointError
    from pixart.training.checkpoint import read_state
    for text, expect in [("[1, 2]", "got a list"), ('{"step": "2", "batches_done": 1}', "'step'"),
                         ('{"step": 2}', "'batches_done'"), ("{", "not valid JSON"), ("\xff\xfe", "not valid JSON"),
                         ('{"step": 1, "batches_done": 1, "data": []}', "'data'")]:
        (tmp_path / "state.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(CheckpointError, match=expect.replace("(", r"\(")):
            read_state(tmp_path)


def test_a_diverging_loss_stops_with_one_error():
    from pixart.training.checkpoint import NonFiniteError, check_finite_step
    check_finite_step(3, 0.5, True, dynamic=False)
    check_finite_step(3, float("nan"), False, dynamic=True)  # fp16: the loss scale backs off, the step is skipped
    with pytest.raises(NonFiniteError, match="step 3: the loss is nan"):
        check_finite_step(3, float("nan"), True, dynamic=False)
    with pytest.raises(NonFiniteError, match="gradients are not finite"):
        check_finite_step(3, 0.5, False, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# Read-only output folders (refused before anything loads) and a full disk (partial files removed)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write in: chmod for a normal user; as root (whom chmod does not stop) a read-only tmpfs
    mounted there, where the test may mount one."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"running as root, where chmod does not stop writes, and tmpfs cannot be mounted here "
                    f"({r.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_output_folders_are_refused_before_loading(bundle, files, read_only):
    for script, argv in [
            ("sample", sample_args(bundle, read_only / "out")),
            ("train", train_args(files, read_only / "run")),
            ("extract_features", ["--json_path", str(files["labels"]), "--output_dir", str(read_only / "cache")]),
            ("lora_inference", sample_args(bundle, read_only / "x.png", "--lora_path", files["nan_lora"])),
            ("make_labels", ["--image_dir", str(files["images"]), "--output", str(read_only / "labels.json")]),
            ("convert", ["-s", str(bundle.checkpoint), "-t", str(read_only / "x.ckpt")])]:
        rc, err = call(script, argv)
        assert_refused(rc, err, str(read_only), script)
        assert "not writable" in err, err
    assert not list(read_only.iterdir())


def _partial_then_enospc(write):
    """`write`'s stand-in on a disk that fills up: it writes a few bytes to its target, then fails as the OS does."""
    def full(*args, **kwargs):
        target = next((a for a in [*args, *kwargs.values()] if isinstance(a, (str, Path)) and
                       ("/" in str(a))), None)
        if target is not None:
            Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return full


def hidden_or_partial(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (yields True), or nothing mounted where this process may not mount
    (yields False)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                    str(folder)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
def test_sample_and_extract_features_on_a_full_disk(bundle, files, tmp_path, monkeypatch):
    """sample.py on a real full disk where a small tmpfs can be mounted (prompts.json fits, a PNG does not), else
    with ENOSPC raised by the PNG writer in-process; extract_features with ENOSPC raised by NumPy's writer
    in-process. One error line each, no partial file."""
    from PIL import Image
    out = tmp_path / "samples"
    with small_tmpfs(out, "24k") as mounted, monkeypatch.context() as m:
        if not mounted:
            m.setattr(Image.Image, "save", lambda self, fp, *a, **k: _partial_then_enospc(None)(fp))
        rc, err = call("sample", sample_args(bundle, out))
        assert_refused(rc, err, "no space left on device", f"sample ({'tmpfs' if mounted else 'simulated'})")
        assert not list(out.glob("*.png")) and not hidden_or_partial(out)

    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(np, "savez", lambda file, **arrays: _partial_then_enospc(None)(file))
        rc, err = call("extract_features", ["--json_path", str(files["labels"]), "--image_dir", str(files["images"]),
                                            "--output_dir", str(cache), "--resolution", "256", "--max_length", "120",
                                            "--vae_root", str(bundle.components / "vae"),
                                            "--text_encoder_root", str(bundle.components / "text_encoder"),
                                            "--tokenizer_root", str(bundle.components / "tokenizer")])
    assert_refused(rc, err, "no space left on device", "extract_features")
    assert not list(cache.rglob("*.npz")) and not hidden_or_partial(cache)


@pytest.mark.slow
@pytest.mark.e2e
def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes_exactly(bundle, tmp_path, monkeypatch):
    """The save of step 4 hits ENOSPC (MindSpore's writer made to fail in-process, after leaving its partial file as
    it does on a real full disk): one error line, step 2 intact, nothing partial; `--resume latest` then finishes
    with the losses of an uninterrupted run. Then a diverging continuation (fp32, no loss scale to back off) stops
    with one error line and leaves the last good checkpoint as it was."""
    import mindspore as ms
    labels, images = make_dataset(tmp_path / "data", per_kind_and_ratio=2, ratios=("1.0",))
    comp = bundle.components
    common = [*TINY, "--json_path", str(labels), "--image_dir", str(images), "--vae_root", str(comp / "vae"),
              "--text_encoder_root", str(comp / "text_encoder"), "--tokenizer_root", str(comp / "tokenizer"),
              "--max_length", "120", "--mode", "pynative", "--batch_size", "2", "--max_steps", "4",
              "--save_every", "2", "--keep_last", "0", "--log_every", "1", "--learning_rate", "1e-3",
              "--warmup_steps", "0"]

    def losses(run):
        rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "step" in r}

    full = tmp_path / "full"
    assert call("train", [*common, "--output_dir", str(full)])[0] == 0
    part = tmp_path / "part"
    real_save = ms.save_checkpoint

    def fills_up(data, path, *a, **k):
        if "step_00000004" in str(path):
            Path(str(path)[:-len(".ckpt")] + ".tmp").write_bytes(b"partial")  # MindSpore's own temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(data, path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(ms, "save_checkpoint", fills_up)
        rc, err = call("train", [*common, "--output_dir", str(part)])
    assert_refused(rc, err, "no space left on device", "train")
    checkpoints = part / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]
    from pixart.training import checkpoint as ckpt
    for name in ("model.ckpt", "ema.ckpt", "train_state.ckpt"):
        assert ckpt.digest(read_ckpt(checkpoints / "step_00000002" / name)) == \
            ckpt.digest(read_ckpt(full / "checkpoints" / "step_00000002" / name)), name

    rc, err = call("train", [*common, "--output_dir", str(part), "--resume", "latest"])
    assert rc == 0, err[-3000:]
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in a), (a, b)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    assert not hidden_or_partial(part / "checkpoints")

    # a learning rate that blows the weights up: the run stops at the first non-finite loss, before any save
    last_good = ckpt.digest(read_ckpt(checkpoints / "step_00000004" / "model.ckpt"))
    rc, err = call("train", [*common, "--output_dir", str(part), "--resume", "latest", "--max_steps", "8",
                             "--learning_rate", "1e30"])
    assert_refused(rc, err, "the run diverged", "train (diverging)")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    assert ckpt.digest(read_ckpt(checkpoints / "step_00000004" / "model.ckpt")) == last_good


def test_a_new_option_declares_its_range_and_path_kind_once(tmp_path):
    """What another entry point's new option needs: `type=Number(...)` (or a `LIMITS` entry by dest) and `PATHS` /
    `path_kind`; flags, YAML values and defaults are then checked alike."""
    from pixart.cli.options import ArgumentParser, ConfigError, Number, parse_args, path_kind

    def parser():
        p = ArgumentParser()
        p.add_argument("--strength_like", type=Number(float, low=0, high=1), default=0.5)
        p.add_argument("--count", type=Number(int, low=1), default=1)
        path_kind(p.add_argument("--out", default=str(tmp_path / "o")), "out_dir")
        p.add_argument("--mask_image", default=None)  # PATHS: a file
        return p
    assert parse_args(parser(), ["--strength_like", "1"]).strength_like == 1.0
    for argv, message in [(["--strength_like", "1.5"], "--strength_like must be in [0, 1], got 1.5"),
                          (["--strength_like", "nan"], "--strength_like must be a finite number, got nan"),
                          (["--count", "0"], "--count must be >= 1, got 0"),
                          (["--out", str(tmp_path / "f.txt")], "is a file; expected a folder"),
                          (["--mask_image", str(tmp_path)], "is a folder; expected a file")]:
        (tmp_path / "f.txt").write_text("x")
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            parse_args(parser(), argv)
    config = tmp_path / "c.yaml"
    for text, message in [("count: 2.5\n", "whole number"), ("count: [1, 2]\n", "expected one value"),
                          ("strength_like: 7\n", r"must be in \[0, 1\], got 7.0")]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_args(parser(), ["-c", str(config)])
    p = parser()
    p.set_defaults(strength_like=2.0)  # a default is checked too
    with pytest.raises(ConfigError, match="got 2.0"):
        parse_args(p, [])
