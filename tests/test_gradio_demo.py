"""gradio_demo.py: the page driven from headless Chromium on the demo bundle (generate an image of the asked size,
refuse bad values in the page and go on, queue two requests sent at once), and the logic behind it.

The browser is Debian's `chromium` driven by Playwright (requirements-test.txt); Playwright never downloads a
browser here. Where /usr/bin/chromium is missing the test installs it with apt-get (root, ~100 s once) and skips,
saying why, only where no browser can be had. Set PIXART_GRADIO_SCREENSHOT=docs/gradio_demo.png to rewrite the
README's screenshot from this test.
"""
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pixart import demo_bundle as demo
from pixart.cli.options import ConfigError, parse_args
from pixart.app import DemoApp, DemoError
from pixart.cli.gradio import build_parser as build_demo_parser, ensure_demo_bundle, sample_args
from pixart.cli.sample import build_parser
from tests.utils import DemoBundle, stop

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "inference" / "demo.yaml"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOAST = '[data-testid="toast-text"]'


# -- the demo bundle (the `bundle` fixture of conftest.py); a missing one is built by the demo's own path ----------
def test_a_missing_bundle_is_built_once(tmp_path):
    args = parse_args(build_demo_parser(), ["-c", str(CONFIG), *DemoBundle(tmp_path).flags])
    lines = []
    assert ensure_demo_bundle(args, log=lines.append) is True
    assert "building it" in lines[0] and demo.is_built(tmp_path)
    assert ensure_demo_bundle(args, log=lines.append) is False  # built once


def test_parser_takes_sample_flags_yaml_and_server_options(tmp_path):
    args = parse_args(build_demo_parser(), ["-c", str(CONFIG)])
    assert (args.host, args.port, args.model, args.sampling_steps) == ("127.0.0.1", 7788, demo.PRESET, 20)
    args = parse_args(build_demo_parser(), ["-c", str(CONFIG), "--port", "8000", "--host", "0.0.0.0"])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: PixArt-Sigma-XL-2-256x256\nsampling_stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key.s. sampling_stepz"):
        parse_args(build_demo_parser(), ["-c", str(bad)])
    r = subprocess.run([sys.executable, "gradio_demo.py", "-c", str(bad)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 1 and "unknown key(s) sampling_stepz" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:  # a port in use is refused before the models load
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "gradio_demo.py", "-c", str(CONFIG), "--port", str(port)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


# -- the request logic, with a stand-in pipeline (no model) -----------------------------------------------------
def fake_app(tmp_path, *argv):
    args = parse_args(build_demo_parser(), ["-c", str(CONFIG), *argv])
    pipe = SimpleNamespace(resolution=256, transformer=SimpleNamespace(patch_size=2))
    return DemoApp(pipe, args, sample_args, out_dir=tmp_path / "out", log=lambda *_: None)


GOOD = dict(prompt="a cat", negative_prompt="", sampler="dpm", steps=2, guidance_scale=4.5, seed=3,
            randomize_seed=False, width=96, height=64, batch_size=1, resolution_binning=True)


@pytest.mark.parametrize("change,message", [
    (dict(steps=0), "steps must be at least 1, got 0"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(width=4096), "width must be at most 512 for PixArt-Sigma-XL-2-256x256"),
    (dict(height=4), "height must be at least 8"),
    (dict(prompt="  "), "the prompt is empty"),
    (dict(sampler="euler"), "sampler must be one of dpm"),
    (dict(guidance_scale=float("nan")), "guidance scale must be between 0 and 50"),
    (dict(batch_size=9), "batch size must be at most 4"),
    (dict(seed=-1), "seed must be at least 0"),
    (dict(width=72, resolution_binning=False), "not reachable without resolution binning"),
])
def test_bad_values_are_refused_with_a_message(tmp_path, change, message):
    app = fake_app(tmp_path)
    with pytest.raises(DemoError, match=message.replace("(", r"\(")):
        app.check_request(**{**GOOD, **change})


def test_randomized_seed_and_presets(tmp_path):
    app = fake_app(tmp_path, "--max_image_size", "1024")
    assert app.check_request(**{**GOOD, "width": 1024})["width"] == 1024
    seeds = {app.check_request(**{**GOOD, "randomize_seed": True})["seed"] for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2 ** 31 for s in seeds)
    keys = [key for _, key in app.presets()]
    assert keys[0] == "custom" and "1.0" in keys and app.preset_size("1.0") == (256, 256)
    assert app.preset_size("0.5") == (352, 176) and app.preset_for(176, 352) == "0.5"  # (width, height), h/w=0.5
    assert app.preset_for(64, 96) == "custom"


def test_reproduce_command_and_yaml_give_the_same_settings_to_sample_py(tmp_path, bundle):
    app = fake_app(tmp_path, *bundle.flags, "--dpm_schedule", "time_uniform")
    request = app.check_request(**{**GOOD, "prompt": "it's a \"quoted\" cat", "negative_prompt": "blur"})
    cmd = shlex.split(app.command(request))
    assert cmd[:4] == ["python", "sample.py", "-c", str(CONFIG)]
    cfg = tmp_path / "repro.yaml"
    cfg.write_text(app.yaml_config(request))
    for argv in (cmd[2:], ["-c", str(cfg)]):
        a = parse_args(build_parser(), argv)
        assert a.prompt == ["it's a \"quoted\" cat"] and a.negative_prompt == ["blur"]
        assert (a.sampling_method, a.sampling_steps, a.guidance_scale, a.seed) == ("dpm", 2, 4.5, 3)
        assert (a.image_width, a.image_height, a.num_images_per_prompt, a.resolution_binning) == (96, 64, 1, True)
        assert (a.checkpoint, a.dpm_schedule, a.model) == (str(bundle.checkpoint), "time_uniform", demo.PRESET)


def test_lora_scale_goes_into_the_request_the_images_and_the_reproduce_command(tmp_path, bundle):
    """A server started with --lora_path: the page's LoRA scale is checked, applied to the transformer before
    generating, written into the PNGs and carried by the sample.py command and YAML; without a LoRA it is ignored."""
    import mindspore as ms
    from PIL import Image as PILImage
    from pixart.nn import Linear
    from pixart.models.lora import inject_lora, lora_layers
    lora = tmp_path / "my-lora"
    app = fake_app(tmp_path, *bundle.flags, "--lora_path", str(lora), "--lora_scale", "0.7")
    assert app.defaults()["lora_scale"] == 0.7
    assert app.check_request(**GOOD)["lora_scale"] == 0.7  # the launch scale when the page sends none
    request = app.check_request(**GOOD, lora_scale=1.5)
    assert request["lora_scale"] == 1.5
    for bad in (2.5, -0.1, "x", float("nan")):
        with pytest.raises(DemoError, match="LoRA scale must be"):
            app.check_request(**GOOD, lora_scale=bad)

    class Transformer(ms.nn.Cell):  # one LoRA layer stands in for the model
        def __init__(self):
            super().__init__()
            self.proj = Linear(4, 4)

    class Pipe:  # records the LoRA scale the transformer holds when it is called
        resolution, transformer, seen = 256, Transformer(), []

        def __call__(self, prompt, **kw):
            self.seen.append(float(lora_layers(self.transformer)["proj"].lora_scale.asnumpy()))
            return SimpleNamespace(images=[PILImage.new("RGB", (kw["width"], kw["height"]))],
                                   settings=[dict(prompt=prompt, seed=kw["seed"], width=kw["width"],
                                                  height=kw["height"])])

    app.pipe = Pipe()
    inject_lora(app.pipe.transformer, rank=1, targets=("proj",))
    out = app.generate(request)
    assert app.pipe.seen == [1.5]
    from pixart.pipelines.outputs import read_png_settings
    settings = read_png_settings(out["paths"][0])
    assert (settings["lora"], settings["lora_scale"]) == (str(lora), 1.5)

    cmd = shlex.split(out["command"])
    cfg = tmp_path / "repro.yaml"
    cfg.write_text(out["yaml"])
    for argv in (cmd[2:], ["-c", str(cfg)]):
        a = parse_args(build_parser(), argv)
        assert (a.lora_path, a.lora_scale, a.checkpoint) == (str(lora), 1.5, str(bundle.checkpoint))

    plain = fake_app(tmp_path, *bundle.flags)
    request = plain.check_request(**GOOD, lora_scale=1.5)
    assert request["lora_scale"] is None and "--lora" not in plain.command(request)


def test_image_and_painted_mask_go_to_the_pipeline_and_the_reproduce_command(tmp_path, bundle):
    """The page's image editor value -> (image, mask) -> the pipeline's image / mask_image / strength; the inputs
    are saved beside the outputs and the sample.py command and YAML name them."""
    import numpy as np
    from pixart.app.core import editor_inputs
    background = np.zeros((40, 30, 4), np.uint8)
    background[..., :3], background[..., 3] = 120, 255
    layer = np.zeros_like(background)
    layer[5:10, 5:10, 3] = 255
    image, mask = editor_inputs({"background": background, "layers": [layer], "composite": background})
    assert image.shape == (40, 30, 3) and mask.dtype == np.uint8 and mask.sum() == 25 * 255
    assert editor_inputs({"background": background, "layers": [np.zeros_like(layer)]})[1] is None
    assert editor_inputs(None) == (None, None) and editor_inputs({"background": None, "layers": []}) == (None, None)

    app = fake_app(tmp_path, *bundle.flags, "--mask_blur", "2")
    with pytest.raises(DemoError, match=r"strength must be in \[0, 1\]"):
        app.check_request(**GOOD, image=image, strength=1.5)
    with pytest.raises(DemoError, match="a mask needs an input image"):
        app.check_request(**GOOD, mask=mask)

    class Pipe:
        resolution, seen, transformer = 256, {}, SimpleNamespace(patch_size=2)

        def __call__(self, prompt, **kw):
            self.seen = kw
            return SimpleNamespace(images=[Image.new("RGB", (kw["width"], kw["height"]))],
                                   settings=[dict(prompt=prompt, seed=kw["seed"])])
    app.pipe = Pipe()
    out = app.generate(app.check_request(**GOOD, image=image, mask=mask, strength=0.6))
    seen = app.pipe.seen
    assert seen["strength"] == 0.6 and seen["mask_blur"] == 2.0
    assert seen["image"].size == (30, 40) and seen["mask_image"].mode == "L"
    for argv in (shlex.split(out["command"])[2:], ["-c", str(tmp_path / "repro.yaml")]):
        (tmp_path / "repro.yaml").write_text(out["yaml"])
        a = parse_args(build_parser(), argv)
        assert a.strength == 0.6 and a.mask_blur == 2.0
        assert Image.open(a.image).size == (30, 40) and Image.open(a.mask_image).mode == "L"
    plain = app.generate(app.check_request(**GOOD))
    assert "--image" not in shlex.split(plain["command"]) and "image" not in app.pipe.seen
    one_step = fake_app(tmp_path, *bundle.flags, "--timesteps", "400")  # a server for PixArt-α-DMD
    one_step.pipe = Pipe()
    out = one_step.generate(one_step.check_request(**GOOD))
    assert one_step.pipe.seen["timesteps"] == [400] and "--timesteps 400" in out["command"]


# -- the real server, in a real browser ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gradio")
    port = free_port()
    log_path = tmp / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp / "cache"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "gradio_demo.py", "-c", str(CONFIG), *bundle.flags,
                                 "--port", str(port), "--sampling_steps", "2", "--image_width", "64", "--image_height", "64",
                                 "--resolution_binning", "false"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gradio_demo.py exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.time() - t0 > 300:
                pytest.fail(f"gradio_demo.py did not serve within 300 s:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        text = log_path.read_text()
        assert "models loaded in" in text and f"serving on http://127.0.0.1:{port}" in text  # the start-up log line
        print(f"gradio_demo.py served after {time.time() - t0:.0f}s")
        yield SimpleNamespace(url=url, proc=proc, log=log_path)
    finally:
        stop(proc)


def find_chromium() -> tuple[str | None, str]:
    """A Chromium binary, installing Debian's `chromium` where it is missing and we may; else (None, why)."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate, ""
    if not shutil.which("apt-get"):
        return None, "no Chromium on this machine and no apt-get to install Debian's chromium"
    if os.geteuid() != 0:
        return None, "no Chromium on this machine and not root, so `apt-get install chromium` is not possible"
    t0 = time.time()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd)}` took over 900 s"
        if r.returncode:
            return None, f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-500:]}"
    print(f"installed Debian's chromium in {time.time() - t0:.0f}s")
    return ("/usr/bin/chromium", "") if Path("/usr/bin/chromium").exists() else (None, "apt-get gave no chromium")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install -r requirements-test.txt)")
    executable, why = find_chromium()
    if executable is None:
        pytest.skip(f"no browser can be had: {why}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, server):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(server.url)
    page.wait_for_selector("#generate", timeout=60_000)
    page.wait_for_selector("#gallery", timeout=60_000)  # under load the gallery can mount after the button
    return page


def fill(page, **values):
    for name, value in values.items():
        selector = "#prompt textarea" if name == "prompt" else f"#{name} input"
        page.fill(selector, str(value))


def wait_for_image(page, width, height, replacing="", timeout=120_000):
    """The src of the first gallery image, once it has loaded at width x height (and is not `replacing`)."""
    page.wait_for_function(
        """([w, h, old]) => { const im = document.querySelector('#gallery img');
                               return im && im.src !== old && im.complete && im.naturalWidth === w
                                      && im.naturalHeight === h; }""",
        arg=[width, height, replacing], timeout=timeout)
    return page.eval_on_selector("#gallery img", "im => im.src")


def wait_for_error(page, message, timeout=60_000):
    toast = page.locator(TOAST, has_text=message)
    toast.first.wait_for(state="visible", timeout=timeout)
    return toast.first.inner_text()


WATCH_STATUS = """() => {  // remember every status the gallery shows, however briefly
    window.seenStatus = [];
    const box = document.querySelector('#gallery');
    const note = () => { const t = box.innerText;
                         if (!window.seenStatus.includes(t)) window.seenStatus.push(t); };
    new MutationObserver(note).observe(box, {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.slow
@pytest.mark.e2e
def test_page_generates_then_shows_errors_and_goes_on(server, browser):
    page = open_page(browser, server)
    try:
        assert "untrained" in page.inner_text("#header")
        fill(page, prompt="a red square on a white table", steps=2, width=96, height=64, seed=5)
        page.click("#generate")
        first = wait_for_image(page, 96, 64)
        assert "seed 5, 96x64" in page.inner_text("#gallery")
        command = page.input_value("#command textarea")
        for flag in ("sample.py", "--sampling_steps 2", "--image_width 96", "--image_height 64", "--seed 5"):
            assert flag in command, command
        href = page.eval_on_selector("#downloads a[href]", "a => a.href")  # the PNG download keeps its metadata
        with urllib.request.urlopen(href, timeout=30) as r:
            png = Image.open(io.BytesIO(r.read()))
        assert png.size == (96, 64) and png.text["prompt"] == "a red square on a white table"
        assert (png.text["seed"], png.text["steps"], png.text["model"]) == ("5", "2", demo.PRESET)
        if os.environ.get("PIXART_GRADIO_SCREENSHOT"):
            page.screenshot(path=os.environ["PIXART_GRADIO_SCREENSHOT"], full_page=True)

        fill(page, steps=0)
        page.click("#generate")
        assert "steps must be at least 1, got 0" in wait_for_error(page, "steps must be at least 1")
        fill(page, steps=2, width=4096)
        page.click("#generate")
        assert "for PixArt-Sigma-XL-2-256x256" in wait_for_error(page, "width must be at most 512")
        assert page.eval_on_selector("#gallery img", "im => im.src") == first  # refused: nothing new shown

        fill(page, width=96, seed=7)  # the size of the first image: the demo config compiles a graph per size
        page.click("#generate")
        wait_for_image(page, 96, 64, replacing=first)
        assert "seed 7, 96x64" in page.inner_text("#gallery")
        assert server.proc.poll() is None
        log = server.log.read_text()
        assert "refused: steps must be at least 1" in log and "Traceback" not in log
    finally:
        page.context.close()


@pytest.mark.slow
@pytest.mark.e2e
def test_two_requests_at_once_both_complete_one_waiting_in_the_queue(server, browser):
    pages = [open_page(browser, server) for _ in range(2)]
    try:
        for i, page in enumerate(pages):
            fill(page, prompt=f"request {i}", steps=4, width=96, height=64, seed=10 + i)
            page.evaluate(WATCH_STATUS)
        for page in pages:
            page.click("#generate")
        for i, page in enumerate(pages):
            wait_for_image(page, 96, 64)
            assert f"seed {10 + i}, 96x64" in page.inner_text("#gallery")
        seen = " | ".join(t for page in pages for t in page.evaluate("window.seenStatus")).replace("\n", " ")
        assert re.search(r"queue: 1/1", seen), seen  # one waited with its place in the queue shown
        assert re.search(r"[0-4]/4 steps", seen), seen  # the one running showed its progress over the steps
        assert server.proc.poll() is None
    finally:
        for page in pages:
            page.context.close()


def wait_for_command(page, text, previous="", timeout=180_000):
    """The reproduce command once a new one containing `text` is shown."""
    page.wait_for_function(
        """([t, old]) => { const c = document.querySelector('#command textarea');
                           return c && c.value !== old && c.value.includes(t); }""",
        arg=[text, previous], timeout=timeout)
    return page.input_value("#command textarea")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.xfail(run=False, reason="open defect: in the whole suite (after the queue test on the same server) the page never sets LCM's 4 steps on choosing lcm and the wait times out after 180 s; the test passes on its own")
def test_page_does_image_to_image_inpainting_and_lcm(server, browser, tmp_path):
    """Upload an image (image-to-image), paint a mask over it (inpainting), then pick the LCM sampler: each request
    shows a 96x64 image (the size the first page test compiled for) and a sample.py command that carries the inputs."""
    import numpy as np
    picture = tmp_path / "input.png"
    y, x = np.mgrid[0:48, 0:80] / 80.0
    Image.fromarray((np.stack([0.2 + 0.6 * x, 0.8 - 0.5 * y, 0.5 + 0 * x], -1) * 255).astype("uint8")).save(picture)
    page = open_page(browser, server)
    try:
        fill(page, prompt="a red square on a white table", steps=2, width=96, height=64)
        page.click("#img2img button")  # the accordion
        page.set_input_files("#editor input[type=file]", str(picture))
        page.wait_for_selector("#editor canvas", timeout=30_000)
        page.click("#generate")
        first = wait_for_command(page, "--strength 0.8")
        assert "--mask_image" not in first and "--image " in first
        shown = wait_for_image(page, 96, 64)

        page.click("#editor button[aria-label=Brush]")
        canvas = page.locator("#editor canvas").last
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 30, cy - 30)
        page.mouse.down()
        for i in range(8):
            page.mouse.move(cx - 30 + 8 * i, cy - 30 + 8 * i)
        page.mouse.up()
        page.click("#generate")
        second = wait_for_command(page, "--mask_image", first)
        mask = Path(shlex.split(second)[shlex.split(second).index("--mask_image") + 1])
        assert mask.exists() and 0 < (np.asarray(Image.open(mask)) > 0).mean() < 1  # part painted, part kept
        shown = wait_for_image(page, 96, 64, replacing=shown)

        page.click("#sampler input")
        page.get_by_role("option", name="lcm", exact=True).click()
        page.wait_for_function("() => document.querySelector('#steps input').value === '4'")  # LCM's default
        page.click("#generate")  # guidance as before: the graphs of this shape serve it (0 would compile batch 1)
        third = wait_for_command(page, "--sampling_method lcm", second)
        assert "--sampling_steps 4" in third
        wait_for_image(page, 96, 64, replacing=shown)
        assert "Traceback" not in server.log.read_text()
    finally:
        page.context.close()


def test_sample_only_options_are_refused_in_one_line():
    from pixart.cli.gradio import check_server_args
    for flags, message in ((["--num_trials", "2"], "--num_trials 2"), (["--use_parallel", "true"], "--use_parallel"),
                           (["--imagegrid", "true"], "--imagegrid"), (["--batch_size", "4"], "--batch_size 4")):
        args = parse_args(build_demo_parser(), flags)
        with pytest.raises(DemoError, match=f"gradio_demo.py does not take {message}"):
            check_server_args(args)
    check_server_args(parse_args(build_demo_parser(), ["--sample_size", "128", "--dtype", "fp16"]))
