"""The command-line layer every entry point shares: one error handling (`pixart.cli.main`), option groups listed
once each in -h, and the alias table (an alias is the same option: flag, YAML key and -h line)."""
import re

import pytest
import yaml

from pixart.cli import main
from pixart.cli import extract_features, gradio, lora_inference, lora_train, sample, train
from pixart.cli.options import ALIASES, ArgumentParser, ConfigError, add_aliases, parse_args

PARSERS = {"sample.py": sample.build_parser, "train.py": train.build_parser, "gradio_demo.py": gradio.build_parser,
           "train_pixart_lora.py": lora_train.build_parser, "inference_pixart_lora.py": lora_inference.build_parser,
           "extract_features.py": extract_features.build_parser}


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
    if script != "extract_features.py":
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
