"""Command-line options with YAML defaults: `script.py -c CONFIG.yaml --flag value`.

Precedence: a flag given on the command line > the YAML file > the parser's default. A YAML key is an option's
name (its dest or any of its long flags without the dashes, so `train_batch_size` and `batch_size` both work where
both are flags); a key that is not an option of the script is an error naming the allowed keys, so a typo never
passes silently.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 1 (bad input), with the error as the last line, like every other error here."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{name: dest} of every option, by its dest and by each long flag without dashes (YAML keys)."""
    names = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "config"):
            continue
        names[a.dest] = a.dest
        names.update({s.lstrip("-"): a.dest for s in a.option_strings if s.startswith("--")})
    return names


def flag_namer(parser: argparse.ArgumentParser):
    """dest -> the flag a user types for it (its first long option string), for error messages."""
    flags = {a.dest: next((s for s in a.option_strings if s.startswith("--")), f"--{a.dest}")
             for a in parser._actions if a.option_strings}
    return lambda dest: flags.get(dest, f"--{dest}")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv` with YAML defaults from `-c/--config`; unknown YAML keys raise ConfigError."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("-c", "--config", default=None, help="YAML file of option: value defaults")
    if known.config:
        values = load_yaml(known.config)
        names = option_names(parser)
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{known.config}: unknown key(s) {', '.join(unknown)}; allowed keys: "
                              f"{', '.join(sorted(names))}")
        by_dest: dict[str, str] = {}
        for key in list(values):  # an alias (`train_batch_size`) sets its option's dest (`batch_size`)
            dest = names[key]
            if dest in by_dest:
                raise ConfigError(f"{known.config}: {by_dest[dest]} and {key} set the same option; keep one")
            by_dest[dest] = key
            if key != dest:
                values[dest] = values.pop(key)
        for action in parser._actions:  # YAML values go through the same type conversion as flags
            if action.dest in values and action.type is not None and values[action.dest] is not None \
                    and not isinstance(values[action.dest], list):
                try:
                    values[action.dest] = action.type(values[action.dest])
                except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                    raise ConfigError(f"{known.config}: bad value for {action.dest}: {e}") from None
        parser.set_defaults(**values)
    return parser.parse_args(argv)
