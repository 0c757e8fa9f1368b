"""The Gradio app: `core` holds the request logic (gradio-free), `page` the web page; `pixart.cli.gradio` loads
the models and serves it."""
from pixart.app.core import DemoApp, DemoError

__all__ = ["DemoApp", "DemoError"]
