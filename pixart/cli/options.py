"""The options every entry point shares, and command-line parsing with YAML defaults: `script.py -c CONFIG.yaml
--flag value`.

Precedence: a flag given on the command line > the YAML file > the parser's default. A YAML key is an option's
name (its dest or any of its long flags without the dashes, so `train_batch_size` and `batch_size` both work where
both are flags); a key that is not an option of the script is an error naming the allowed keys, so a typo never
passes silently.

Shared option groups (`add_model_group`, `add_kv_compress_group`, `add_execution_group`, `add_precision_group`,
`add_encoder_options`, `add_data_group`) give every entry point the same names, types and help; `ALIASES` maps
other tools' names for an option to ours, applied to every parser by `parse_args`, so `-h` lists each option once
with all its names.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


DTYPES = ["fp32", "fp16", "bf16"]
DEVICES = ["CPU", "GPU", "Ascend"]
MODES = {"0": "graph", "graph": "graph", "1": "pynative", "pynative": "pynative"}

# alias -> canonical flag: the names other tools (diffusers' scripts, the reference MindSpore port) use for one of
# our options. An alias applies to every parser that has the canonical flag and no option of the alias's own name.
ALIASES: dict[str, str] = {
    "--proportion_empty_prompts": "--class_dropout_prob",  # diffusers
    "--max_token_length": "--max_length",
    "--gradient_checkpointing": "--recompute",  # diffusers
}


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


def add_aliases(parser: argparse.ArgumentParser, aliases: dict[str, str] = ALIASES) -> argparse.ArgumentParser:
    """Give each option the aliases of its canonical flag (shown in -h beside it; valid as YAML keys too)."""
    taken = parser._option_string_actions
    for alias, canonical in aliases.items():
        action = taken.get(canonical)
        if action is not None and alias not in taken:
            action.option_strings.append(alias)
            taken[alias] = action
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Option groups shared by the entry points
# ---------------------------------------------------------------------------------------------------------------
def option_group(p, title: str):
    """The parser's group named `title` (made if it has none), so that a script adding to another's parser keeps
    each option in its group in -h."""
    return next((g for g in p._action_groups if g.title == title), None) or p.add_argument_group(title)


def add_model_group(p, default: str | None):
    """The model: --model (a preset); the caller adds its weights options to the returned group."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help="preset (architecture and resolution)")
    return g


def add_encoder_options(g) -> None:
    """The VAE and T5 folders and the latent scale, into group `g`."""
    g.add_argument("--vae_root", default=None, help="HF folder of the VAE")
    g.add_argument("--text_encoder_root", default=None, help="HF folder of the T5 encoder")
    g.add_argument("--tokenizer_root", default=None, help="HF folder of the T5 tokenizer (default: text encoder's)")
    g.add_argument("--sd_scale_factor", type=float, default=None, help="VAE latent scale (default: VAE config, or "
                   "the feature cache's)")


def add_kv_compress_group(p, scale_factor: int):
    """Σ's KV compression of self-attention keys and values."""
    g = p.add_argument_group("KV compression (PixArt-Σ)")
    g.add_argument("--kv_compress", type=str2bool, default=False,
                   help="compress self-attention keys and values (the weights must have been trained with it)")
    g.add_argument("--kv_compress_sampling", default="conv", choices=["conv", "ave", "uniform"])
    g.add_argument("--kv_compress_scale_factor", type=int, default=scale_factor)
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None, help="blocks that compress")
    return g


def kv_compress_config(args, depth: int | None = None) -> dict | None:
    """The model's KV-compression config the flags ask for (None: off); `depth` gives the default layers, the
    second half of the blocks, else none."""
    if not args.kv_compress:
        return None
    layers = args.kv_compress_layer or (list(range(depth // 2, depth)) if depth else [])
    return {"sampling": args.kv_compress_sampling, "scale_factor": args.kv_compress_scale_factor,
            "kv_compress_layer": layers}


def add_execution_group(p, mode: str):
    """Where and how MindSpore runs; the caller adds its own execution options to the returned group."""
    g = p.add_argument_group("execution")
    g.add_argument("--device_target", default="CPU", choices=DEVICES)
    g.add_argument("--mode", default=mode, help="graph (0) or pynative (1)")
    g.add_argument("--jit_level", default="O1", choices=["O0", "O1", "O2"])
    g.add_argument("--enable_flash_attention", type=str2bool, default=None,
                   help="FlashAttentionScore (Ascend only; default on there)")
    return g


def mode_name(args, error=ConfigError) -> str:
    """'graph' or 'pynative' for --mode, or `error` naming the allowed values."""
    if str(args.mode) not in MODES:
        raise error(f"--mode must be graph (0) or pynative (1), got {args.mode!r}")
    return MODES[str(args.mode)]


def add_precision_group(p, text_encoder_dtype: str | None = None):
    """Precision of the models: T5's here (None: the transformer's); the caller adds its own to the returned
    group."""
    g = p.add_argument_group("precision")
    g.add_argument("--text_encoder_dtype", default=text_encoder_dtype, choices=DTYPES,
                   help="T5 precision" + ("" if text_encoder_dtype else " (default: --dtype)")
                   + "; fp16 halves T5-XXL's memory")
    return g


def add_data_group(p):
    """Training data (one source: label JSON, a Hugging Face dataset, an image folder with captions, webdataset
    shards; see pixart.data.sources), the feature cache, buckets and caption sampling; and the run's metric logs
    (`add_report_group`), which every training entry point has with its data."""
    g = p.add_argument_group("data")
    add_source_options(g)
    g.add_argument("--feature_dir", default=None, help="cache from tools/extract_features.py (T5 / VAE not loaded "
                   "for what it holds)")
    g.add_argument("--resolution", type=int, default=None, help="bucket table: 256/512/1024/2048 (default: preset)")
    g.add_argument("--multi_scale", type=str2bool, default=None,
                   help="aspect-ratio buckets (default: true for -MS presets, else square crops)")
    g.add_argument("--real_prompt_ratio", type=float, default=1.0,
                   help="probability of the label's prompt over its sharegpt4v caption")
    g.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="caption dropout for classifier-free guidance (the learned null caption)")
    g.add_argument("--random_flip", type=str2bool, nargs="?", const=True, default=False,
                   help="mirror images at random (a bare --random_flip means true)")
    g.add_argument("--sample_posterior", type=str2bool, default=True, help="VAE posterior sample (else its mean)")
    g.add_argument("--max_length", type=int, default=None, help="caption tokens (default: preset, 120 α / 300 Σ)")
    add_report_group(p)
    return g


def add_source_options(g) -> None:
    """Where the images and captions come from (one source; pixart.data.sources), into group `g`."""
    g.add_argument("--json_path", default=None, help="label JSON: [{path, prompt, sharegpt4v?, height?, width?, "
                   "ratio?}] (missing sizes are read from the image headers)")
    g.add_argument("--image_dir", default=None, help="folder the label paths are relative to")
    g.add_argument("--dataset_name", default=None,
                   help="a Hugging Face dataset: a save_to_disk folder, a folder load_dataset reads (imagefolder "
                        "with metadata.jsonl/.csv, parquet, arrow), a Hub name (online only), or webdataset .tar "
                        "shards (a folder, a glob or a brace pattern)")
    g.add_argument("--dataset_config_name", default=None, help="the dataset's configuration (load_dataset's name)")
    g.add_argument("--train_data_dir", default=None,
                   help="a folder: images with a same-named .txt/.caption each (searched recursively), an "
                        "imagefolder with metadata.jsonl/.csv, or .tar shards; with --dataset_name: its data_dir")
    g.add_argument("--image_column", default="image", help="dataset column of the images (or image paths)")
    g.add_argument("--caption_column", default=None, help="dataset column of the captions (default: 'text', "
                   "diffusers' name, else 'en_text', the reference port's)")
    g.add_argument("--max_train_samples", type=int, default=None, help="train on the first N samples only")


REPORT_TO = ["none", "tensorboard", "all"]


def add_report_group(p):
    """Where the training metrics go besides train.log and train_log.jsonl (always written)."""
    g = option_group(p, "metric logs")
    g.add_argument("--report_to", default="none", choices=REPORT_TO,
                   help="tensorboard: loss, lr, grad norm, loss scale, images/s and validation images as TensorBoard "
                        "events (all = tensorboard, the only integration here)")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    return g


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
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
    """Parse `argv` with YAML defaults from `-c/--config` and the `ALIASES`; unknown YAML keys raise ConfigError."""
    add_aliases(parser)
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
