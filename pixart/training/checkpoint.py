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
that looks complete; `latest` is the highest complete step. A save that fails (a full disk, a read-only folder)
removes its partial folder and leaves the earlier checkpoints intact; what a killed save left is cleaned at the
next start (`clean_leftovers`). Weights that went non-finite are never saved (`NonFiniteError`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pixart.io import CheckpointError, read_ckpt, write_ckpt
from pixart.io.atomic import remove_quietly, write_text
from pixart.io.base import first_non_finite

MODEL, EMA, TRAIN_STATE, STATE = "model.ckpt", "ema.ckpt", "train_state.ckpt", "state.json"
STATE_INTS = ("step", "batches_done")  # what a resume needs from state.json
STATE_TYPES = {"data": dict, "lora": dict, "args": dict, "skipped": list, "decode_failures": list,
               "optimizer": str, "global_batch": int, "epoch": int}
MAX_STATE_BYTES = 64 << 20  # state.json holds settings and skipped-image lists, never weights


class NonFiniteError(ValueError):
    """Training produced NaN / inf (a loss or a weight): the run stops, its last good checkpoint untouched."""


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
    tmp, old = root / f".{final.name}.tmp", root / f".{final.name}.old"
    remove_quietly(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        if not (tmp / STATE).is_file():
            raise RuntimeError(f"a checkpoint writer must write {STATE}")
    except BaseException:  # a full disk, a read-only folder, Ctrl+C: no partial folder; earlier checkpoints intact
        remove_quietly(tmp)
        raise
    if final.exists():  # re-saving a step after a resume: swap the old one out first
        remove_quietly(old)
        os.replace(final, old)
        os.replace(tmp, final)
        remove_quietly(old)
    else:
        os.replace(tmp, final)
    if keep_last and keep_last > 0:
        for stale in list_checkpoints(root, layout)[:-keep_last]:
            remove_quietly(stale)
    return final


def check_finite_step(step: int, loss: float, grads_finite: bool, dynamic: bool) -> None:
    """Stop a run whose loss or gradients went non-finite where no dynamic loss scale can back off (fp32, a static
    scale): every later step would be skipped or write NaN. Raised before the step's checkpoint, so the newest
    checkpoint on disk is the last good one."""
    if dynamic or (math.isfinite(loss) and grads_finite):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the gradients are not finite (NaN or inf)"
    raise NonFiniteError(f"step {step}: {what}; the run diverged and stops (no loss scale to back off in this "
                         "precision). Resume from the last checkpoint with a lower --learning_rate or gradient "
                         "clipping (--clip_grad / --max_grad_norm)")


def clean_leftovers(root, layout: Layout = FULL, log=None) -> list[str]:
    """Undo what a save interrupted by a kill left under `root`: `.<step>.tmp` folders (a checkpoint never finished)
    are removed; a `.<step>.old` folder (a re-save killed between its two renames) is renamed back when its step has
    no folder, else removed. Returns what it did, one line each (also given to `log`)."""
    root = Path(root)
    done = []
    if not root.is_dir():
        return done
    for path in sorted(root.iterdir()):
        m = re.match(r"^\.(.+)\.(tmp|old)$", path.name)
        if not m or not path.is_dir() or layout.step_of(m.group(1)) is None:
            continue
        final = root / m.group(1)
        if m.group(2) == "old" and not final.exists() and (path / STATE).is_file():
            os.replace(path, final)
            done.append(f"restored {final} from an interrupted re-save")
        else:
            remove_quietly(path)
            done.append(f"removed {path.name}, left by an interrupted save")
    for line in done:
        if log is not None:
            log(line)
    return done


def write_state(folder, state: dict) -> None:
    write_text(Path(folder) / STATE, json.dumps(state, indent=2))


def save(root, step: int, model_state: dict, ema_state: dict | None, train_state: dict, state: dict,
         keep_last: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """train.py's checkpoint: model, EMA, optimizer / loss-scale state and state.json (layout FULL). `metadata`
    goes into the model and EMA files (the architecture record of `pixart.models.convert.architecture_record`, so
    that sample.py loads them without guessing)."""
    for what, weights in (("model", model_state), ("EMA", ema_state or {}), ("optimizer state", train_state)):
        name = first_non_finite(weights)
        if name is not None:  # saving it would replace a good checkpoint (keep_last) with a useless one
            raise NonFiniteError(f"step {step}: the {what} weight {name} is not finite (NaN or inf): the run "
                                 f"diverged; not saved. The last good checkpoint is the newest in {root}; lower "
                                 "--learning_rate or clip gradients (--clip_grad / --max_grad_norm) and resume")

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
    file = path / STATE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {STATE}")
    if file.stat().st_size > MAX_STATE_BYTES:
        raise CheckpointError(f"{file}: {file.stat().st_size} bytes; a {STATE} is at most {MAX_STATE_BYTES}")
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({str(e)[:80]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got a {type(state).__name__}")
    for key in STATE_INTS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: {key!r} must be a non-negative integer, got {value!r}")
    for key, kind in STATE_TYPES.items():
        if key in state and state[key] is not None and not isinstance(state[key], kind):
            raise CheckpointError(f"{file}: {key!r} must be a {kind.__name__}, got {type(state[key]).__name__}")
    return state


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
