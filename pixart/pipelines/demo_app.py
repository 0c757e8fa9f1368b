"""What `gradio_demo.py` does: load the models once, then serve a Gradio page that generates with them.

The page takes what `sample.py` takes per image (prompt, negative prompt, sampler, steps, guidance, seed, size or an
aspect-ratio preset from the bucket table, batch size, and the LoRA scale when the server was started with
`--lora_path`), shows the images, offers them as PNGs that carry their settings as metadata, and prints the
`sample.py` command (and YAML config) that reproduces them. Requests are
queued: one generation at a time, the others wait with their place in the queue shown. A bad value raises a
`gr.Error`, which the page shows; the server goes on.

Everything but `build_app` / `serve` works without gradio, so it is tested directly.
"""
from __future__ import annotations

import os
import shlex
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import yaml

from pixart.config import ConfigError, parse_args
from pixart.data.buckets import ASPECT_RATIOS
from pixart.diffusion import DEFAULT_STEPS, SAMPLERS
from pixart.pipelines.sample_run import build_parser

MAX_SEED = 2 ** 31 - 1
MAX_STEPS = 1000
LORA_SCALES = (0.0, 2.0)  # the page's LoRA scale slider: 0 = the base model, 1 = as trained
CUSTOM = "custom"
KEEP_REQUESTS = 50  # PNG folders kept on disk for download; older ones are deleted
# the server-wide sample.py options a reproduce-command carries, in this order
_MODEL_FLAGS = ("model", "checkpoint", "lora_path", "vae_root", "text_encoder_root", "tokenizer_root",
                "sd_scale_factor", "dtype", "text_encoder_dtype", "uncond", "dpm_schedule", "device_target", "mode",
                "jit_level", "enable_flash_attention", "kv_compress", "kv_compress_sampling",
                "kv_compress_scale_factor", "kv_compress_layer")


class DemoError(ValueError):
    """A request the demo refuses; its message is shown in the page."""


def build_demo_parser(description: str | None = None):
    """sample.py's parser (same model flags, same YAML rules) plus the server's options."""
    p = build_parser(description)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=7788)
    g.add_argument("--max_image_size", type=int, default=None,
                   help="largest height or width a request may ask for (default: twice the model's training size)")
    g.add_argument("--max_batch_size", type=int, default=4, help="largest batch a request may ask for")
    g.add_argument("--queue_size", type=int, default=32, help="requests that may wait; more are refused")
    return p


def ensure_demo_bundle(args, log=print) -> bool:
    """If the model flags name the embedded demo bundle and it is not built yet, build it (seconds, offline).
    Returns whether it was built."""
    from pixart import demo
    if not args.checkpoint or Path(args.checkpoint).name != demo.CHECKPOINT:
        return False
    root = Path(args.checkpoint).parent
    comp = root / demo.COMPONENTS
    named = [Path(v) for v in (args.vae_root, args.text_encoder_root, args.tokenizer_root) if v]
    if any(p.parent != comp for p in named) or demo.is_built(root):
        return False
    log(f"demo bundle not found under {root}: building it (no downloads, a few seconds)")
    demo.build(root, log=log)
    return True


def _int(name: str, value, low: int, high: int | None = None, why_high: str = "") -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a whole number, got {value!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise DemoError(f"{name} must be a whole number, got {value!r}")
    v = int(f)
    if v < low:
        raise DemoError(f"{name} must be at least {low}, got {v}")
    if high is not None and v > high:
        raise DemoError(f"{name} must be at most {high}{why_high}, got {v}")
    return v


class DemoApp:
    """The loaded pipeline and the request logic behind the page (gradio-free, so tests call it directly)."""

    def __init__(self, pipe, args, out_dir: str | Path | None = None, log=print):
        self.pipe, self.args, self.log = pipe, args, log
        self.resolution = pipe.resolution
        self.max_size = args.max_image_size or 2 * self.resolution
        self.max_batch = max(1, args.max_batch_size)
        self.table = ASPECT_RATIOS[min(ASPECT_RATIOS, key=lambda r: abs(r - self.resolution))]
        self.lora = bool(getattr(args, "lora_path", None))  # loaded once with the model; the page sets its scale
        self._lora_scale = args.lora_scale if self.lora else None  # the scale the transformer holds now
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="pixart-gradio-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one generation at a time even if called outside gradio's queue
        self._count = 0
        self._config, self._base = self._sample_baseline()
        self._defaults = parse_args(build_parser(), [])

    # -- defaults the page starts from (the YAML / flags) ------------------------------------------------------
    def defaults(self) -> dict:
        a = self.args
        h, w = a.image_height or self.resolution, a.image_width or self.resolution
        return dict(prompt=(a.prompt or [""])[0], negative_prompt=a.negative_prompt, sampler=a.sampling_method,
                    steps=a.sampling_steps or DEFAULT_STEPS[a.sampling_method], guidance_scale=a.guidance_scale,
                    seed=a.seed, width=w, height=h, batch_size=min(a.batch_size, self.max_batch),
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
                      width, height, batch_size, resolution_binning, lora_scale=None) -> dict:
        """Validate and normalise a request; a DemoError names the first bad value. `lora_scale` counts only when
        the server has a LoRA (None: the one it was started with)."""
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
        width = _int("width", width, 8, self.max_size, too_large)
        height = _int("height", height, 8, self.max_size, too_large)
        binning = bool(resolution_binning)
        multiple = 8 * self.pipe.transformer.patch_size
        if not binning and (width % multiple or height % multiple):
            raise DemoError(f"{width}x{height} is not reachable without resolution binning: width and height must "
                            f"be multiples of {multiple}")
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
        return dict(prompt=prompt.strip(), negative_prompt=negative_prompt or "", sampler=sampler, steps=steps,
                    guidance_scale=guidance_scale, seed=seed, width=width, height=height, batch_size=batch_size,
                    resolution_binning=binning, lora_scale=lora_scale)

    def generate(self, request: dict, progress=None) -> dict:
        """Generate a checked request; returns paths of the PNGs (with metadata), settings, and the command."""
        from pixart.pipelines.outputs import save_png
        a = self.args
        options = {"schedule": a.dpm_schedule} if request["sampler"] == "dpm" else {}
        with self._lock:
            self._count += 1
            n = self._count
            t0 = time.time()
            if progress is not None:
                progress(0, desc="encoding the prompt")
            if self.lora and request["lora_scale"] != self._lora_scale:
                from pixart.models.lora import set_lora_scale
                set_lora_scale(self.pipe.transformer, request["lora_scale"])  # a compiled graph reads the new scale
                self._lora_scale = request["lora_scale"]
            result = self.pipe(request["prompt"], negative_prompt=request["negative_prompt"],
                               height=request["height"], width=request["width"], sampler=request["sampler"],
                               num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
                               num_images_per_prompt=request["batch_size"], seed=request["seed"], uncond=a.uncond,
                               use_resolution_binning=request["resolution_binning"], progress=True,
                               sampler_options=options)
            seconds = time.time() - t0
        folder = self.out_dir / f"{n:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        self._prune()
        paths = []
        for image, settings in zip(result.images, result.settings):
            settings.update(model=a.model, checkpoint=str(a.checkpoint))
            if self.lora:
                settings.update(lora=str(a.lora_path), lora_scale=request["lora_scale"])
            path = folder / f"pixart-{n:05d}-seed{settings['seed']}.png"
            save_png(image, path, settings)
            paths.append(str(path))
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
                return config, parse_args(build_parser(), ["-c", str(config)])
            except (ConfigError, SystemExit):
                pass
        return None, parse_args(build_parser(), [])

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
        opts.update(prompt=[request["prompt"]], negative_prompt=request["negative_prompt"],
                    sampling_method=request["sampler"], sampling_steps=request["steps"],
                    guidance_scale=request["guidance_scale"], seed=request["seed"],
                    image_height=request["height"], image_width=request["width"],
                    resolution_binning=request["resolution_binning"], batch_size=request["batch_size"])
        if self.lora:
            opts["lora_scale"] = request["lora_scale"]
        if not complete:  # neutralise what the -c config would add to this one image
            if self._base.prompt_path:
                opts["prompt_path"] = ""
            if self._base.num_trials != 1:
                opts["num_trials"] = 1
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


# -- the page ------------------------------------------------------------------------------------------------
CSS = """
#gallery img { image-rendering: auto; }
footer { display: none !important; }
"""


def build_app(app: DemoApp, load_seconds: float = 0.0):
    """The gr.Blocks page for `app` (queued with concurrency 1)."""
    import gradio as gr

    d = app.defaults()
    a = app.args
    untrained = " The embedded demo bundle is **untrained: its images are noise**." if \
        Path(str(a.checkpoint)).name.endswith("-demo.ckpt") else ""

    def on_generate(prompt, negative_prompt, sampler, steps, guidance_scale, seed, randomize_seed, width, height,
                    batch_size, resolution_binning, lora_scale, progress=gr.Progress(track_tqdm=True)):
        try:
            request = app.check_request(prompt, negative_prompt, sampler, steps, guidance_scale, seed,
                                        randomize_seed, width, height, batch_size, resolution_binning, lora_scale)
            out = app.generate(request, progress=progress)
        except DemoError as e:
            app.log(f"refused: {e}")
            raise gr.Error(str(e), title="Cannot generate", duration=30, print_exception=False) from None
        except Exception as e:  # a failure inside the model: report it, keep serving
            traceback.print_exc()
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}", title="Generation failed",
                           duration=30, print_exception=False) from None
        s = out["settings"][0]
        captions = [f"seed {t['seed']}, {t['width']}x{t['height']}" for t in out["settings"]]
        status = (f"{len(out['paths'])} image(s) of {s['width']}x{s['height']}, {s['sampler']} {s['steps']} steps, "
                  f"guidance {s['guidance_scale']}, " + (f"LoRA scale {s['lora_scale']:g}, " if app.lora else "")
                  + f"seed {out['seed']}"
                  + (f"..{out['seed'] + len(out['paths']) - 1}" if len(out["paths"]) > 1 else "")
                  + f" in {out['seconds']:.1f} s")
        return (list(zip(out["paths"], captions)), out["paths"], out["command"], out["yaml"], out["seed"], status)

    def on_preset(key):
        size = app.preset_size(key)
        if size is None:
            return gr.update(), gr.update()
        return size[0], size[1]

    def on_size(width, height):
        try:
            return app.preset_for(int(height), int(width))
        except (TypeError, ValueError):
            return CUSTOM

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="PixArt (MindSpore)", delete_cache=(3600, 86400)) as demo:  # hourly: drop day-old files
        lora = f" with the LoRA `{a.lora_path}`" if app.lora else ""
        gr.Markdown(f"# PixArt text-to-image (MindSpore)\n"
                    f"Model **{a.model}** (`{a.checkpoint}`){lora}, trained at {app.resolution} px, loaded in "
                    f"{load_seconds:.1f} s. One generation runs at a time; other requests wait in a queue that "
                    f"shows their place.{untrained}", elem_id="header")
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", value=d["prompt"], lines=3, elem_id="prompt",
                                    placeholder="a small cactus with a happy face in the Sahara desert")
                negative = gr.Textbox(label="Negative prompt", value=d["negative_prompt"], elem_id="negative-prompt")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS), value=d["sampler"], label="Sampler", elem_id="sampler")
                    steps = gr.Number(value=d["steps"], label="Steps", precision=0, elem_id="steps")
                    guidance = gr.Number(value=d["guidance_scale"], label="Guidance scale", elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(value=d["seed"], label="Seed", precision=0, elem_id="seed")
                    randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="randomize-seed")
                    batch = gr.Slider(1, app.max_batch, value=d["batch_size"], step=1, label="Batch size",
                                      elem_id="batch-size")
                with gr.Row(equal_height=True):
                    aspect = gr.Dropdown(app.presets(), value=d["aspect_ratio"], elem_id="aspect-ratio", scale=3,
                                         label=f"Aspect ratio preset, h/w (the {app.resolution} px bucket table)")
                    binning = gr.Checkbox(value=d["resolution_binning"], label="Resolution binning", scale=2,
                                          elem_id="binning", info="nearest trained ratio, then resized")
                with gr.Row():
                    width = gr.Number(value=d["width"], label="Width", precision=0, elem_id="width")
                    height = gr.Number(value=d["height"], label="Height", precision=0, elem_id="height")
                lora_scale = gr.Slider(*LORA_SCALES, value=d["lora_scale"] if app.lora else 1.0, step=0.05,
                                       label="LoRA scale", info="0 = the base model, 1 = as trained",
                                       visible=app.lora, elem_id="lora-scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=6):
                gallery = gr.Gallery(label="Images", format="png", columns=2, height=420, elem_id="gallery",
                                     object_fit="contain")
                status = gr.Markdown("", elem_id="status")
                files = gr.File(label="PNGs with their settings as metadata", file_count="multiple",
                                elem_id="downloads", interactive=False)
                command = gr.Textbox(label="Reproduce with sample.py", elem_id="command", lines=2, max_lines=8,
                                     interactive=False, buttons=["copy"])
                config = gr.Code(label="... or as a YAML config (python sample.py -c this.yaml)", language="yaml",
                                 elem_id="yaml", interactive=False, lines=4, max_lines=24, show_line_numbers=False,
                                 buttons=["copy", "download"])
        inputs = [prompt, negative, sampler, steps, guidance, seed, randomize, width, height, batch, binning,
                  lora_scale]
        outputs = [gallery, files, command, config, seed, status]
        button.click(on_generate, inputs, outputs, api_name="generate", concurrency_limit=1,
                     concurrency_id="model")
        prompt.submit(on_generate, inputs, outputs, api_visibility="private", concurrency_limit=1,
                      concurrency_id="model")
        aspect.input(on_preset, aspect, [width, height], queue=False, show_progress="hidden",
                     api_visibility="private")
        sampler.input(lambda name: DEFAULT_STEPS[name], sampler, steps, queue=False, show_progress="hidden",
                      api_visibility="private")
        for box in (width, height):
            box.input(on_size, [width, height], aspect, queue=False, show_progress="hidden",
                      api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=max(1, a.queue_size))
    return demo, dict(theme=theme, css=CSS)


def check_port(host: str, port: int) -> None:
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            s.bind((host, port))
    except OSError as e:
        raise DemoError(f"cannot serve on {host}:{port} ({e.strerror or e}); --port / --host pick another") from None


def serve(args, log=print) -> None:
    """Load once, then serve until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the demo runs offline
    from pixart.pipelines.sample_run import check_args, load_pipeline
    ensure_demo_bundle(args, log)
    check_args(args)
    if not 1 <= args.port <= 65535:
        raise DemoError(f"--port must be 1..65535, got {args.port}")
    if args.max_image_size is not None and args.max_image_size < 8 or args.max_batch_size < 1:
        raise DemoError(f"--max_image_size must be >= 8 and --max_batch_size >= 1, got {args.max_image_size}, "
                        f"{args.max_batch_size}")
    if args.lora_path and not LORA_SCALES[0] <= args.lora_scale <= LORA_SCALES[1]:
        raise DemoError(f"--lora_scale must be between {LORA_SCALES[0]:g} and {LORA_SCALES[1]:g} (the page's "
                        f"slider), got {args.lora_scale}")
    check_port(args.host, args.port)  # before the minutes of loading, not after
    log(f"loading {args.model} once for every request ...")
    t0 = time.time()
    pipe = load_pipeline(args, log)  # the text encoder stays: every request encodes its own prompt
    load_seconds = time.time() - t0
    log(f"models loaded in {load_seconds:.1f}s")
    app = DemoApp(pipe, args, log=log)
    demo, style = build_app(app, load_seconds)
    log(f"serving on http://{args.host}:{args.port} (Ctrl+C stops)")
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False,
                allowed_paths=[str(app.out_dir)], footer_links=[], quiet=False, **style)
