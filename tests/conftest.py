"""Shared fixtures and the test tiers.

Every test runs MindSpore on CPU in PyNative mode unless it asks for `graph_mode`. Tiers, by marker (registered in
pyproject.toml): unmarked tests are fast unit tests; `slow` ones take more than ~30 s on 2 cores; `parity` ones
compare against the PyTorch reference (diffusers / transformers); `e2e` ones run an entry point end to end in a
subprocess (sample.py, train.py, msrun, the Gradio page in a browser). `pytest -m "not slow"` is the developer loop;
CI runs everything (`python -m pytest -q tests`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pixart import backend, demo

backend.setup("CPU", "pynative")


@pytest.fixture
def graph_mode():
    """Run the test body in GRAPH_MODE, restoring PyNative afterwards."""
    backend.setup("CPU", "graph")
    try:
        yield
    finally:
        backend.setup("CPU", "pynative")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@dataclasses.dataclass(frozen=True)
class DemoBundle:
    """The demo bundle (pixart/demo.py) written under a temporary folder."""
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / demo.CHECKPOINT

    @property
    def components(self) -> Path:
        return self.root / demo.COMPONENTS

    @property
    def flags(self) -> list[str]:
        """The sample.py / gradio_demo.py flags that point at it (on top of configs/inference/demo.yaml)."""
        comp = self.components
        return ["--checkpoint", str(self.checkpoint), "--vae_root", str(comp / "vae"),
                "--text_encoder_root", str(comp / "text_encoder"), "--tokenizer_root", str(comp / "tokenizer")]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> DemoBundle:
    """The demo bundle, built once per test session."""
    root = tmp_path_factory.mktemp("demo")
    demo.build(root, log=lambda *_: None)
    return DemoBundle(root)
