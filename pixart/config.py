"""Command-line options with YAML defaults: `script.py -c CONFIG.yaml --flag value`.

Precedence: a flag given on the command line > the YAML file > the parser's default. A YAML key that is not an
option of the script is an error naming the allowed keys, so a typo never passes silently.
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


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv` with YAML defaults from `-c/--config`; unknown YAML keys raise ConfigError."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("-c", "--config", default=None, help="YAML file of option: value defaults")
    if known.config:
        values = load_yaml(known.config)
        allowed = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(f"{known.config}: unknown key(s) {', '.join(unknown)}; allowed keys: "
                              f"{', '.join(sorted(allowed))}")
        for action in parser._actions:  # YAML values go through the same type conversion as flags
            if action.dest in values and action.type is not None and values[action.dest] is not None \
                    and not isinstance(values[action.dest], list):
                try:
                    values[action.dest] = action.type(values[action.dest])
                except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                    raise ConfigError(f"{known.config}: bad value for {action.dest}: {e}") from None
        parser.set_defaults(**values)
    return parser.parse_args(argv)
