"""The Gradio page: the inputs `sample.py` takes per image (prompt, negative prompt, sampler, steps, guidance, seed,
size or an aspect-ratio preset from the bucket table, batch size, the LoRA scale when the server was started
with `--lora_path`, and an input image with a painted mask for image-to-image and inpainting), the images, the PNGs that carry their settings as metadata, and the `sample.py` command (and
YAML config) that reproduces them. Requests are queued: one generation at a time, the others wait with their place
in the queue shown. A refused value shows as a `gr.Error` in the page; the server goes on.
"""
from __future__ import annotations

import traceback
from pathlib import Path

from pixart import demo_bundle
from pixart.app.core import CUSTOM, LORA_SCALES, DemoApp, DemoError, editor_inputs
from pixart.diffusion import DEFAULT_STEPS, SAMPLERS
from pixart.pipelines.controlnet import CONTROL_TYPES

CSS = """
#gallery img { image-rendering: auto; }
footer { display: none !important; }
"""


def build_app(app: DemoApp, load_seconds: float = 0.0):
    """The gr.Blocks page for `app` (queued with concurrency 1)."""
    import gradio as gr  # optional and slow to import: only the server needs it

    d = app.defaults()
    a = app.args
    is_demo = Path(str(a.checkpoint)).name.endswith("-demo.ckpt")
    untrained = f" {demo_bundle.PAGE_NOTE}" if is_demo else ""

    def on_generate(prompt, negative_prompt, sampler, steps, guidance_scale, seed, randomize_seed, width, height,
                    batch_size, resolution_binning, lora_scale, editor=None, strength=None,
                    control_image=None, control_scale=None, control_type=None,
                    progress=gr.Progress(track_tqdm=True)):
        try:
            image, mask = editor_inputs(editor)
            request = app.check_request(prompt, negative_prompt, sampler, steps, guidance_scale, seed,
                                        randomize_seed, width, height, batch_size, resolution_binning, lora_scale,
                                        image=image, mask=mask, strength=strength,
                                        control_image=control_image, control_scale=control_scale,
                                        control_type=control_type)
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
                with gr.Accordion("Image to image / inpainting", open=False, elem_id="img2img"):
                    editor = gr.ImageEditor(label="Input image (scaled and cropped to width x height); paint over "
                                            "the part to repaint for inpainting", type="numpy", elem_id="editor",
                                            sources=["upload", "clipboard"], height=320, layers=False,
                                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                    strength = gr.Slider(0.0, 1.0, value=a.strength, step=0.05, label="Strength",
                                         info="0 keeps the image, 1 redraws it all", elem_id="strength")
                with gr.Row(visible=app.controlnet):  # PixArt-δ: the server was started with --controlnet
                    control_image = gr.Image(label="Control image (none: the base model)", type="pil",
                                             sources=["upload"], elem_id="control-image", height=200)
                    with gr.Column():
                        control_type = gr.Radio(list(CONTROL_TYPES), value=getattr(a, "control_type", "hed"),
                                                label="Control type", elem_id="control-type",
                                                info="hed: an edge map already; canny: edges computed here")
                        control_scale = gr.Slider(0.0, 2.0, value=getattr(a, "control_scale", 1.0), step=0.05,
                                                  label="Control scale", info="0 = the base model, 1 = as trained",
                                                  elem_id="control-scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if is_demo:
                    gr.Examples([[p] for p in demo_bundle.EXAMPLE_PROMPTS], [prompt], label="Prompts of its world",
                                elem_id="examples")
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
                  lora_scale, editor, strength, control_image, control_scale, control_type]
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


