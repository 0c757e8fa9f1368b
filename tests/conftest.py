"""Shared fixtures and the test tiers.

Every test runs MindSpore on CPU in PyNative mode unless it asks for `graph_mode`. Tiers, by marker (registered in
pyproject.toml): unmarked tests are fast unit tests; `slow` ones take more than ~30 s on 2 cores (or tens of
seconds of graph compilation); `parity` ones compare against the PyTorch reference (diffusers / transformers);
`e2e` ones run an entry point end to end in a subprocess (sample.py, train.py, msrun, the Gradio page in a
browser). `pytest -m "not slow"` is the developer loop; CI runs everything (`python -m pytest -q tests`).
"""
from __future__ import annotations

import numpy as np
import pytest

from pixart import backend, demo
from tests.utils import DemoBundle

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


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> DemoBundle:
    """The demo bundle, built once per test session."""
    root = tmp_path_factory.mktemp("demo")
    demo.build(root, log=lambda *_: None)
    return DemoBundle(root)
