"""Shared fixtures and the test tiers.

Every test runs MindSpore on CPU in PyNative mode unless it asks for `graph_mode`. Tiers, by marker (registered in
pyproject.toml): unmarked tests are fast unit tests; `slow` ones take more than ~30 s on 2 cores (or tens of
seconds of graph compilation); `parity` ones compare against the PyTorch reference (diffusers / transformers);
`e2e` ones run an entry point end to end in a subprocess (sample.py, train.py, msrun, the Gradio page in a
browser). `pytest -m "not slow"` is the developer loop; CI runs everything (`python -m pytest -q tests`).

On another device (`pytest --device Ascend`, or PIXART_TEST_DEVICE=Ascend): MindSpore runs there instead of on the
CPU; what cannot run there is skipped with the reason: tests that compare with PyTorch (the `parity` tier, modules
that import torch, diffusers, transformers or peft: the references run on the CPU, see tools/selfcheck.py for the
device's own check against stored references) and the tests of MindSpore-CPU-only code (CPU_ONLY). A test that
compares numbers computed on the device takes its tolerance from `device_tolerance` (the self-check's table).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

_USER_GLOG = os.environ.get("GLOG_v")  # read before importing pixart, which sets its quiet default
# The suite runs on shared 2-core hosts, the pytest process and its children side by side: their OpenMP threads
# sleep between parallel regions rather than spin out each other's time slices (set before mindspore loads libgomp,
# which reads it once; children inherit it). A value set by the user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pixart import backend  # noqa: E402
from pixart import demo_bundle as demo  # noqa: E402
from pixart.cli.options import device_available  # noqa: E402
from tests.utils import DemoBundle  # noqa: E402

DEVICE_ENV = "PIXART_TEST_DEVICE"
DEVICES = ("CPU", "GPU", "Ascend")
TORCH_MODULES = ("torch", "diffusers", "transformers", "peft")
TORCH_HELPERS = ("diffusers_model", "run_diffusers", "torch_reference")  # tests.utils / test helpers that run torch
# test modules of code that exists for MindSpore's CPU backend only, with the reason
CPU_ONLY = {
    "test_blockwise.py": "block-by-block backpropagation (pixart.cpu.blockwise) is MindSpore-CPU graph mode only",
    "test_shared_graphs.py": "graphs shared by runs of blocks (pixart.cpu.shared_graphs) are MindSpore-CPU only",
    "test_backend.py": "tests MindSpore-CPU kernels and the CPU backend's dtype rules",
}
TEST_DEVICE = "CPU"  # set by pytest_configure
_UNCOLLECTED: list[str] = []

backend.setup("CPU", "pynative")
if _USER_GLOG is None:
    # Entry points the tests start quiet themselves (they import pixart); other programs they start (msrun's
    # scheduler, whose log a test reads) log as they would for a user, so this process's GLOG_v is not passed on.
    os.environ.pop("GLOG_v", None)


def pytest_addoption(parser):
    parser.addoption("--device", default=None, choices=DEVICES,
                     help=f"run MindSpore on this device (default: ${DEVICE_ENV}, else CPU); tests that compare with "
                          "PyTorch or test CPU-only code are skipped there")


def pytest_configure(config):
    global TEST_DEVICE
    device = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "CPU"
    if device not in DEVICES:
        raise pytest.UsageError(f"{DEVICE_ENV}={device!r}: the device must be one of {', '.join(DEVICES)}")
    if not device_available(device):
        raise pytest.UsageError(f"device {device}: MindSpore finds no {device} device on this machine")
    TEST_DEVICE = device
    if device != "CPU":
        backend.setup(device, "pynative")


@functools.lru_cache(maxsize=None)
def _torch_imports(path: Path) -> tuple[bool, bool]:
    """(imports torch / diffusers / transformers / peft at module level, anywhere) in the test module at `path`."""
    tree = ast.parse(path.read_text(), str(path))

    def names(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and not node.level:
            return [node.module or ""]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args:
            return [getattr(node.args[0], "value", "")]
        return []
    hits = lambda nodes: any(n.split(".")[0] in TORCH_MODULES for node in nodes for n in names(node))
    return hits(ast.walk(ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))],
                                    type_ignores=[]))), hits(ast.walk(tree))


def pytest_ignore_collect(collection_path, config):
    """On another device without torch installed, modules that import it at module level cannot even be collected."""
    path = Path(collection_path)
    if TEST_DEVICE == "CPU" or path.suffix != ".py" or not path.name.startswith("test_"):
        return None
    if importlib.util.find_spec("torch") is None and _torch_imports(path)[0]:
        _UNCOLLECTED.append(path.name)
        return True
    return None


def device_skip_reason(item) -> str | None:
    """Why `item` does not run on TEST_DEVICE, or None."""
    if TEST_DEVICE == "CPU":
        return None
    path = Path(str(item.fspath))
    if path.name in CPU_ONLY:
        return f"CPU only: {CPU_ONLY[path.name]}"
    code = getattr(getattr(item, "function", None), "__code__", None)
    uses_helper = code is not None and set(code.co_names) & set(TORCH_HELPERS)
    if item.get_closest_marker("parity") is not None or uses_helper or _torch_imports(path)[1]:
        return f"needs PyTorch (a CPU reference); on {TEST_DEVICE} use python tools/selfcheck.py"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = device_skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter):
    if _UNCOLLECTED:
        terminalreporter.write_line(f"not collected on {TEST_DEVICE} (they import torch, which is not installed): "
                                    f"{', '.join(_UNCOLLECTED)}")


@pytest.fixture
def device_tolerance():
    """`device_tolerance(cpu_value, dtype="fp32")`: the test's own tolerance on the CPU; on another device the
    self-check's tolerance for `dtype` where that is larger (pixart.selfcheck.runner.TOLERANCES)."""
    def tolerance(cpu_value: float, dtype: str = "fp32") -> float:
        if TEST_DEVICE == "CPU":
            return cpu_value
        from pixart.selfcheck.runner import TOLERANCES
        return max(cpu_value, TOLERANCES[dtype])
    return tolerance


@pytest.fixture
def graph_mode():
    """Run the test body in GRAPH_MODE, restoring PyNative afterwards."""
    backend.setup(TEST_DEVICE, "graph")
    try:
        yield
    finally:
        backend.setup(TEST_DEVICE, "pynative")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> DemoBundle:
    """The demo bundle, built once per test session."""
    root = tmp_path_factory.mktemp("demo")
    demo.build(root, log=lambda *_: None)
    return DemoBundle(root)
