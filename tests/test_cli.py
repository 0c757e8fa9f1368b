"""The command-line layer every entry point shares: one error handling (`pixart.cli.main`), option groups listed
once each in -h, and the alias table (an alias is the same option: flag, YAML key and -h line)."""
import re
from pathlib import Path

import pytest
import yaml

from pixart.cli import main
from pixart.cli import convert, extract_features, gradio, lora_inference, lora_train, make_labels, sample, train
from pixart.cli.options import ALIASES, ArgumentParser, ConfigError, add_aliases, parse_args

PARSERS = {"sample.py": sample.build_parser, "train.py": train.build_parser, "gradio_demo.py": gradio.build_parser,
           "train_pixart_lora.py": lora_train.build_parser, "inference_pixart_lora.py": lora_inference.build_parser,
           "extract_features.py": extract_features.build_parser, "make_labels.py": make_labels.build_parser,
           "convert.py": convert.build_parser}


def _parser():
    p = ArgumentParser()
    p.add_argument("--n", type=int, default=1)
    return p


def test_main_turns_bad_input_into_one_line_and_status_1(capsys):
    def bad(args):
        raise ValueError(f"--n must be even, got {args.n}")
    assert main(bad, lambda _: _parser(), None, ["--n", "3"]) == 1
    assert capsys.readouterr().err == "error: --n must be even, got 3\n"
    assert main(lambda a: None, lambda _: _parser(), None, ["--n", "4"]) == 0


def test_main_bad_flag_and_bad_yaml_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own errors exit 1 too (ArgumentParser.error)
        main(lambda a: None, lambda _: _parser(), None, ["--n", "x"])
    assert e.value.code == 1 and capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("m: 2\n")
    assert main(lambda a: None, lambda _: _parser(), None, ["-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key(s) m" in err and len(err.splitlines()) == 1


def test_main_ctrl_c_is_130_and_other_errors_keep_their_traceback(capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    assert main(interrupted, lambda _: _parser(), None, []) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def bug(args):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        main(bug, lambda _: _parser(), None, [])


@pytest.mark.parametrize("script", list(PARSERS))
def test_help_lists_every_option_once_in_groups(script):
    parser = add_aliases(PARSERS[script](None))
    text = parser.format_help()
    listed = re.findall(r"^  (--\w+)", text, re.M)
    assert len(listed) == len(set(listed)), [f for f in listed if listed.count(f) > 1]
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    shown = set(re.findall(r"(--\w+)", text))
    assert flags <= shown, flags - shown
    if script not in ("extract_features.py", "make_labels.py", "convert.py"):  # no model is run
        groups = {g.title for g in parser._action_groups if g._group_actions}
        assert {"model", "execution", "precision"} <= groups, groups


def test_aliases_are_flags_and_yaml_keys_of_the_same_option(tmp_path):
    assert ALIASES, "the alias table is empty"
    for alias, canonical in ALIASES.items():
        assert alias.startswith("--") and canonical.startswith("--")
    a = parse_args(train.build_parser(), ["--proportion_empty_prompts", "0.25", "--gradient_checkpointing"])
    assert (a.class_dropout_prob, a.recompute) == (0.25, True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"max_token_length": 120}))
    assert parse_args(train.build_parser(), ["-c", str(cfg)]).max_length == 120
    cfg.write_text(yaml.safe_dump({"max_token_length": 120, "max_length": 300}))
    with pytest.raises(ConfigError, match="set the same option"):
        parse_args(train.build_parser(), ["-c", str(cfg)])


# -- the device: the one that is there, Ascend-only requests falling back on CPU ------------------------------------
def test_device_defaults_to_the_one_there_and_ascend_only_options_fall_back_on_cpu(capsys, monkeypatch):
    from pixart import backend
    from pixart.cli.options import default_device
    from pixart.cli.sample import build_parser
    assert default_device() == "CPU"  # no Ascend device on this machine
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx512f"})  # a CPU without AVX512_BF16
    args = parse_args(build_parser(), ["--enable_flash_attention", "True", "--dtype", "bf16"])
    assert (args.device_target, args.enable_flash_attention, args.dtype) == ("CPU", None, "fp32")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: running on CPU: flash attention off (Ascend only); --dtype bf16 -> fp32 (bf16 on CPU "
                   "needs AVX512_BF16 or AMX-BF16, which this CPU lacks)"]
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # one with it: bf16 is kept
    args = parse_args(build_parser(), ["--dtype", "bf16"])
    assert args.dtype == "bf16" and not capsys.readouterr().err
    args = parse_args(build_parser(), ["--dtype", "fp16"])  # the CPU computes fp16: kept, no warning
    assert args.dtype == "fp16" and not capsys.readouterr().err
    with pytest.raises(ConfigError, match="--device_target Ascend: MindSpore finds no Ascend device"):
        parse_args(build_parser(), ["--device_target", "Ascend"])


def test_relative_config_is_found_from_the_project_root(tmp_path, monkeypatch):
    """`-c configs/inference/X.yaml` from any folder: a relative path missing there is taken from the script's
    folder (or the project root), as the reference port does."""
    from pixart.cli.sample import build_parser
    monkeypatch.chdir(tmp_path)
    args = parse_args(build_parser(), ["-c", "configs/inference/pixart-sigma-512-MS.yaml"])
    assert (args.model, args.sample_size, args.checkpoint) == ("PixArt-Sigma-XL-2-512-MS", 64,
                                                               "models/PixArt-Sigma-XL-2-512-MS.ckpt")
    assert Path(args.config).is_absolute()


def test_either_models_layout_is_found(tmp_path, monkeypatch):
    """The reference README's models/vae (text_encoder, tokenizer) and the Hugging Face folder's layout stand in for
    each other; a missing tokenizer left at its default is the text encoder's."""
    from pixart.cli.options import resolve_model_paths
    from pixart.cli.sample import build_parser
    monkeypatch.chdir(tmp_path)
    hf = tmp_path / "models" / "pixart_sigma_sdxlvae_T5_diffusers"
    for part in ("vae", "text_encoder"):
        (hf / part).mkdir(parents=True)
    args = parse_args(build_parser(), [])  # defaults: the reference layout
    lines = []
    resolve_model_paths(args, lines.append)
    assert (args.vae_root, args.text_encoder_root, args.tokenizer_root) == (
        "models/pixart_sigma_sdxlvae_T5_diffusers/vae", "models/pixart_sigma_sdxlvae_T5_diffusers/text_encoder", None)
    assert lines == ["--vae_root models/vae not found; using models/pixart_sigma_sdxlvae_T5_diffusers/vae",
                     "--text_encoder_root models/text_encoder not found; using "
                     "models/pixart_sigma_sdxlvae_T5_diffusers/text_encoder"]
    (tmp_path / "models" / "vae").mkdir()  # both there: the reference layout, silently
    args = parse_args(build_parser(), ["--vae_root", "models/pixart_sigma_sdxlvae_T5_diffusers/vae"])
    resolve_model_paths(args, lines.append)
    assert args.vae_root == "models/pixart_sigma_sdxlvae_T5_diffusers/vae" and len(lines) == 3


def test_reference_yaml_picks_the_preset_from_sample_size(tmp_path):
    """A reference-port YAML (no `model:`; flat keys as its argparse dests) loads unchanged; sample_size and
    t5_max_length name the preset."""
    from pixart.cli.sample import build_parser, pick_model
    cfg = tmp_path / "ref.yaml"
    cfg.write_text("image_height: 1024\nimage_width: 1024\nsample_size: 128\n"
                   'checkpoint: "models/PixArt-Sigma-XL-2-1024-MS.ckpt"\nvae_root: "models/vae"\n'
                   'text_encoder_root: "models/text_encoder"\ntokenizer_root: "models/tokenizer"\n'
                   'sd_scale_factor: 0.13025\nenable_flash_attention: True\ndtype: "fp16"\nsampling_method: "dpm"\n'
                   "sampling_steps: 20\nguidance_scale: 4.5\nseed: 42\nimagegrid: False\nnum_trials: 1\nbatch_size: 1\n"
                   'mode: 0\njit_level: "O1"\nuse_resolution_binning: True\nt5_max_length: 300\nkv_compress: False\n'
                   'kv_compress_sampling: "conv"\nkv_compress_scale_factor: 1\nprompt:\n  - "A small cactus"\n')
    args = parse_args(build_parser(), ["-c", str(cfg)])
    assert pick_model(args) == "PixArt-Sigma-XL-2-1024-MS" and args.prompt == ["A small cactus"]
    args = parse_args(build_parser(), ["-c", str(cfg), "--t5_max_length", "120", "--prompt", "x"])
    assert pick_model(args) == "PixArt-XL-2-1024-MS" and args.prompt == ["x"]  # the command line replaces the list
    args = parse_args(build_parser(), ["-c", str(cfg), "--sample_size", "256", "--kv_compress", "true"])
    assert pick_model(args) == "PixArt-Sigma-XL-2-2K-MS-KV"


def test_a_config_written_for_ascend_runs_on_cpu_with_one_warning(tmp_path, capsys):
    from pixart.cli.sample import build_parser
    cfg = tmp_path / "ascend.yaml"
    cfg.write_text("device_target: Ascend\nenable_flash_attention: True\n")
    args = parse_args(build_parser(), ["-c", str(cfg)])
    assert (args.device_target, args.enable_flash_attention) == ("CPU", None)
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: running on CPU: the config's device_target Ascend is not here; flash attention off (Ascend only)"]
