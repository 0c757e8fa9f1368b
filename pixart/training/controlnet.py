"""ControlNet training (PixArt-δ, the official `train_controlnet.py`) as a method of the one trainer
(`pixart.training.trainer`): data, feature cache, IDDPM loss, train step, exact resume, msrun data parallel and logs
are the trainer's own.

* the model: the pretrained PixArt (--load_from; PixArt's initialisation from --seed without it), frozen, inside a
  `ControlPixArt` whose control branch copies its first blocks and starts with zero projections
  (`pixart.models.controlnet`), so step 0 computes exactly the base model; AdamW / CAME update the branch only;
* the condition: per training image, its condition image is the same-named file under --control_dir (resized and
  cropped like the image, mirrored with it), or, without --control_dir, the training image itself; --control_type
  canny turns it into its Canny edge map on the fly, hed / none take HED maps / any images made beforehand, as
  sampling does (`pixart.pipelines.controlnet.condition_image`). The condition is VAE-encoded (posterior mean,
  scaled like the latents) when its batch needs it; with --feature_dir its latents are kept under
  `<feature_dir>/control/` (`ConditionCache`) for the next epochs and runs;
* the train step is full fine-tuning's: the condition latents travel as extra channels of the batch's x0 and
  `ControlNetLoss` splits them off, so accumulation, loss scaling, all-reduce and checkpoints are unchanged;
* the files: checkpoints as train.py's (`checkpoints/step_N/` with model.ckpt = the control branch only, under the
  official names `controlnet.*`), and `<output_dir>/controlnet.ckpt` at the end.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import mindspore as ms
from PIL import Image

from pixart.data.dataset import load_image
from pixart.data.features import image_key
from pixart.data.sources import DataError
from pixart.diffusion.loss import DiffusionLoss
from pixart.io import CheckpointError, load_into, write_ckpt
from pixart.models.controlnet import ControlNetConfig, ControlPixArt
from pixart.models.convert import save_controlnet
from pixart.pipelines.controlnet import condition_image, encode_condition
from pixart.training import checkpoint as ckpt
from pixart.training.resume import param_state
from pixart.training.trainer import Method

CONTROLNET_FILE = "controlnet.ckpt"


def enabled(args) -> bool:
    return bool(getattr(args, "controlnet", False))


class ControlNetLoss(DiffusionLoss):
    """DiffusionLoss of a ControlPixArt: x0 (B, 2C, H, W) holds the image latents, then the condition latents."""

    def __init__(self, model, snr_gamma: float | None = None):
        base = model.base_model
        super().__init__(model, learn_sigma=base.out_channels == 2 * base.config.in_channels, snr_gamma=snr_gamma)

    def construct(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop):
        c = noise.shape[1]
        x0, condition, t = x0[:, :c].astype(ms.float32), x0[:, c:], t.astype(ms.int32)
        x_t = self.noised(x0, t, noise)
        data_info = {"img_hw": img_hw, "aspect_ratio": aspect_ratio}
        out = self.model(x_t, t.astype(ms.float32), y, mask, data_info, drop, condition)  # (B, 2C, H, W)
        return self.terms(out, x0, x_t, t, noise)


def to_pil(image: np.ndarray) -> Image.Image:
    """(3, h, w) in [-1, 1] -> an RGB image."""
    return Image.fromarray(np.clip((image.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8))


class ConditionCache:
    """Condition latents on disk beside the feature cache: `<feature_dir>/control/<what>/<image key>[.flip].npy`,
    `<what>` naming the control type and the condition's source. Each file is written whole under a temporary name
    and renamed, so ranks that fill it at the same time, or a killed run, never leave half a file."""

    def __init__(self, feature_dir, control_dir, control_type: str):
        source = hashlib.sha1(str(Path(control_dir).resolve()).encode()).hexdigest()[:12] if control_dir else "image"
        self.folder = Path(feature_dir) / "control" / f"{control_type}-{source}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, path: str, flip: bool) -> Path:
        return self.folder / f"{image_key(path)}{'.flip' if flip else ''}.npy"

    def get(self, path: str, flip: bool) -> np.ndarray | None:
        file = self._path(path, flip)
        return np.load(file) if file.is_file() else None

    def put(self, path: str, flip: bool, latents: np.ndarray) -> None:
        file = self._path(path, flip)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, latents)
        os.replace(tmp, file)


class ControlBatchBuilder:
    """`inner`'s batch (a BatchBuilder) with the condition latents appended to x0 as channels. Each condition is
    encoded on its own, so its latents do not depend on the batch it comes in (and equal the cached ones)."""

    def __init__(self, inner, dataset, image_encoder, scaling: float, control_dir=None, control_type: str = "canny",
                 cache: ConditionCache | None = None):
        self.inner, self.dataset, self.image_encoder = inner, dataset, image_encoder
        self.scaling, self.control_type, self.cache = float(scaling), control_type, cache
        self.control_dir = Path(control_dir) if control_dir else None
        if self.control_dir is not None:
            missing = [e.path for e in dataset.entries if not (self.control_dir / e.path).is_file()]
            if missing:
                raise DataError(f"--control_dir {self.control_dir} lacks the condition image of {len(missing)} "
                                f"training image(s) (same relative path), first: {missing[0]}")

    def condition(self, pos: int, flip: bool) -> np.ndarray:
        """The condition of entry `pos` (3, h, w) in [-1, 1] at its bucket size, mirrored with the image, made as
        sampling makes it (`pixart.pipelines.controlnet.condition_image`)."""
        e = self.dataset.entries[pos]
        if self.control_dir is not None:
            image = load_image(self.control_dir / e.path, e.size, flip, self.dataset.resample)
        else:
            image = self.dataset.image(pos, flip)[0]
        return condition_image(to_pil(image), self.control_type, *e.size)[0]

    def latents(self, pos: int, flip: bool) -> np.ndarray:
        """The condition latents of entry `pos` (C, h, w), from the cache when it holds them."""
        path = self.dataset.entries[pos].path
        found = self.cache.get(path, flip) if self.cache is not None else None
        if found is None:
            found = encode_condition(self.image_encoder.vae, self.condition(pos, flip)[None], self.scaling)[0]
            if self.cache is not None:
                self.cache.put(path, flip, found)
        return found

    def __call__(self, ref) -> dict[str, np.ndarray]:
        batch = self.inner(ref)
        latents = np.stack([self.latents(pos, d.flip) for pos, d in zip(ref.positions, self.inner.draws(ref))])
        batch["x0"] = np.concatenate([batch["x0"], latents], 1)
        return batch


def control_state(model: ControlPixArt) -> dict[str, np.ndarray]:
    """The control branch's weights under the official names `controlnet.*`."""
    return {p.name: p.asnumpy() for p in model.control_parameters()}


def base_state(model: ControlPixArt) -> dict[str, np.ndarray]:
    return param_state(model.base_model)


class ControlNetMethod(Method):
    """A control branch on a frozen PixArt; the optimizer (and EMA) over the branch only."""

    script = "train.py --controlnet"

    def describe(self, args, ctx, mode: str, resolution: int, multi_scale: bool) -> str:
        return (f"{self.script}: ControlNet on {args.model} ({args.load_from or 'PixArt init'}) at {resolution} px "
                f"({'multi-aspect buckets' if multi_scale else 'square'}), condition "
                f"{('--control_dir ' + str(args.control_dir)) if args.control_dir else 'the training image'} "
                f"({args.control_type}), {ctx.world_size} rank(s), {mode} mode on {args.device_target}")

    def wrap(self, model, args, log):
        for p in model.get_parameters():
            p.requires_grad = False
        net = ControlPixArt(model, args.copy_blocks_num)
        net.initialize_from_base()
        return net

    def trainable(self, model, args, log) -> list:
        return model.control_parameters()

    def loss(self, compute_model, args):
        return ControlNetLoss(compute_model, args.snr_gamma)

    def batches(self, builder, data, args):
        cache = ConditionCache(args.feature_dir, args.control_dir, args.control_type) if args.feature_dir else None
        return ControlBatchBuilder(builder, data.dataset, data.image_encoder, data.scaling, args.control_dir,
                                   args.control_type, cache)

    def report_model(self, model, params, data, args) -> str:
        n_control = sum(int(np.prod(p.shape)) for p in params)
        n_base = sum(int(np.prod(p.shape)) for p in model.base_model.get_parameters())
        return (f"ControlNet: {model.copy_blocks_num} of {model.config.depth} blocks copied, "
                f"{n_control / 1e6:.2f} M trainable parameters on the frozen {n_base / 1e6:.2f} M; captions "
                f"{data.max_length} x {data.caption_channels}, latents x{data.scaling:g}")

    def validation(self, args, steps_per_epoch: int):
        return None  # sampling a ControlNet needs a condition image: sample.py --control_image after training

    def restore(self, resumed, path, model, opt, args, log) -> None:
        names = {p.name for p in model.control_parameters()}
        if set(resumed["model"]) != names:
            raise CheckpointError(f"checkpoint {path} is not this run's control branch ({len(resumed['model'])} "
                                  f"tensors, the branch of {model.copy_blocks_num} blocks has {len(names)}): check "
                                  "--copy_blocks_num, --depth and --hidden_size")
        load_into(model.controlnet, resumed["model"], what=f"control branch of checkpoint {path}")
        if opt.ema is not None:
            if resumed["ema"] is None:
                log.info(f"note: checkpoint {path} has no EMA; the EMA restarts from the weights")
            else:
                opt.ema.load_state_dict(resumed["ema"])

    def save(self, root: Path, step: int, model, opt, train_state: dict, state: dict, args) -> Path:
        """train.py's checkpoint folder; model.ckpt and ema.ckpt are ControlNet files (sample.py loads them)."""
        cfg = ControlNetConfig(model.config, model.copy_blocks_num, args.model)

        def write(folder: Path) -> None:
            save_controlnet(control_state(model), cfg, folder / ckpt.MODEL)
            if opt.ema is not None:
                save_controlnet(opt.ema.state_dict(), cfg, folder / ckpt.EMA)
            write_ckpt(train_state, folder / ckpt.TRAIN_STATE)
            ckpt.write_state(folder, state)
        return ckpt.save_folder(root, step, write, args.keep_last, ckpt.FULL)

    def end(self, model, args, ctx, log, validate, validate_every: int, start_step: int, max_steps: int) -> None:
        if not ctx.is_main:
            return
        path = Path(args.output_dir) / CONTROLNET_FILE
        tmp = path.with_name(f".{path.stem}.tmp.ckpt")  # written whole, then renamed
        save_controlnet(control_state(model), ControlNetConfig(model.config, model.copy_blocks_num, args.model), tmp)
        tmp.replace(path)
        log.info(f"saved ControlNet {path}: sample.py --controlnet {path} --control_image ...")

    def digests(self, model) -> list[tuple[str, dict]]:
        return [("parameter digest", control_state(model)), ("base weights digest", base_state(model))]


def check_controlnet_training_args(args, flag=lambda dest: f"--{dest}") -> None:
    """train.py --controlnet's option checks (before any model loads)."""
    if args.control_type is None:
        args.control_type = "none" if args.control_dir else "canny"
    if args.control_type == "hed" and not args.control_dir:
        raise DataError(f"{flag('control_type')} hed needs HED maps made beforehand, as images under "
                        f"{flag('control_dir')} (the HED network is not ported); or use --control_type canny")
    if args.control_dir and not Path(args.control_dir).is_dir():
        raise DataError(f"{flag('control_dir')} not found: {args.control_dir}")
    if not args.vae_root:
        raise DataError(f"--controlnet needs {flag('vae_root')}: condition images are VAE-encoded on the fly")
    if args.copy_blocks_num is not None and args.copy_blocks_num < 1:
        raise DataError(f"{flag('copy_blocks_num')} must be >= 1, got {args.copy_blocks_num}")
    for name, why in (("recompute", "block-by-block recompute runs PixArt's blocks only"),
                      ("instance_data_dir", "DreamBooth and ControlNet are separate trainings"),
                      ("validation_prompts", "validation images of a ControlNet need a condition image; sample "
                                             "with sample.py --control_image after training")):
        if getattr(args, name, None):
            raise DataError(f"{flag(name)} with --controlnet: {why}")
