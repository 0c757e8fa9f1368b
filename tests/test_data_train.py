"""Training from every data source, end to end (subprocesses, as a user runs them): the same 16 images and captions
in six formats give bit-identical losses; a webdataset run resumed mid-epoch repeats an uninterrupted one; two
msrun ranks on webdataset shards each train their own shards; the
reference README's LoRA command trains from a local `datasets` folder in the layout of
svjack/pokemon-blip-captions-en-zh and writes TensorBoard events that TensorBoard's EventAccumulator reads back;
bad data input exits 1 with one line before anything is written."""
import json
import subprocess
from pathlib import Path

import numpy as np

import pytest

from pixart import demo_bundle as demo
from tests.data_formats import as_argv, write_formats
from tests.test_train import ROOT, _free_port, compile_cache, environment, losses, read_ckpt, run
from tests.utils import exit_status

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
LORA_SCRIPT = "pixart/lora-finetuning/train_pixart_lora.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-train")
    demo.build(root / "demo", log=lambda *_: None)
    comp = root / "demo" / demo.COMPONENTS
    return dict(root=root, formats=write_formats(root / "formats"), comp=comp,
                ckpt=root / "demo" / demo.CHECKPOINT, env=compile_cache(root / "compile_cache"),
                encoders=["--vae_root", comp / "vae", "--text_encoder_root", comp / "text_encoder",
                          "--tokenizer_root", comp / "tokenizer"])


def tiny(setup, out, *extra):
    """A tiny train.py run in PyNative mode: these tests are about the data layer, and a graph compile per run would
    cost more than the run (graph-mode training is tests/test_train.py's)."""
    return ["--model", "PixArt-XL-2-256x256", "--multi_scale", "true", "--depth", 2, "--hidden_size", 72,
            *setup["encoders"], "--max_length", 120, "--batch_size", 4, "--learning_rate", 1e-3,
            "--warmup_steps", 0, "--max_steps", 4, "--log_every", 1, "--use_ema", "false", "--mode", "pynative",
            "--output_dir", out, *extra]


def test_every_source_trains_to_the_same_losses_and_a_shard_run_resumes_exactly(setup):
    results = {}
    for name, options in setup["formats"].items():
        out = setup["root"] / f"run-{name}"
        r = run("train.py", *tiny(setup, out), *as_argv(options), env=setup["env"])
        assert r.returncode == 0, (name, r.stderr[-3000:])
        results[name] = losses(out)
    assert len(results["json"]) == 4
    for name, got in results.items():
        assert got == results["json"], name  # bit-identical

    part = setup["root"] / "run-webdataset-resumed"
    shards = as_argv(setup["formats"]["webdataset"])
    r = run("train.py", *tiny(setup, part, "--max_steps", 2, "--save_every", 1), *shards, env=setup["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("train.py", *tiny(setup, part, "--resume", "latest"), *shards, env=setup["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(part) == results["webdataset"]


def test_msrun_two_workers_on_webdataset_shards_read_their_own_shards(setup, tmp_path):
    """Each rank trains its own shards (the batches the data layer deals it), both ranks end with bit-identical
    weights, only rank 0 saves. A single process reads every shard, so its batches are not the ranks' side by side
    (pixart.data.dataset); the concatenated-batch equality is shown on the other sources (tests/test_train.py)."""
    from pixart.data.dataset import BatchStream, open_dataset
    from pixart.data.sources import open_source
    shards = setup["formats"]["webdataset"]["--train_data_dir"]
    dp, logs = tmp_path / "dp", tmp_path / "logs"
    r = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                        f"--log_dir={logs}", "--join=True", "train.py",
                        *map(str, tiny(setup, dp, "--max_steps", 2, "--param_digest", "true",
                                       "--batch_size", 2, "--seed", 3, "--use_parallel", "True")),
                        "--train_data_dir", shards],
                       capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=600)
    worker = [(logs / f"worker_{i}.log").read_text() for i in range(2)]
    assert r.returncode == 0, r.stdout[-2000:] + "\n".join(w[-2000:] for w in worker)

    def tagged(text, rank, what):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"[rank {rank}/") and what in ln)
        return line.split(": ", 1)[1] if what == "first batch" else line.rsplit(" ", 1)[1]

    datasets = [open_dataset(open_source(train_data_dir=shards), 256, rank=k, world_size=2, seed=3) for k in range(2)]
    agreed = min(ds.batches_per_epoch(2) for ds in datasets)
    for k, ds in enumerate(datasets):
        ref = next(BatchStream(ds, 2, seed=3, rank=k, world_size=2, agree=lambda n: agreed))
        assert tagged(worker[k], k, "first batch").split(", ") == [e.path for e in ref.entries]
        assert {e.path.split("/")[0] for e in ref.entries} == {s.name for s in ds.first.source.shards}
    assert tagged(worker[0], 0, "parameter digest") == tagged(worker[1], 1, "parameter digest")
    assert len(list((dp / "checkpoints").iterdir())) == 1 and sorted(losses(dp)) == [1, 2]
    weights = read_ckpt(dp / "checkpoints" / "step_00000002" / "model.ckpt")
    assert all(np.isfinite(w).all() for w in weights.values())


def alpha_512_in_hub_cache(setup) -> Path:
    """A reduced random PixArt-XL-2-512x512 pipeline (the demo bundle's weights and tiny T5 / VAE, 120 caption
    tokens) saved as a diffusers folder under its hub id in a Hugging Face cache; returns the cache."""
    from pixart.models.convert import read_pixart, save_pixart
    from pixart.models.pixart import preset_config
    from pixart.pipelines.text_to_image import PixArtPipeline
    root, comp, model = setup["root"], setup["comp"], "PixArt-XL-2-512x512"
    weights = read_pixart(setup["ckpt"])  # Σ-256 and α-512 share every weight but the null caption's length
    cfg = preset_config(model, caption_channels=demo.T5_CONFIG["d_model"], **demo.PIXART_SHRINK)
    weights.state["y_embedder.y_embedding"] = weights.state["y_embedder.y_embedding"][:cfg.model_max_length]
    save_pixart(weights.state, cfg, root / "alpha512.ckpt", model)
    pipe = PixArtPipeline.from_pretrained(checkpoint=root / "alpha512.ckpt", model=model, vae_root=comp / "vae",
                                          text_encoder_root=comp / "text_encoder", tokenizer_root=comp / "tokenizer",
                                          log=lambda *_: None)
    repo = root / "hub" / "models--PixArt-alpha--PixArt-XL-2-512x512"
    pipe.save_pretrained(repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    return root / "hub"


def test_reference_readme_lora_command_trains_from_a_datasets_folder_with_tensorboard(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = setup["root"] / "pixart-pokemon-model"
    hub = alpha_512_in_hub_cache(setup)
    # The reference README's command as written, its base model a reduced random α-512 in the local Hugging Face
    # cache, and --mixed_precision fp16 (on CPU: fp32 with a warning); what differs: the dataset is a local
    # `datasets` folder in the layout of svjack/pokemon-blip-captions-en-zh, and 2 steps instead of 80 epochs.
    r = run(LORA_SCRIPT, "--pretrained_model_name_or_path=PixArt-alpha/PixArt-XL-2-512x512",
            f"--dataset_name={setup['formats']['save_to_disk']['--dataset_name']}", "--caption_column=en_text",
            "--resolution=512", "--random_flip", "--train_batch_size=4", "--num_train_epochs=80",
            "--checkpointing_steps=200", "--learning_rate=1e-04", "--lr_scheduler=constant", "--lr_warmup_steps=0",
            "--seed=42", "--mixed_precision=fp16", f"--output_dir={out}", "--validation_prompt=cute dragon creature",
            "--report_to=tensorboard", "--checkpoints_total_limit=10", "--validation_epochs=5",
            "--max_token_length=120", "--max_train_steps=2",
            env={**setup["env"], "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: --mixed_precision fp16" in r.stderr
    acc = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = losses(out)
    assert sorted(logged) == [1, 2]
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(logged)
    assert {"train/lr", "train/grad_norm", "train/loss_scale", "train/images_per_s"} <= set(acc.Tags()["scalars"])
    assert [i.step for i in acc.Images("validation/00")] == [2]


BAD_INPUT = [
    ("no_column", "--caption_column 'caption' is not a column of"),
    ("empty_folder", "no images in"),
    ("orphan_caption", "a caption file without an image"),
    ("not_a_tar", "is not a tar file"),
    ("hub_offline", "not a local folder, and the Hugging Face Hub cannot be reached"),
]


def bad_data_argv(setup, tmp_path, case) -> list[str]:
    if case == "no_column":
        data = [*as_argv(setup["formats"]["save_to_disk"])[:2], "--caption_column", "caption"]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data = ["--train_data_dir", tmp_path / "empty"]
    elif case == "orphan_caption":
        (tmp_path / "orphan").mkdir()
        (tmp_path / "orphan" / "a.txt").write_text("a caption")
        data = ["--train_data_dir", tmp_path / "orphan"]
    elif case == "not_a_tar":
        (tmp_path / "shard-000.tar").write_text(json.dumps({"not": "a tar"}) * 100)
        data = ["--train_data_dir", tmp_path / "shard-000.tar"]
    else:
        data = ["--dataset_name", "svjack/pokemon-blip-captions-en-zh"]
    return list(map(str, [*tiny(setup, tmp_path / "out"), *data]))


def assert_refused(status: int, stderr: str, message: str, out: Path) -> None:
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not (out / "checkpoints").exists() and not list(out.glob("checkpoint*"))


@pytest.mark.parametrize("case,message", [c for c in BAD_INPUT if c[0] != "hub_offline"])
def test_bad_data_input_exits_1_with_one_line_and_writes_nothing(setup, tmp_path, capsys, case, message):
    """train.py's main in this process (a real process per case would cost seconds of start-up each; the hub case
    below runs as a user does: the Hub's offline switch is read when huggingface_hub is imported)."""
    import train as script
    status = exit_status(script.main, bad_data_argv(setup, tmp_path, case))
    assert_refused(status, capsys.readouterr().err, message, tmp_path / "out")


def test_bad_data_input_exits_1_with_one_line_and_writes_nothing_as_a_user_runs_it(setup, tmp_path):
    case, message = BAD_INPUT[-1]
    r = run("train.py", *bad_data_argv(setup, tmp_path, case), env={"HF_HUB_OFFLINE": "1"})
    assert_refused(r.returncode, r.stderr, message, tmp_path / "out")
