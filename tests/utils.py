"""Shared helpers for the tests."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pixart import demo


def rel_err(ours, ref) -> float:
    """max |ours - ref| relative to the reference's scale (max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@dataclasses.dataclass(frozen=True)
class DemoBundle:
    """Where the demo bundle's files are (or will be) under `root`; pixart/demo.py builds them."""
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
