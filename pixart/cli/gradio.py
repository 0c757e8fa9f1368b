"""What `gradio_demo.py` does: check the options, load the models once, then serve the Gradio page (`pixart.app`)
that generates with them until interrupted."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from pixart import demo_bundle
from pixart.app.core import LORA_SCALES, DemoApp, DemoError
from pixart.app.page import build_app
from pixart.cli.options import option_group, parse_args
from pixart.cli.sample import build_parser as sample_parser
from pixart.cli.sample import check_args, load_pipeline


def build_parser(description: str | None = None):
    """sample.py's parser (same model flags, same YAML rules) plus the server's options."""
    p = sample_parser(description)
    g = option_group(p, "server")
    g.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=7788)
    g.add_argument("--max_image_size", type=int, default=None,
                   help="largest height or width a request may ask for (default: twice the model's training size)")
    g.add_argument("--max_batch_size", type=int, default=4, help="largest batch a request may ask for")
    g.add_argument("--queue_size", type=int, default=32, help="requests that may wait; more are refused")
    p.set_defaults(output_path=None)  # where request PNGs go: a temporary folder unless given
    return p


# sample.py options that a page serving one request at a time cannot take: (default, why)
_SAMPLE_ONLY = {"num_trials": (1, "the page's Batch slider sets the images of a request"),
                "batch_size": (1, "a request is one prompt; the page's Batch slider sets its images"),
                "imagegrid": (False, "the page shows every image of a request"),
                "use_parallel": (False, "the server is one process (sample.py --use_parallel splits prompts under "
                                        "msrun)"),
                "prompt_path": (None, "prompts come from the page")}


def check_server_args(args) -> None:
    """Refuse, in one line, the sample.py options a server cannot honour (none is silently ignored)."""
    for name, (default, why) in _SAMPLE_ONLY.items():
        value = getattr(args, name)
        if value is not None and value != default:
            raise DemoError(f"gradio_demo.py does not take --{name} {value}: {why}")


def sample_args(argv: list[str]):
    """`sample.py`'s options parsed from `argv` (the app writes its reproduce-command against them)."""
    return parse_args(sample_parser(), argv, check_paths=False)  # a reproduce-command writes nothing here


def ensure_demo_bundle(args, log=print) -> bool:
    """If the model flags name the embedded demo bundle and it is not built yet, build it (seconds, offline).
    Returns whether it was built."""
    if not args.checkpoint or Path(args.checkpoint).name != demo_bundle.CHECKPOINT:
        return False
    root = Path(args.checkpoint).parent
    comp = root / demo_bundle.COMPONENTS
    named = [Path(v) for v in (args.vae_root, args.text_encoder_root, args.tokenizer_root) if v]
    if any(p.parent != comp for p in named) or demo_bundle.is_built(root):
        return False
    log(f"demo bundle not found under {root}: building it (no downloads, a few seconds)")
    demo_bundle.build(root, log=log)
    return True


def check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            s.bind((host, port))
    except OSError as e:
        raise DemoError(f"cannot serve on {host}:{port} ({e.strerror or e}); --port / --host pick another") from None


def serve(args, log=print) -> None:
    """Load once, then serve until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the demo runs offline
    ensure_demo_bundle(args, log)
    check_server_args(args)
    check_args(args, log)
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
    app = DemoApp(pipe, args, sample_args, out_dir=args.output_path, log=log)
    demo, style = build_app(app, load_seconds)
    log(f"serving on http://{args.host}:{args.port} (Ctrl+C stops)")
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False,
                    allowed_paths=[str(app.out_dir)], footer_links=[], quiet=False, **style)
    except KeyboardInterrupt:  # Ctrl+C is how a server is meant to stop: a clean exit, not an interruption
        log("stopped")
