"""The request logic behind the Gradio page, gradio-free (tests call it directly): check a request, generate it
with the loaded pipeline, save PNGs that carry their settings, and say the `sample.py` command (and YAML config)
that reproduces it. A bad value raises a `DemoError`, whose message the page shows; the server goes on.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image

from pixart.data.buckets import ASPECT_RATIOS
from pixart.diffusion import DEFAULT_STEPS, SAMPLERS, timesteps_list
from pixart.models.lora import set_lora_scale
from pixart.pipelines.image_inputs import load_image, load_mask
from pixart.pipelines.controlnet import CONTROL_TYPES
from pixart.pipelines.outputs import provenance, save_images
from pixart.pipelines.text_to_image import check_image_size

MAX_SEED = 2 ** 31 - 1
MAX_STEPS = 999  # fewer than the 1000 training timesteps: more would repeat one (pixart.cli.options)
LORA_SCALES = (0.0, 2.0)  # the page's LoRA scale slider: 0 = the base model, 1 = as trained
CUSTOM = "custom"
KEEP_REQUESTS = 50  # PNG folders kept on disk for download; older ones are deleted
# the server-wide sample.py options a reproduce-command carries, in this order
_MODEL_FLAGS = ("model", "checkpoint", "lora_path", "vae_root", "text_encoder_root", "tokenizer_root",
                "sd_scale_factor", "max_length", "dtype", "text_encoder_dtype", "uncond", "dpm_schedule", "timesteps",
                "device_target", "mode",
                "jit_level", "enable_flash_attention", "kv_compress", "kv_compress_sampling",
                "kv_compress_scale_factor", "kv_compress_layer")


class DemoError(ValueError):
    """A request the demo refuses; its message is shown in the page."""


def _int(name: str, value, low: int | None, high: int | None = None, why_high: str = "") -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a whole number, got {value!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    v = int(f)
    if low is not None and v < low:
        raise DemoError(f"{name} must be at least {low}, got {v}")
    if high is not None and v > high:
        raise DemoError(f"{name} must be at most {high}{why_high}, got {v}")
    return v


def editor_inputs(value) -> tuple:
    """(image, mask or None) from the page's image editor value {"background", "layers", ...} (numpy RGBA): the
    uploaded picture, and where any layer is painted the area to repaint (white); (None, None) with no upload."""
    if not isinstance(value, dict) or value.get("background") is None:
        return None, None
    background = np.asarray(value["background"])
    if background.ndim != 3 or background.size == 0 or not background[..., -1].any():
        return None, None  # an empty canvas: nothing uploaded
    image = background[..., :3]
    painted = [np.asarray(layer)[..., -1] > 0 for layer in value.get("layers") or [] if layer is not None]
    painted = [m for m in painted if m.shape == image.shape[:2]]
    if not painted or not np.any(painted):
        return image, None
    return image, (np.any(painted, axis=0) * 255).astype(np.uint8)


class DemoApp:
    """The loaded pipeline and the request logic behind the page (gradio-free, so tests call it directly).

    `args` are the server's options; `sample_args(argv)` parses a `sample.py` command line (its parser and YAML
    rules), which the reproduce-command is written against."""

    def __init__(self, pipe, args, sample_args: Callable[[list[str]], argparse.Namespace],
                 out_dir: str | Path | None = None, log=print):
        self.pipe, self.args, self.log = pipe, args, log
        self._sample_args = sample_args
        self.resolution = pipe.resolution
        self.max_size = args.max_image_size or 2 * self.resolution
        self.max_batch = max(1, args.max_batch_size)
        self.table = ASPECT_RATIOS[min(ASPECT_RATIOS, key=lambda r: abs(r - self.resolution))]
        self.lora = bool(getattr(args, "lora_path", None))  # loaded once with the model; the page sets its scale
        self._lora_scale = args.lora_scale if self.lora else None  # the scale the transformer holds now
        self.controlnet = bool(getattr(args, "controlnet", None))  # PixArt-δ: the page takes a control image
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="pixart-gradio-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one generation at a time even if called outside gradio's queue
        self._count = 0
        self._config, self._base = self._sample_baseline()
        self._defaults = sample_args([])

    # -- defaults the page starts from (the YAML / flags) ------------------------------------------------------
    def defaults(self) -> dict:
        a = self.args
        h, w = a.image_height or self.resolution, a.image_width or self.resolution
        negative = a.negative_prompt if isinstance(a.negative_prompt, str) else (a.negative_prompt or [""])[0]
        return dict(prompt=(a.prompt or [""])[0], negative_prompt=negative, sampler=a.sampling_method,
                    steps=a.sampling_steps or DEFAULT_STEPS[a.sampling_method], guidance_scale=a.guidance_scale,
                    seed=a.seed, width=w, height=h, batch_size=min(a.num_images_per_prompt, self.max_batch),
                    resolution_binning=a.resolution_binning, aspect_ratio=self.preset_for(h, w),
                    lora_scale=a.lora_scale if self.lora else None)

    def presets(self) -> list[tuple[str, str]]:
        """(label, key) for the aspect-ratio dropdown: the model's sampling bins, width x height."""
        return [(f"{CUSTOM} (width and height below)", CUSTOM)] + [
            (f"{key}  ({w}x{h})", key) for key, (h, w) in sorted(self.table.items(), key=lambda kv: float(kv[0]))]

    def preset_size(self, key: str) -> tuple[int, int] | None:
        """(width, height) of a preset, or None for custom."""
        if key in self.table:
            h, w = self.table[key]
            return int(w), int(h)
        return None

    def preset_for(self, height: int, width: int) -> str:
        for key, (h, w) in self.table.items():
            if (int(h), int(w)) == (int(height), int(width)):
                return key
        return CUSTOM

    # -- one request ----------------------------------------------------------------------------------------
    def check_request(self, prompt, negative_prompt, sampler, steps, guidance_scale, seed, randomize_seed,
                      width, height, batch_size, resolution_binning, lora_scale=None, image=None, mask=None,
                      strength=None, control_image=None, control_scale=None, control_type=None) -> dict:
        """Validate and normalise a request; a DemoError names the first bad value. `lora_scale` counts only when
        the server has a LoRA (None: the one it was started with). `image` (an array or PIL image) makes it
        image-to-image at `strength`, and `mask` (white or painted = repaint, None: no mask) inpainting."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoError("the prompt is empty: type what the image should show")
        if sampler not in SAMPLERS:
            raise DemoError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        steps = _int("steps", steps, 1, MAX_STEPS)
        try:
            guidance_scale = float(guidance_scale)
        except (TypeError, ValueError):
            raise DemoError(f"guidance scale must be a number, got {guidance_scale!r}") from None
        if not np.isfinite(guidance_scale) or not 0 <= guidance_scale <= 50:
            raise DemoError(f"guidance scale must be between 0 and 50, got {guidance_scale}")
        too_large = f" for {self.args.model} (trained at {self.resolution} px; --max_image_size raises the limit)"
        width = _int("width", width, None, self.max_size, too_large)
        height = _int("height", height, None, self.max_size, too_large)
        binning = bool(resolution_binning)
        try:
            check_image_size(height, width, self.pipe.transformer.patch_size, binning)
        except ValueError as e:
            raise DemoError(str(e)) from None
        batch_size = _int("batch size", batch_size, 1, self.max_batch, " (--max_batch_size raises the limit)")
        if randomize_seed:
            seed = int(np.random.default_rng().integers(0, MAX_SEED - batch_size))
        seed = _int("seed", seed, 0, MAX_SEED - batch_size)
        if self.lora:
            lora_scale = self.args.lora_scale if lora_scale is None else lora_scale
            try:
                lora_scale = float(lora_scale)
            except (TypeError, ValueError):
                raise DemoError(f"LoRA scale must be a number, got {lora_scale!r}") from None
            if not np.isfinite(lora_scale) or not LORA_SCALES[0] <= lora_scale <= LORA_SCALES[1]:
                raise DemoError(f"LoRA scale must be between {LORA_SCALES[0]:g} and {LORA_SCALES[1]:g}, "
                                f"got {lora_scale}")
        else:
            lora_scale = None
        request = dict(prompt=prompt.strip(), negative_prompt=negative_prompt or "", sampler=sampler, steps=steps,
                       guidance_scale=guidance_scale, seed=seed, width=width, height=height, batch_size=batch_size,
                       resolution_binning=binning, lora_scale=lora_scale)
        if image is not None:
            request.update(self._check_image(image, mask, strength))
        elif mask is not None:
            raise DemoError("a mask needs an input image: upload the picture to inpaint")
        request.update(self.check_control(control_image, control_scale, control_type))
        return request

    def _check_image(self, image, mask, strength) -> dict:
        try:
            strength = float(self.args.strength if strength is None else strength)
        except (TypeError, ValueError):
            raise DemoError(f"strength must be a number in [0, 1], got {strength!r}") from None
        if not 0.0 <= strength <= 1.0:
            raise DemoError(f"strength must be in [0, 1], got {strength}")
        try:
            out = dict(image=load_image(image), strength=strength)
            if mask is not None:
                out["mask_image"] = load_mask(mask)
        except ValueError as e:
            raise DemoError(str(e)) from None
        return out

    def check_control(self, image, scale, kind) -> dict:
        """The ControlNet part of a request (none without --controlnet): a PIL image or None (the base model), a
        finite scale, a known type; None values take the server's flags."""
        if not self.controlnet:
            return {}
        a = self.args
        kind = a.control_type if kind is None else kind
        if kind not in CONTROL_TYPES:
            raise DemoError(f"control type must be one of {', '.join(CONTROL_TYPES)}, got {kind!r}")
        try:
            scale = float(a.control_scale if scale is None else scale)
        except (TypeError, ValueError):
            raise DemoError(f"control scale must be a number, got {scale!r}") from None
        if not np.isfinite(scale):
            raise DemoError(f"control scale must be a finite number, got {scale}")
        if image is not None and not isinstance(image, Image.Image):
            raise DemoError(f"the control image must be an image, got {type(image).__name__}")
        return dict(control_image=getattr(a, "_control", None) if image is None else image, control_scale=scale,
                    control_type=kind)

    def generate(self, request: dict, progress=None) -> dict:
        """Generate a checked request; returns paths of the PNGs (with metadata), settings, and the command."""
        a = self.args
        options = {"schedule": a.dpm_schedule} if request["sampler"] == "dpm" else {}
        with self._lock:
            self._count += 1
            n = self._count
            t0 = time.time()
            if progress is not None:
                progress(0, desc="encoding the prompt")
            if self.lora and request["lora_scale"] != self._lora_scale:
                set_lora_scale(self.pipe.transformer, request["lora_scale"])  # a compiled graph reads the new scale
                self._lora_scale = request["lora_scale"]
            extra = {k: request[k] for k in ("image", "mask_image", "strength") if k in request}
            if a.timesteps and request["sampler"] == a.sampling_method:  # the server's custom schedule (DMD)
                extra["timesteps"] = timesteps_list(a.timesteps)
            if "mask_image" in request:
                extra["mask_blur"] = a.mask_blur
            if self.controlnet:
                extra.update(control_image=request["control_image"], control_type=request["control_type"],
                             controlnet_conditioning_scale=request["control_scale"])
            result = self.pipe(request["prompt"], negative_prompt=request["negative_prompt"],
                               height=request["height"], width=request["width"], sampler=request["sampler"],
                               num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
                               num_images_per_prompt=request["batch_size"], seed=request["seed"], uncond=a.uncond,
                               use_resolution_binning=request["resolution_binning"], progress=True,
                               sampler_options=options, **extra)
            seconds = time.time() - t0
        folder = self.out_dir / f"{n:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("image", "mask_image"):  # the inputs beside the outputs: the reproduce command names them
            if key in request:
                request[key + "_path"] = str(folder / f"input-{key.replace('_image', '')}.png")
                request[key].save(request[key + "_path"])
        self._prune()
        if request.get("control_image") is not None:  # kept beside the images: the reproduce-command names it
            request["control_path"] = str(folder / "control.png")
            request["control_image"].save(request["control_path"])
        made_by = provenance(a.model, a.checkpoint, a.lora_path, request["lora_scale"])
        paths = [str(p) for p in save_images(result, lambda _, s: folder / f"pixart-{n:05d}-seed{s['seed']}.png",
                                             made_by)]
        self.log(f"request {n}: {request['batch_size']} image(s) {request['width']}x{request['height']}, "
                 f"{request['sampler']} {request['steps']} steps, seed {request['seed']}: {seconds:.1f}s")
        return dict(paths=paths, settings=result.settings, seconds=seconds, seed=request["seed"],
                    command=self.command(request), yaml=self.yaml_config(request))

    def _prune(self):
        folders = sorted(p for p in self.out_dir.iterdir() if p.is_dir() and p.name.isdigit())
        for old in folders[:-KEEP_REQUESTS]:
            for f in old.iterdir():
                f.unlink(missing_ok=True)
            old.rmdir()

    # -- reproducing a request with sample.py -------------------------------------------------------------
    def _sample_baseline(self):
        """(config, namespace): what sample.py sees before any flag, with this server's -c config if sample.py
        accepts it (a YAML with server-only keys such as `port` is left out, and every model flag is spelled)."""
        config = getattr(self.args, "config", None)
        if config:
            try:
                return config, self._sample_args(["-c", str(config)])
            except (ValueError, SystemExit):  # a ConfigError: the YAML has keys sample.py does not take
                pass
        return None, self._sample_args([])

    def sample_options(self, request: dict, complete: bool = False) -> dict:
        """sample.py options (dest: value) that reproduce `request` with this server's model flags: those that
        differ from what the -c config already says, or (`complete`, for a YAML config of its own) from sample.py's
        defaults, the model and its files always."""
        a, base = self.args, (self._defaults if complete else self._base)
        opts = {}
        for name in _MODEL_FLAGS:
            value = getattr(a, name)
            always = complete and name in ("model", "checkpoint", "vae_root", "text_encoder_root", "tokenizer_root")
            if value is not None and (always or value != getattr(base, name)):
                opts[name] = value
        opts.update(prompt=[request["prompt"]], negative_prompt=[request["negative_prompt"]],
                    sampling_method=request["sampler"], sampling_steps=request["steps"],
                    guidance_scale=request["guidance_scale"], seed=request["seed"],
                    image_height=request["height"], image_width=request["width"],
                    resolution_binning=request["resolution_binning"],
                    num_images_per_prompt=request["batch_size"])
        if self.lora:
            opts["lora_scale"] = request["lora_scale"]
        if "image_path" in request:
            opts.update(image=request["image_path"], strength=request["strength"])
            if "mask_image_path" in request:
                opts.update(mask_image=request["mask_image_path"], mask_blur=a.mask_blur)
        if self.controlnet:
            opts.update(controlnet=a.controlnet, control_scale=request["control_scale"],
                        control_type=request["control_type"])
            if request.get("control_path"):
                opts["control_image"] = request["control_path"]
        if not complete:  # neutralise what the -c config would add to this one image
            if self._base.prompt_path:
                opts["prompt_path"] = ""
            for name in ("num_trials", "batch_size"):
                if getattr(self._base, name) != 1:
                    opts[name] = 1
        return opts

    def command(self, request: dict) -> str:
        """A `python sample.py ...` line: the server's config file (if any), then explicit flags."""
        parts = ["python", "sample.py"]
        if self._config:
            parts += ["-c", str(self._config)]
        for name, value in self.sample_options(request).items():
            if isinstance(value, bool):
                parts += [f"--{name}", str(value).lower()]
            elif isinstance(value, list):
                if value:
                    parts += [f"--{name}", *map(str, value)]
            else:
                parts += [f"--{name}", str(value)]
        return shlex.join(parts)

    def yaml_config(self, request: dict) -> str:
        """The same as a complete YAML config: `python sample.py -c this.yaml`."""
        return yaml.safe_dump(self.sample_options(request, complete=True), sort_keys=False, allow_unicode=True)


