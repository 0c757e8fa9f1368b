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

Validation, before anything is loaded (`validate`, run by `parse_args` on every parser, on the values from the
command line, the YAML file and the defaults alike), from what each option declares:
- a YAML value must have the option's shape and type: one value for a one-value option (`image_height: [64, 64]`
  is refused), a list for a list option (a single value becomes a one-element list), each converted by the option's
  `type` (a YAML boolean is no number); a value outside the option's `choices` is refused, so an unknown sampler in
  a config fails at once, not after the models load;
- every float, whatever the option, is finite (`inf` / `nan` are refused);
- a number's range comes from its `type` when that is a `Number` (`type=Number(float, low=0, high=1)`), else from
  `LIMITS` by dest, which applies to every parser that has that dest. A new option declares its range one of
  these two ways, e.g. `g.add_argument("--strength", type=Number(float, low=0, high=1), default=0.8)`, and is
  checked with no further code; messages read `--strength must be in [0, 1], got 1.5`;
- a path's kind comes from `PATHS` by dest (or `path_kind(action, kind)` for one parser): an input file that is a
  folder (or the reverse) is refused; an output folder (or file) must be creatable and writable, checked without
  creating anything. A missing input is left to the entry point, which knows the stand-ins (`resolve_model_paths`).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pixart import logging_setup
from pixart.models.kv_compression import KVCompression


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


def add_kv_compress_group(p, scale_factor: int | None = None):
    """Σ's KV compression of self-attention keys and values; `--kv_compress true` alone takes the layers and
    factor of Σ's KV models (the second half of the blocks, 2x)."""
    g = p.add_argument_group("KV compression (PixArt-Σ)")
    g.add_argument("--kv_compress", type=str2bool, default=False,
                   help="compress self-attention keys and values (conv needs weights trained with it; ave and "
                        "uniform have no weights)")
    g.add_argument("--kv_compress_sampling", default="conv", choices=["conv", "ave", "uniform"])
    g.add_argument("--kv_compress_scale_factor", type=int, default=scale_factor,
                   help=f"downsampling of keys and values (default: {KVCompression.DEFAULT_SCALE_FACTOR})")
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None,
                   help="blocks that compress (default: the second half, as in Σ's KV models)")
    return g


def model_depth(args) -> int | None:
    """The number of blocks of the model the flags name (--depth, else --model's preset; None when unknown)."""
    if getattr(args, "depth", None):
        return args.depth
    if not getattr(args, "model", None):
        return None
    from pixart.models.pixart import PRESETS, preset_config  # only here: building a parser must not import MindSpore
    return preset_config(args.model).depth if args.model in PRESETS else None


def check_kv_layers(args, depth: int | None = None, flag=None) -> None:
    """Every --kv_compress_layer names a block of the model (0 .. depth-1); a layer that does not exist would be
    silently ignored. The check is `KVCompression.from_options`'s, worded with the flag the user wrote."""
    try:
        KVCompression.from_options(layers=getattr(args, "kv_compress_layer", None), depth=depth or model_depth(args),
                                   name=flag or (lambda d: f"--{d}"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def kv_compress_config(args, depth: int | None = None) -> dict | None:
    """The model's KV-compression config the flags ask for (None: off), checked by `KVCompression.from_options`."""
    if not args.kv_compress:
        return None
    return KVCompression.from_options(args.kv_compress_sampling, args.kv_compress_scale_factor,
                                      args.kv_compress_layer, depth).config()


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
    add_objective_options(p)
    add_report_group(p)
    return g


def add_objective_options(p):
    """How the training noise and timesteps are drawn and the noise MSE weighted (diffusers' names and meanings;
    all off by default, as in PixArt's own training)."""
    g = p.add_argument_group("training objective")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR weighting: the noise MSE at step t times min(SNR_t, gamma) / SNR_t (5.0 is the "
                   "usual value; default: off)")
    g.add_argument("--noise_offset", type=float, default=0.0,
                   help="offset noise: a per-image, per-channel constant of this spread added to the training noise "
                   "(helps learn overall brightness and colour; 0: off)")
    g.add_argument("--timestep_bias_strategy", default="none", choices=["none", "later", "earlier", "range"],
                   help="draw some training timesteps more often: later (the noisiest --timestep_bias_portion), "
                   "earlier (the least noisy), range ([--timestep_bias_begin, --timestep_bias_end))")
    g.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                   help="how much more often the biased timesteps are drawn (1.0: no bias)")
    g.add_argument("--timestep_bias_portion", type=float, default=0.25,
                   help="the fraction of the timesteps that later / earlier bias")
    g.add_argument("--timestep_bias_begin", type=int, default=0, help="range: the first biased timestep")
    g.add_argument("--timestep_bias_end", type=int, default=1000, help="range: one past the last biased timestep")
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
                        "imagefolder with metadata.jsonl/.csv, or .tar shards; with --dataset_name: its data_dir. "
                        "Under msrun each rank reads whole shards of its own (dealt anew each epoch), so the shard "
                        "count must be a multiple of the number of ranks (refused otherwise)")
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
# Validation: what every option allows, checked on the parsed values before anything is loaded (module docstring)
# ---------------------------------------------------------------------------------------------------------------
NUM_TRAIN_TIMESTEPS = 1000  # pixart.diffusion.schedule's (not imported: it loads MindSpore)
MAX_SAMPLING_STEPS = NUM_TRAIN_TIMESTEPS - 1  # more would repeat a training timestep (a zero-length solver step)
MAX_IMAGE_SIZE = 4096  # px: twice the largest trained size (2K); larger images do not fit in memory on one device
MAX_SEED = 2 ** 32 - 1  # NumPy's seed range
MAX_LENGTH = 2048  # caption tokens: T5's memory grows with the square of the length
MAX_CONFIG_BYTES = 1 << 20  # a YAML config is options, not data
MAX_TEXT_BYTES = 64 << 20  # a prompt file is read whole


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Limit:
    """The range of a numeric option: `low` / `high` inclusive unless `low_open` / `high_open`; `why` ends the
    message (the reason for the bound)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def allows(self, v) -> bool:
        return not ((self.low is not None and (v < self.low or self.low_open and v == self.low))
                    or (self.high is not None and (v > self.high or self.high_open and v == self.high)))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"


class Number:
    """An argparse `type` for a bounded number, e.g. `type=Number(float, low=0, high=1)`: converts like `kind`
    (an int option refuses 2.5 and a YAML boolean), and `validate` checks the range on every value, given or
    default."""

    def __init__(self, kind=float, low=None, high=None, *, low_open=False, high_open=False, why=""):
        self.kind, self.limit = kind, Limit(low, high, low_open, high_open, why)
        self.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"

    def __call__(self, value):
        if isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
            return int(value)
        return self.kind(value)

    def __repr__(self):
        return f"Number({self.kind.__name__}, {self.limit.describe()})"


_AT_LEAST_1 = Limit(1)
_AT_LEAST_0 = Limit(0)
_POSITIVE = Limit(0, low_open=True)
_PROBABILITY = Limit(0, 1)
_DECAY = Limit(0, 1, high_open=True)
_SEED = Limit(0, MAX_SEED, why="NumPy's seed range")
_STEPS = Limit(1, MAX_SAMPLING_STEPS, why=f"fewer steps than the {NUM_TRAIN_TIMESTEPS} training timesteps")
_SIZE = Limit(1, MAX_IMAGE_SIZE, why=f"{MAX_IMAGE_SIZE} px is twice the largest trained size")

# dest -> its range, for every parser that has the dest (a `Number` type overrides this). Every float is also
# required to be finite, listed here or not.
LIMITS: dict[str, Limit] = {
    # sampling
    "guidance_scale": _AT_LEAST_0, "validation_guidance": _AT_LEAST_0,
    "sampling_steps": _STEPS, "validation_steps": _STEPS,
    "image_height": _SIZE, "image_width": _SIZE, "max_image_size": _SIZE,
    "seed": _SEED, "validation_seed": _SEED,
    "batch_size": _AT_LEAST_1, "num_trials": _AT_LEAST_1, "num_images_per_prompt": _AT_LEAST_1,
    "max_length": Limit(1, MAX_LENGTH, why="T5's memory grows with the square of the length"),
    "sd_scale_factor": _POSITIVE, "strength": _PROBABILITY,
    "timesteps": Limit(0, NUM_TRAIN_TIMESTEPS - 1, why="the training timesteps"),
    "kv_compress_scale_factor": _AT_LEAST_1, "kv_compress_layer": _AT_LEAST_0,
    "port": Limit(1, 65535), "max_batch_size": _AT_LEAST_1, "queue_size": _AT_LEAST_1,
    # models
    "depth": _AT_LEAST_1, "hidden_size": _AT_LEAST_1, "num_heads": _AT_LEAST_1, "input_size": _AT_LEAST_1,
    "model_max_length": _AT_LEAST_1, "rank": _AT_LEAST_1, "lora_alpha": _POSITIVE, "lora_dropout": _DECAY,
    # training
    "learning_rate": _POSITIVE, "weight_decay": _AT_LEAST_0, "adam_weight_decay": _AT_LEAST_0,
    "betas": _DECAY, "came_betas": _DECAY, "adam_beta1": _DECAY, "adam_beta2": _DECAY, "ema_rate": _DECAY,
    "eps": _POSITIVE, "came_eps": _POSITIVE, "adamw_eps": _POSITIVE, "adam_epsilon": _POSITIVE,
    "max_grad_norm": _AT_LEAST_0, "clip_grad": _AT_LEAST_0, "init_loss_scale": _POSITIVE,
    "loss_scale_factor": Limit(1, low_open=True), "loss_scale_window": _AT_LEAST_1,
    "grad_accumulation": _AT_LEAST_1, "epochs": _AT_LEAST_1, "max_steps": _AT_LEAST_1, "warmup_steps": _AT_LEAST_0,
    "save_every": _AT_LEAST_1, "keep_last": _AT_LEAST_0, "log_every": _AT_LEAST_1, "ckpt_save_interval": _AT_LEAST_1,
    "validation_every": _AT_LEAST_0, "num_validation_images": _AT_LEAST_1, "validation_epochs": _AT_LEAST_1,
    "visualize_interval": _AT_LEAST_1, "num_parallel_workers": _AT_LEAST_1, "threads": _AT_LEAST_1,
    "max_train_samples": _AT_LEAST_1, "real_prompt_ratio": _PROBABILITY, "class_dropout_prob": _PROBABILITY,
    "snr_gamma": _POSITIVE, "noise_offset": _AT_LEAST_0, "timestep_bias_multiplier": _POSITIVE,
    "timestep_bias_portion": _PROBABILITY, "timestep_bias_begin": Limit(0, 999), "timestep_bias_end": Limit(1, 1000),
    # data tools
    "num_shards": _AT_LEAST_1, "shard_id": _AT_LEAST_0,
}

# dest -> what the path must be: "file" / "text" (UTF-8, read whole) / "dir" (an input that exists must be of that
# kind; a missing one is the entry point's to report), "out_dir" / "out_file" / "output" (written: creatable and writable; "output" is a
# file when its name has a suffix, else a folder). Checked without creating anything.
PATHS: dict[str, str] = {
    "prompt_path": "text", "json_path": "file", "captions_csv": "file",
    "image": "file", "mask_image": "file", "control_image": "file", "control_dir": "dir",
    "vae_root": "dir", "text_encoder_root": "dir", "tokenizer_root": "dir", "image_dir": "dir", "feature_dir": "dir",
    "output_path": "output", "target": "output", "output_dir": "out_dir", "output": "out_file",
}


def path_kind(action: argparse.Action, kind: str | None) -> argparse.Action:
    """Give one parser's option a path kind other than `PATHS`' (None: not checked)."""
    action.path_kind = kind
    return action


def yaml_value(action: argparse.Action, value, config, key: str | None = None):
    """A YAML value for `action`, shaped and converted as the command line would: one value or a list as the
    option takes, each through its `type`; ConfigError naming the key otherwise."""
    key = key or action.dest
    where = f"{config}: {key}"
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if action.nargs == 0:  # store_const, count: the YAML value is the value
        return value
    many = action.nargs in ("*", "+", argparse.REMAINDER) or isinstance(action.nargs, int)
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected {'a list of values' if many else 'one value'}, got a mapping")
    if isinstance(value, list) and not many:
        raise ConfigError(f"{where}: expected one value, got a list {value!r}")
    out = []
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, (list, dict)):
            raise ConfigError(f"{where}: expected a list of values, got a nested {type(v).__name__}")
        if action.type is None:
            v = v if isinstance(v, (str, bool)) else str(v)
        else:
            if isinstance(v, bool) and (action.type in (int, float) or isinstance(action.type, Number)):
                raise ConfigError(f"{where}: expected a number, got {v!r}")
            try:
                v = action.type(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"{where}: bad value {v!r} ({e})") from None
        out.append(v)
    return out if many else out[0]


def _check_value(action: argparse.Action, value, name: str) -> None:
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{name} {value!r}: not one of {', '.join(map(str, action.choices))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    limit = action.type.limit if isinstance(action.type, Number) else LIMITS.get(action.dest)
    if limit is not None and not limit.allows(value):
        raise ConfigError(f"{name} must be {limit.describe()}, got {value}" + (f" ({limit.why})" if limit.why else ""))


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_path(value, kind: str, name: str) -> None:
    """`value` against its kind (see `PATHS`); ConfigError naming the option and the path."""
    path = Path(value)
    if kind in ("file", "text", "dir"):
        if kind != "dir" and path.is_dir():
            raise ConfigError(f"{name} {value} is a folder; expected a file")
        if kind == "dir" and path.exists() and not path.is_dir():
            raise ConfigError(f"{name} {value} is a file; expected a folder")
        if kind != "dir" and path.is_file() and not os.access(path, os.R_OK):
            raise ConfigError(f"{name} {value} is not readable")
        if kind == "text" and path.is_file():
            if path.stat().st_size > MAX_TEXT_BYTES:
                raise ConfigError(f"{name} {value} is {path.stat().st_size} bytes; a text file of prompts is at most "
                                  f"{MAX_TEXT_BYTES}")
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{name} {value} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return
    if kind == "output":
        kind = "out_file" if path.suffix and not path.is_dir() else "out_dir"
    if path.is_dir():
        if kind == "out_file":
            raise ConfigError(f"{name} {value} is a folder; expected a file to write")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{name} {value}: the folder is not writable")
        return
    if path.exists() and kind == "out_dir":
        raise ConfigError(f"{name} {value} is a file; expected a folder to write into")
    parent = _nearest_existing(path if path.exists() else path.parent)
    if not parent.is_dir():
        raise ConfigError(f"{name} {value}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {value}: cannot write in {parent} (not writable)")


def validate(parser: argparse.ArgumentParser, args, check_paths: bool = True) -> None:
    """Every option's value against what it declares (see the module docstring): shape, choices, finite numbers,
    range, path kind; the first problem raises ConfigError naming the flag and the value."""
    flag = flag_namer(parser)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "verbose"):
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        name = flag(action.dest)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            _check_value(action, v, name)
        kind = getattr(action, "path_kind", PATHS.get(action.dest))
        if check_paths and kind and isinstance(value, str) and value:
            check_path(value, kind, name)
    if getattr(args, "kv_compress", False) and getattr(args, "kv_compress_layer", None):
        check_kv_layers(args, flag=flag)


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
def load_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config {path} is a folder, not a YAML file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is {path.stat().st_size} bytes; a YAML config is at most "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
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


def parse_args(parser: argparse.ArgumentParser, argv=None, check_paths: bool = True) -> argparse.Namespace:
    """Parse `argv` with YAML defaults from `-c/--config` and the `ALIASES`; unknown YAML keys raise ConfigError.
    Then `validate` checks every value against its option (paths too, unless `check_paths` is False: a parse that
    only reads the options) and `check_execution` fills in and checks the device options."""
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
        for action in parser._actions:  # YAML values go through the same shape and type checks as flags
            if action.dest in values and action.option_strings:
                values[action.dest] = yaml_value(action, values[action.dest], known.config, key=by_dest[action.dest])
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if known.config:
        args.config = known.config
    validate(parser, args, check_paths)
    if args.verbose:
        logging_setup(verbose=True)
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    check_execution(args, any(a.split("=")[0] == "--device_target" for a in given))
    return args
