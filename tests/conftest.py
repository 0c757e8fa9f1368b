"""Every test runs MindSpore on CPU in PyNative mode unless it asks for `graph_mode`."""
import numpy as np
import pytest

from pixart import backend

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

