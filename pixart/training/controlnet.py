"""ControlNet training (PixArt-δ, the official `train_controlnet.py`) as a method of the one trainer
(`pixart.training.trainer`): data, feature cache, IDDPM loss, train step, exact resume, msrun data parallel and logs
are the trainer's own.

* the model: the pretrained PixArt (--load_from; PixArt's initialisation from --seed without it), frozen, inside a
  `ControlPixArt` whose control branch copies its first blocks and starts with zero projections
  (`pixart.models.controlnet`), so step 0 computes exactly the base model; AdamW / CAME update the branch only;
* the condition: per training image, its condition image is the same-named file under --control_dir (resized and
  cropped like the image, mirrored with it), or, without --control_dir, the training image itself; --control_type
  canny turns it into its Canny edge map on the fly (none: used as it is, e.g. HED maps made beforehand). The
  condition is VAE-encoded (posterior mean, scaled like the latents) with the batch;
* the train step is full fine-tuning's: the condition latents travel as extra channels of the batch's x0 and
  `ControlNetLoss` splits them off, so accumulation, loss scaling, all-reduce and checkpoints are unchanged;
* the files: checkpoints as train.py's (`checkpoints/step_N/` with model.ckpt = the control branch only, under the
  official names `controlnet.*`), and `<output_dir>/controlnet.ckpt` at the end.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import mindspore as ms
from PIL import Image

from pixart.data.dataset import load_image
from pixart.data.sources import DataError
from pixart.diffusion.loss import DiffusionLoss
from pixart.io import CheckpointError, load_into, write_ckpt
from pixart.models.controlnet import ControlPixArt
from pixart.models.convert import architecture_record
from pixart.training import checkpoint as ckpt
from pixart.training.resume import param_state
from pixart.training.trainer import Method

CONTROL_TYPES = ("canny", "none")
CONTROLNET_FILE = "controlnet.ckpt"


def enabled(args) -> bool:
    return bool(getattr(args, "controlnet", False))


class ControlNetLoss(DiffusionLoss):
    """DiffusionLoss of a ControlPixArt: x0 (B, 2C, H, W) holds the image latents, then the condition latents."""

    def __init__(self, model):
        base = model.base_model
        super().__init__(model, learn_sigma=base.out_channels == 2 * base.config.in_channels)

    def construct(self, x0, t, noise, y, mask, img_hw, aspect_ratio, drop):
        c = noise.shape[1]
        x0, condition, t = x0[:, :c].astype(ms.float32), x0[:, c:], t.astype(ms.int32)
        x_t = self.noised(x0, t, noise)
        data_info = {"img_hw": img_hw, "aspect_ratio": aspect_ratio}
        out = self.model(x_t, t.astype(ms.float32), y, mask, data_info, condition, 1.0, drop)  # (B, 2C, H, W)
        return self.terms(out, x0, x_t, t, noise)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(3, h, w) in [-1, 1] -> (h, w, 3) uint8."""
    return np.clip((image.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def from_uint8(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) or (h, w) uint8 -> (3, h, w) float32 in [-1, 1]."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, 2)
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


class ControlBatchBuilder:
    """`inner`'s batch (a BatchBuilder) with the condition latents appended to x0 as channels."""

    def __init__(self, inner, dataset, image_encoder, scaling: float, control_dir=None, control_type: str = "canny"):
        self.inner, self.dataset, self.image_encoder = inner, dataset, image_encoder
        self.scaling, self.control_type = float(scaling), control_type
        self.control_dir = Path(control_dir) if control_dir else None
        if self.control_dir is not None:
            missing = [e.path for e in dataset.entries if not (self.control_dir / e.path).is_file()]
            if missing:
                raise DataError(f"--control_dir {self.control_dir} lacks the condition image of {len(missing)} "
                                f"training image(s) (same relative path), first: {missing[0]}")

    def condition(self, pos: int, flip: bool) -> np.ndarray:
        """The condition image of entry `pos` (3, h, w) in [-1, 1], at its bucket size, mirrored with it."""
        e = self.dataset.entries[pos]
        if self.control_dir is not None:
            image = load_image(self.control_dir / e.path, e.size, flip, self.dataset.resample)
        else:
            image = self.dataset.image(pos, flip)[0]
        if self.control_type == "canny":
            image = from_uint8(canny(to_uint8(image)))
        return image

    def __call__(self, ref) -> dict[str, np.ndarray]:
        batch = self.inner(ref)
        images = np.stack([self.condition(pos, d.flip) for pos, d in zip(ref.positions, self.inner.draws(ref))])
        mean, _ = self.image_encoder(images)
        batch["x0"] = np.concatenate([batch["x0"], (mean * np.float32(self.scaling)).astype(np.float32)], 1)
        return batch


def canny(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> its Canny edge map (h, w) uint8 (0 / 255), the inference pipeline's extractor."""
    from pixart.pipelines.controlnet import canny_edges  # noqa: the extractor of the inference side
    return np.asarray(canny_edges(Image.fromarray(image)).convert("L"))


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

    def loss(self, compute_model):
        return ControlNetLoss(compute_model)

    def batches(self, builder, data, args):
        return ControlBatchBuilder(builder, data.dataset, data.image_encoder, data.scaling, args.control_dir,
                                   args.control_type)

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

    def record(self, model, args) -> dict[str, str]:
        return {**architecture_record(model.config, args.model), "controlnet_copy_blocks": str(model.copy_blocks_num)}

    def save(self, root: Path, step: int, model, opt, train_state: dict, state: dict, args) -> Path:
        ema_state = opt.ema.state_dict() if opt.ema is not None else None
        return ckpt.save(root, step, control_state(model), ema_state, train_state, state, args.keep_last,
                         self.record(model, args))

    def end(self, model, args, ctx, log, validate, validate_every: int, start_step: int, max_steps: int) -> None:
        if not ctx.is_main:
            return
        path = Path(args.output_dir) / CONTROLNET_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        write_ckpt(control_state(model), tmp, self.record(model, args))
        tmp.replace(path)
        log.info(f"saved ControlNet {path}: sample.py --controlnet_path {path} --control_image ...")

    def digests(self, model) -> list[tuple[str, dict]]:
        return [("parameter digest", control_state(model)), ("base weights digest", base_state(model))]


def check_controlnet_args(args, flag=lambda dest: f"--{dest}") -> None:
    """train.py --controlnet's option checks (before any model loads)."""
    if args.control_type is None:
        args.control_type = "none" if args.control_dir else "canny"
    if args.control_type not in CONTROL_TYPES:
        raise DataError(f"{flag('control_type')} {args.control_type}: training derives {' or '.join(CONTROL_TYPES)} "
                        "conditions; give other maps (HED) as images under --control_dir with --control_type none")
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
