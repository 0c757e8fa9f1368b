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
import glob
import sys
from pathlib import Path

import yaml

from pixart import logging_setup


class ConfigError(ValueError):
    pass


DTYPES = ["fp32", "fp16", "bf16"]
DEVICES = ["CPU", "GPU", "Ascend"]
MODES = {"0": "graph", "graph": "graph", "1": "pynative", "pynative": "pynative"}

# alias -> canonical flag: the names other tools (diffusers' scripts, the reference MindSpore port) use for one of
# our options. An alias applies to every parser that has the canonical flag and no option of the alias's own name.
ALIASES: dict[str, str] = {
    # -- shared ----------------------------------------------------------------------------------------------------
    "--t5_max_length": "--max_length",  # reference port
    "--max_token_length": "--max_length",  # reference port's LoRA scripts
    # -- sampling (sample.py, gradio_demo.py, the LoRA inference script) -------------------------------------------
    "--use_resolution_binning": "--resolution_binning",  # reference port
    "--nrows": "--num_trials",  # older reference sample.py: rows of the grid = trials of each prompt
    "--ncols": "--batch_size",  # older reference sample.py: columns of the grid = prompts per batch
    # -- training (train.py, the LoRA training script) -------------------------------------------------------------
    "--proportion_empty_prompts": "--class_dropout_prob",  # diffusers
    "--gradient_checkpointing": "--recompute",  # diffusers
}

# Training (train.py, the LoRA script): the reference MindSpore port's names for train.py's options, same meaning.
ALIASES.update({
    "--checkpoint": "--load_from",
    "--output_path": "--output_dir",
    "--dtype": "--mixed_precision",
    "--start_learning_rate": "--learning_rate",
    "--optim": "--optimizer",
    "--loss_scaler_type": "--loss_scaler",
    "--scale_window": "--loss_scale_window",
    "--gradient_accumulation_steps": "--grad_accumulation",
    "--ckpt_max_keep": "--keep_last",
    "--log_loss_interval": "--log_every",
    "--sampling_steps": "--validation_steps",
    "--guidance_scale": "--validation_guidance",
})

# the reference port's models/ layout first, then the one of the Hugging Face folders (as downloaded) and of the
# α checkpoints' T5; each path of a group stands in for the others when it is missing (`resolve_model_paths`)
MODEL_LAYOUTS: list[tuple[str, ...]] = [
    ("models/vae", "models/pixart_sigma_sdxlvae_T5_diffusers/vae"),
    ("models/text_encoder", "models/pixart_sigma_sdxlvae_T5_diffusers/text_encoder", "models/t5-v1_1-xxl"),
    ("models/tokenizer", "models/pixart_sigma_sdxlvae_T5_diffusers/tokenizer", "models/t5-v1_1-xxl"),
]
MODEL_PATH_OPTIONS = ("checkpoint", "vae_root", "text_encoder_root", "tokenizer_root")


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


REFERENCE_FILES = dict(vae_root="models/vae", text_encoder_root="models/text_encoder",
                       tokenizer_root="models/tokenizer")  # the reference port's defaults (its README's models/)


def add_encoder_options(g, reference_layout: bool = False) -> None:
    """The VAE and T5 folders and the latent scale, into group `g`; with `reference_layout` their defaults are the
    reference port's `models/vae`, `models/text_encoder`, `models/tokenizer` (see `resolve_model_paths`)."""
    d = REFERENCE_FILES if reference_layout else {}
    g.add_argument("--vae_root", default=d.get("vae_root"), help="HF folder of the VAE")
    g.add_argument("--text_encoder_root", default=d.get("text_encoder_root"), help="HF folder of the T5 encoder")
    g.add_argument("--tokenizer_root", default=d.get("tokenizer_root"),
                   help="HF folder of the T5 tokenizer (default: the text encoder's when this is missing)")
    g.add_argument("--sd_scale_factor", type=float, default=None, help="VAE latent scale (default: VAE config, or "
                   "the feature cache's)")


KV_DEFAULT_SCALE_FACTOR = 2  # PixArt-Σ's KV-compressed models: keys and values downsampled 2x each way


def add_kv_compress_group(p, scale_factor: int | None = None):
    """Σ's KV compression of self-attention keys and values; `--kv_compress true` alone takes the layers and
    factor of Σ's KV models (the second half of the blocks, 2x)."""
    g = p.add_argument_group("KV compression (PixArt-Σ)")
    g.add_argument("--kv_compress", type=str2bool, default=False,
                   help="compress self-attention keys and values (conv needs weights trained with it; ave and "
                        "uniform have no weights)")
    g.add_argument("--kv_compress_sampling", default="conv", choices=["conv", "ave", "uniform"])
    g.add_argument("--kv_compress_scale_factor", type=int, default=scale_factor,
                   help=f"downsampling of keys and values (default: {KV_DEFAULT_SCALE_FACTOR})")
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None,
                   help="blocks that compress (default: the second half, as in Σ's KV models)")
    return g


def kv_compress_config(args, depth: int | None = None) -> dict | None:
    """The model's KV-compression config the flags ask for (None: off). Unset layers are the second half of the
    `depth` blocks (Σ's 14..27 of 28); an unset factor is 2."""
    if not args.kv_compress:
        return None
    layers = args.kv_compress_layer or (list(range(depth // 2, depth)) if depth else [])
    factor = args.kv_compress_scale_factor or KV_DEFAULT_SCALE_FACTOR
    if factor < 1:
        raise ConfigError(f"--kv_compress_scale_factor must be >= 1, got {factor}")
    return {"sampling": args.kv_compress_sampling, "scale_factor": factor, "kv_compress_layer": layers}


def _device_nodes(device: str) -> bool:
    """Whether the machine shows the device's nodes (cheap, silent; MindSpore's own probe follows)."""
    return bool(glob.glob({"Ascend": "/dev/davinci[0-9]*", "GPU": "/dev/nvidia[0-9]*"}[device]))


def device_available(device: str) -> bool:
    """Whether MindSpore can run on `device` here: CPU always; Ascend / GPU when the machine has one and MindSpore's
    plugin for it loads (probed only where the device nodes exist, since the probe logs loader errors elsewhere)."""
    if device == "CPU":
        return True
    if not _device_nodes(device):
        return False
    import mindspore as ms  # only here: building a parser must not import MindSpore
    try:
        return bool(ms.hal.is_available(device))
    except Exception:  # noqa: BLE001 (a plugin that fails to load: not available)
        return False


def default_device() -> str:
    """The device a run takes when --device_target is not given: Ascend where MindSpore reports one, else CPU."""
    return "Ascend" if device_available("Ascend") else "CPU"


def add_execution_group(p, mode: str):
    """Where and how MindSpore runs; the caller adds its own execution options to the returned group. Checked and
    adapted to the device by `check_execution` (run by `parse_args`)."""
    g = p.add_argument_group("execution")
    g.add_argument("--device_target", default=None, choices=DEVICES,
                   help="default: Ascend where MindSpore reports one, else CPU")
    g.add_argument("--mode", default=mode, help="graph (0) or pynative (1)")
    g.add_argument("--jit_level", default="O1", choices=["O0", "O1", "O2"])
    g.add_argument("--enable_flash_attention", type=str2bool, default=None,
                   help="FlashAttentionScore (Ascend only: default on there; elsewhere true falls back with a "
                        "warning)")
    return g


def check_execution(args, device_from_command_line: bool = True, stream=None) -> None:
    """Fill in --device_target (the device that is there) and turn the Ascend-only requests of a config written for
    Ascend (its device, flash attention, bf16) into what the CPU runs, with one warning line naming each change. A
    device the machine lacks asked for on the command line is an error. Runs for every parser that has the
    execution group (`parse_args`)."""
    if not hasattr(args, "device_target"):
        return
    changes = []
    if args.device_target is None:
        args.device_target = default_device()
    elif not device_available(args.device_target):
        if device_from_command_line:
            raise ConfigError(f"--device_target {args.device_target}: MindSpore finds no {args.device_target} device "
                              f"on this machine; use --device_target CPU (or leave it out: {default_device()} here)")
        changes.append(f"the config's device_target {args.device_target} is not here")
        args.device_target = default_device()
    if args.device_target != "CPU":
        return
    if getattr(args, "enable_flash_attention", None):
        args.enable_flash_attention = None
        changes.append("flash attention off (Ascend only)")
    from pixart.backend import cpu_supports_bf16  # only here: building a parser must not import MindSpore
    for dest in ("dtype", "text_encoder_dtype"):
        if getattr(args, dest, None) == "bf16" and not cpu_supports_bf16():
            setattr(args, dest, "fp32")
            changes.append(f"--{dest} bf16 -> fp32 (bf16 on CPU needs AVX512_BF16 or AMX-BF16, which this CPU lacks)")
    if changes:
        print(f"warning: running on CPU: {'; '.join(changes)}", file=stream or sys.stderr)


def mode_name(args, error=ConfigError) -> str:
    """'graph' or 'pynative' for --mode, or `error` naming the allowed values."""
    if str(args.mode) not in MODES:
        raise error(f"--mode must be graph (0) or pynative (1), got {args.mode!r}")
    return MODES[str(args.mode)]


def add_precision_group(p, text_encoder_dtype: str | None = None):
    """Precision of the models: T5's here (None: the transformer's); the caller adds its own to the returned
    group."""
    g = p.add_argument_group("precision")
    g.add_argument("--text_encoder_dtype", default=text_encoder_dtype, choices=DTYPES + ["auto"],
                   help="T5 precision" + ("" if text_encoder_dtype else " (default: --dtype)")
                   + "; fp16 halves T5-XXL's memory; auto: fp16 on Ascend, on CPU bf16 where the CPU has it, "
                     "else fp16 storage computed in fp32")
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


def config_path(config) -> Path:
    """A `-c` path: as given if it exists, else (relative) in the running script's folder or the project's root, as
    the reference port resolves it, so `python /path/to/sample.py -c configs/inference/X.yaml` works from anywhere."""
    path = Path(config)
    if path.exists() or path.is_absolute():
        return path
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    roots = ([Path(main).resolve().parent] if main else []) + [Path(__file__).resolve().parents[2]]
    return next((root / path for root in roots if (root / path).exists()), path)


def resolve_model_paths(args, log=print) -> None:
    """Model files named in one layout but present in the other (`MODEL_LAYOUTS`): the reference port's
    `models/vae`, `models/text_encoder`, `models/tokenizer` or the Hugging Face folder's sub-folders. A missing path
    is replaced by the first existing stand-in (said in one line); a missing tokenizer left at its default falls
    back to the text encoder's folder. Every entry point calls this before checking that its files exist."""
    for dest in MODEL_PATH_OPTIONS:
        value = getattr(args, dest, None)
        if not value or Path(value).exists():
            continue
        key = Path(value).as_posix()
        group = next((g for g in MODEL_LAYOUTS if key in g), ())
        found = next((alt for alt in group if alt != key and Path(alt).exists()), None)
        if found:
            log(f"--{dest} {value} not found; using {found}")
            setattr(args, dest, found)
        elif dest == "tokenizer_root" and key == REFERENCE_FILES["tokenizer_root"]:
            args.tokenizer_root = None  # the text encoder's folder holds the tokenizer (T5 downloads do)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv` with YAML defaults from `-c/--config` and the `ALIASES`; unknown YAML keys raise ConfigError.
    Then `check_execution` fills in and checks the device options."""
    add_aliases(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("-c", "--config", default=None, help="YAML file of option: value defaults")
    if not any(a.dest == "verbose" for a in parser._actions):
        parser.add_argument("--verbose", action="store_true",
                            help="show MindSpore's warnings and deprecation notices (for its C++ log too, set "
                                 "PIXART_VERBOSE=1 before starting)")
    if known.config:
        known.config = str(config_path(known.config))
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
    args = parser.parse_args(argv)
    if known.config:
        args.config = known.config
    if args.verbose:
        logging_setup(verbose=True)
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    check_execution(args, any(a.split("=")[0] == "--device_target" for a in given))
    return args
