"""Shared fixtures and the test tiers.

Every test runs MindSpore on CPU in PyNative mode unless it asks for `graph_mode`. Tiers, by marker (registered in
pyproject.toml): unmarked tests are fast unit tests; `slow` ones take more than ~30 s on 2 cores (or tens of
seconds of graph compilation); `parity` ones compare against the PyTorch reference (diffusers / transformers);
`e2e` ones run an entry point end to end in a subprocess (sample.py, train.py, msrun, the Gradio page in a
browser). `pytest -m "not slow"` is the developer loop; CI runs everything (`python -m pytest -q tests`).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

_USER_GLOG = os.environ.get("GLOG_v")  # read before importing pixart, which sets its quiet default
from pixart import backend  # noqa: E402
from pixart import demo_bundle as demo  # noqa: E402
from tests.utils import DemoBundle  # noqa: E402

backend.setup("CPU", "pynative")
if _USER_GLOG is None:
    # Entry points the tests start quiet themselves (they import pixart); other programs they start (msrun's
    # scheduler, whose log a test reads) log as they would for a user, so this process's GLOG_v is not passed on.
    os.environ.pop("GLOG_v", None)


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
