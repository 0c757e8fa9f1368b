"""sample.py end to end on the demo bundle: files, PNG metadata, grid, resolution binning, graph mode, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart import demo_bundle as demo
from pixart.pipelines.outputs import read_png_settings
from tests.utils import exit_status

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "inference" / "demo.yaml"


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", "-c", str(CONFIG), "--progress", "false", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.slow
@pytest.mark.e2e
def test_sample_writes_images_metadata_and_grid(bundle, tmp_path, mode):
    out = tmp_path / "out"
    r = sample(*bundle.flags, "--prompt", "a red square", "a blue circle", "--image_height", 200, "--image_width", 328,
               "--sampling_steps", 3, "--seed", 7, "--imagegrid", "true", "--batch_size", 2, "--mode", mode,
               "--output_path", out)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 2 and (out / "grid.png").exists()
    for png, prompt, seed in zip(pngs, ["a red square", "a blue circle"], [7, 8]):
        with Image.open(png) as im:
            assert im.size == (328, 200)  # binned to a trained ratio, then resized and cropped back exactly
            pixels = np.asarray(im)
        assert pixels.std() > 0  # an image, not a constant
        s = read_png_settings(png)
        assert (s["prompt"], s["seed"], s["sampler"], s["steps"], s["guidance_scale"]) == (prompt, seed, "dpm", 3, 4.5)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 328, 200)  # one batch of two prompts: one row, a column each
    records = json.loads((out / "prompts.json").read_text())
    assert [r["file"] for r in records] == [p.name for p in pngs]
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.e2e
def test_same_seed_same_image_and_samplers_run(bundle, tmp_path):
    outs = []
    for i, method in enumerate(["ddim", "ddim", "iddpm", "sa"]):
        out = tmp_path / f"o{i}"
        r = sample(*bundle.flags, "--prompt", "a cat", "--sampling_method", method, "--sampling_steps", 2,
                   "--image_height", 64, "--image_width", 64, "--resolution_binning", "false", "--output_path", out,
                   "--mode", "pynative")  # a graph compile per run would cost more than 2 steps; graph: test above
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(np.asarray(Image.open(next(out.glob("0000*.png")))))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


BAD_INPUT = [
    ([], "no prompt"),
    (["--prompt_path", "EMPTY"], "has no prompts"),
    (["--prompt", "x", "--sampling_method", "euler"], "invalid choice: 'euler'"),
    (["--prompt", "x", "--image_height", 4], "at least 8 pixels"),
    (["--prompt", "x", "--image_height", 72, "--image_width", 64, "--resolution_binning", "false"], "not reachable"),
    (["--prompt", "x", "--checkpoint", "missing.ckpt"], "--checkpoint not found: missing.ckpt"),
    (["--prompt", "x", "--device_target", "Ascend"], "MindSpore finds no Ascend device on this machine"),
    (["--prompt", "x", "y", "z", "--negative_prompt", "n1", "n2"], "--negative_prompt: got 2 for 3 prompts"),
    (["--prompt", "x", "--sample_size", "128"], "--sample_size 128 does not match --model"),
    (["--prompt", "x", "--model", "PixArt-XL-2-1024-MS"], "does not fit model PixArt-XL-2-1024-MS"),
]


def bad_input_argv(bundle, tmp_path, args) -> list[str]:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    return ["-c", str(CONFIG), "--progress", "false", *bundle.flags, *[str(empty) if a == "EMPTY" else str(a)
                                                                      for a in args],
            "--output_path", str(tmp_path / "out"), "--sampling_steps", "1"]


def assert_refused(status: int, stderr: str, message: str, out: Path) -> None:
    assert status == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert message in last, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_1_with_one_line(bundle, tmp_path, graph_mode, capsys, args, message):
    """sample.py's main in this process (a real process per case would cost seconds of start-up each; the test
    below runs one as a user does). demo.yaml asks for graph mode: `graph_mode` restores PyNative afterwards."""
    import sample as script
    status = exit_status(script.main, bad_input_argv(bundle, tmp_path, args))
    assert_refused(status, capsys.readouterr().err, message, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.e2e
def test_bad_input_exits_1_with_one_line_as_a_user_runs_it(bundle, tmp_path):
    args, message = BAD_INPUT[5]
    r = subprocess.run([sys.executable, "sample.py", *bad_input_argv(bundle, tmp_path, args)], capture_output=True,
                       text=True, cwd=ROOT)
    assert_refused(r.returncode, r.stderr, message, tmp_path / "out")


@pytest.mark.e2e
def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prompt: [a]\nsampling_stepz: 3\n")
    r = subprocess.run([sys.executable, "sample.py", "-c", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "unknown key(s) sampling_stepz" in r.stderr and "Traceback" not in r.stderr


def test_prompts_are_encoded_first_and_t5_is_freed(bundle, graph_mode, monkeypatch):
    """sample.py loads T5 alone, encodes, and frees it before the transformer loads. In graph mode a compiled T5
    would keep its weights alive after `del`, so encoding runs eagerly: every T5 Parameter must be gone."""
    import gc
    import weakref
    from pixart.cli import sample as sample_run
    from pixart.cli.options import parse_args
    from pixart.pipelines.text_to_image import PixArtPipeline
    load, params = sample_run.load_t5, []

    def load_and_watch(*a, **k):
        model = load(*a, **k)
        params.extend(weakref.ref(p) for p in model.get_parameters())
        return model
    monkeypatch.setattr(sample_run, "load_t5", load_and_watch)  # the name sample.py's code calls
    args = parse_args(sample_run.build_parser(), ["-c", str(CONFIG), *bundle.flags, "--mode", "graph", "--prompt", "x",
                                                  "--uncond", "negative"])  # the demo config samples with y_embedding
    embeds, negative = sample_run.encode_first(args, ["a red square", "a blue circle"], log=lambda *_: None)
    gc.collect()
    assert params and not any(p() is not None for p in params)

    pipe = sample_run.load_pipeline(args, log=lambda *_: None)  # with T5: the embeddings are the pipeline's own
    assert isinstance(pipe, PixArtPipeline) and pipe.text_encoder is not None
    for prompt, (emb, mask) in zip(["a red square", "a blue circle"], embeds):
        ref_emb, ref_mask = pipe.encode_prompt([prompt])
        np.testing.assert_array_equal(mask, ref_mask)
        np.testing.assert_allclose(emb, ref_emb, rtol=0, atol=0)
    assert negative[0][0].shape == embeds[0][0].shape
    assert sample_run.load_pipeline(args, log=lambda *_: None, text_encoder=False).text_encoder is None
