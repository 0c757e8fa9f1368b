"""train.py --controlnet end to end with the demo bundle as the frozen base: exact resume after a kill, msrun data
parallel equal to one process, the base weights untouched, bad input.

Condition images come from --control_dir (the synthetic shapes' own images, --control_type none), so these runs need
no edge extractor; PyNative keeps each run free of graph compilation.
"""
import sys

import pytest

from pixart import demo_bundle as demo
from pixart.io import read_ckpt
from tests.synthetic import make_dataset
from tests.test_train import (ROOT, assert_same_run, check_data_parallel, kill_after_checkpoint, msrun_two_workers,
                              run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-train")
    comp = demo.build(root / "demo", log=lambda *_: None) / demo.COMPONENTS
    labels, images = make_dataset(root / "data", per_kind_and_ratio=2, ratios=("1.0",))  # 4 images, one bucket
    return dict(root=root, common=[
        "--model", demo.PRESET, "--load_from", root / "demo" / demo.CHECKPOINT, "--vae_root", comp / "vae",
        "--text_encoder_root", comp / "text_encoder", "--tokenizer_root", comp / "tokenizer", "--json_path", labels,
        "--image_dir", images, "--controlnet", "--control_dir", images, "--mode", "pynative", "--learning_rate",
        1e-3, "--warmup_steps", 1, "--real_prompt_ratio", 0.5, "--param_digest", "true", "--log_every", 1])


@pytest.mark.slow
@pytest.mark.e2e
def test_controlnet_resume_after_kill_equals_an_uninterrupted_run(data, tmp_path):
    k = 2
    common = [*data["common"], "--batch_size", 2, "--max_steps", 2 * k, "--save_every", k, "--keep_last", 0]
    full = tmp_path / "full"
    r = run("train.py", *common, "--output_dir", full)
    assert r.returncode == 0, r.stderr[-3000:]
    base_digest = next(ln for ln in r.stdout.splitlines() if "base weights digest" in ln).rsplit(" ", 1)[1]
    assert (full / "controlnet.ckpt").is_file()
    assert set(read_ckpt(full / "controlnet.ckpt")) == set(read_ckpt(full / "checkpoints" / "step_00000004" /
                                                                      "model.ckpt"))
    assert all(n.startswith("controlnet.") for n in read_ckpt(full / "controlnet.ckpt"))

    part = tmp_path / "part"
    marker = kill_after_checkpoint(k, *common, "--output_dir", part)
    r = run("train.py", *common, "--output_dir", part, "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {marker.parent}: step {k}" in r.stdout
    assert f"base weights digest {base_digest}" in r.stdout  # the base stays frozen

    assert_same_run(full, part, 2 * k)


@pytest.mark.slow
@pytest.mark.e2e
def test_controlnet_msrun_equals_one_process(data, tmp_path):
    common = [*map(str, data["common"]), "--max_steps", "2"]
    single = tmp_path / "single"
    r1 = run("train.py", *common, "--batch_size", 4, "--output_dir", single)
    assert r1.returncode == 0, r1.stderr[-3000:]
    dp = tmp_path / "dp"
    worker = msrun_two_workers(tmp_path / "logs", *common, "--batch_size", 2, "--output_dir", dp)
    diff = check_data_parallel(single, r1.stdout, dp, worker)
    print(f"msrun vs one process: max |control-branch weight difference| {diff:.2e}")


@pytest.mark.parametrize("extra, message", [
    (["--control_dir", "{root}/nowhere"], "--control_dir not found: {root}/nowhere"),
    (["--control_type", "hed"], "--control_type hed needs HED maps made beforehand, as images under --control_dir"),
    (["--recompute", "true"], "--recompute with --controlnet"),
    (["--copy_blocks_num", "0"], "--copy_blocks_num must be >= 1, got 0"),
])
def test_controlnet_train_bad_input(tmp_path, capsys, extra, message):
    """One line, exit 1, before any model loads."""
    sys.path.insert(0, str(ROOT))
    import train
    (tmp_path / "vae").mkdir()
    status = train.main(["--model", demo.PRESET, "--controlnet", "--vae_root", str(tmp_path / "vae"),
                         *[e.format(root=tmp_path) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and message.format(root=tmp_path) in err[0], err
