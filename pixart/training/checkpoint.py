"""Training checkpoints: one folder per save, written atomically, the last K kept, resumable exactly.

    <output_dir>/checkpoints/step_00001000/
        model.ckpt         the weights under the original PixArt names: `sample.py --checkpoint .../model.ckpt`
        ema.ckpt           the EMA weights, same names (also loadable by sample.py)
        train_state.ckpt   optimizer moments and step, loss scale and its counter
        state.json         step, data position (global batches consumed), seed (all randomness derives from it and
                           the position), data fingerprint, skipped images, the options of the run

The folder is assembled as `.step_XXXXXXXX.tmp` and renamed into place, so a crash mid-save never leaves a
checkpoint that looks complete; `latest` is the highest complete step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from pixart.checkpoints import CheckpointError, read_ckpt, write_ckpt

_NAME = re.compile(r"^step_(\d{8})$")
MODEL, EMA, TRAIN_STATE, STATE = "model.ckpt", "ema.ckpt", "train_state.ckpt", "state.json"


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save(root, step: int, model_state: dict, ema_state: dict | None, train_state: dict, state: dict,
         keep_last: int = 0) -> Path:
    """Write a checkpoint atomically and prune to the newest `keep_last` (0 keeps all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_ckpt(model_state, tmp / MODEL)
    if ema_state is not None:
        write_ckpt(ema_state, tmp / EMA)
    write_ckpt(train_state, tmp / TRAIN_STATE)
    (tmp / STATE).write_text(json.dumps(state, indent=2))
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
        for stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve(resume: str, root) -> Path | None:
    """`--resume latest` -> the newest checkpoint under root (None if there is none); a path -> that checkpoint
    (a step folder, or a folder of step folders, whose newest is taken)."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume path not found: {resume}")
    if path.is_file():
        path = path.parent
    if (path / STATE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"--resume {resume} is not a training checkpoint (no {STATE} in it or in a step_* folder)")


def load(path) -> dict:
    """{'model', 'ema' (or None), 'train_state', 'state'} of a checkpoint folder."""
    path = Path(path)
    for name in (MODEL, TRAIN_STATE, STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: no {name}")
    try:
        state = json.loads((path / STATE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / STATE}: not valid JSON ({e})") from None
    return {
        "model": read_ckpt(path / MODEL),
        "ema": read_ckpt(path / EMA) if (path / EMA).is_file() else None,
        "train_state": read_ckpt(path / TRAIN_STATE),
        "state": state,
    }


def fingerprint(paths) -> str:
    """A short hash of the usable entries, to notice a changed data set on resume."""
    import hashlib
    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def as_arrays(params) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in params}
