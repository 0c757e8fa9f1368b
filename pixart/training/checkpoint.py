"""Training checkpoints: one folder per save, written atomically, the last K kept, resumable exactly.

    <output_dir>/checkpoints/step_00001000/          train.py (layout FULL)
        model.ckpt         the weights under the original PixArt names: `sample.py --checkpoint .../model.ckpt`
        ema.ckpt           the EMA weights, same names (also loadable by sample.py)
        train_state.ckpt   optimizer moments and step, loss scale and its counter
        state.json         step, data position (global batches consumed), seed (all randomness derives from it and
                           the position), data fingerprint, skipped images, the options of the run
    <output_dir>/checkpoint-1000/                    train_pixart_lora.py (layout LORA, diffusers' naming)
        pytorch_lora_weights.safetensors, train_state.ckpt, state.json

The folder is assembled as `.<name>.tmp` and renamed into place, so a crash mid-save never leaves a checkpoint
that looks complete; `latest` is the highest complete step.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pixart.io import CheckpointError, read_ckpt, write_ckpt

MODEL, EMA, TRAIN_STATE, STATE = "model.ckpt", "ema.ckpt", "train_state.ckpt", "state.json"


@dataclass(frozen=True)
class Layout:
    """How checkpoint folders are named: `step_00001000` (train.py) or `checkpoint-1000` (diffusers' scripts)."""
    prefix: str
    digits: int

    def name(self, step: int) -> str:
        return f"{self.prefix}{step:0{self.digits}d}" if self.digits else f"{self.prefix}{step}"

    def step_of(self, name: str) -> int | None:
        m = re.match(rf"^{re.escape(self.prefix)}(\d+)$", name)
        return int(m.group(1)) if m and (not self.digits or len(m.group(1)) == self.digits) else None


FULL = Layout("step_", 8)
LORA = Layout("checkpoint-", 0)


def step_dir(root, step: int, layout: Layout = FULL) -> Path:
    return Path(root) / layout.name(step)


def list_checkpoints(root, layout: Layout = FULL) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and layout.step_of(p.name) is not None and (p / STATE).is_file()]
    return sorted(found, key=lambda p: layout.step_of(p.name))


def save_folder(root, step: int, write: Callable[[Path], None], keep_last: int = 0, layout: Layout = FULL) -> Path:
    """Let `write(folder)` fill a fresh folder (it must write state.json), move it into place atomically as the
    checkpoint of `step`, and prune to the newest `keep_last` (0 keeps all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step, layout)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    if not (tmp / STATE).is_file():
        raise RuntimeError(f"a checkpoint writer must write {STATE}")
    if final.exists():  # re-saving a step after a resume: swap the old one out first
        old = root / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep_last and keep_last > 0:
        for stale in list_checkpoints(root, layout)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def write_state(folder, state: dict) -> None:
    (Path(folder) / STATE).write_text(json.dumps(state, indent=2))


def save(root, step: int, model_state: dict, ema_state: dict | None, train_state: dict, state: dict,
         keep_last: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """train.py's checkpoint: model, EMA, optimizer / loss-scale state and state.json (layout FULL). `metadata`
    goes into the model and EMA files (the architecture record of `pixart.models.convert.architecture_record`, so
    that sample.py loads them without guessing)."""
    def write(folder: Path) -> None:
        write_ckpt(model_state, folder / MODEL, metadata)
        if ema_state is not None:
            write_ckpt(ema_state, folder / EMA, metadata)
        write_ckpt(train_state, folder / TRAIN_STATE)
        write_state(folder, state)
    return save_folder(root, step, write, keep_last, FULL)


def resolve(resume: str, root, layout: Layout = FULL) -> Path | None:
    """`--resume latest` -> the newest checkpoint under root (None if there is none); a path -> that checkpoint
    (a step folder, or a folder of step folders, whose newest is taken)."""
    if resume == "latest":
        found = list_checkpoints(root, layout)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume path not found: {resume}")
    if path.is_file():
        path = path.parent
    if (path / STATE).is_file():
        return path
    found = list_checkpoints(path, layout)
    if found:
        return found[-1]
    raise CheckpointError(f"--resume {resume} is not a training checkpoint (no {STATE} in it or in a "
                          f"{layout.prefix}* folder)")


def read_state(path) -> dict:
    """state.json of a checkpoint folder."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {STATE}")
    try:
        return json.loads((path / STATE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / STATE}: not valid JSON ({e})") from None


def load(path) -> dict:
    """{'model', 'ema' (or None), 'train_state', 'state'} of a train.py checkpoint folder."""
    path = Path(path)
    for name in (MODEL, TRAIN_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: no {name}")
    state = read_state(path)
    return {
        "model": read_ckpt(path / MODEL),
        "ema": read_ckpt(path / EMA) if (path / EMA).is_file() else None,
        "train_state": read_ckpt(path / TRAIN_STATE),
        "state": state,
    }


def fingerprint(paths) -> str:
    """A short hash of the usable entries, to notice a changed data set on resume."""
    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def digest(state: dict[str, np.ndarray]) -> str:
    """A short SHA-256 of named arrays (names and bytes, in name order): equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.hexdigest()[:16]


def as_arrays(params) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in params}
