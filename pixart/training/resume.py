"""Resuming a run exactly: which checkpoint `--resume` names, the optimizer and loss-scale state it restores, and
what each checkpoint's state.json records (the step and the data position are all a resume needs)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from mindspore import Tensor

from pixart.io import CheckpointError
from pixart.training import checkpoint as ckpt
from pixart.training.setup import Data, Optimisation, TrainError, default_flag


def resume_target(args, root, ctx, layout=None, flag: Callable[[str], str] = default_flag) -> Path | None:
    """The checkpoint folder `--resume` names (None: start from scratch); a bad path fails before anything slow.
    What an interrupted save left under `root` is cleaned first (`checkpoint.clean_leftovers`)."""
    if ctx.is_main:
        ckpt.clean_leftovers(root, layout or ckpt.FULL, log=lambda line: print(line, flush=True))
    if not args.resume:
        return None
    path = ckpt.resolve(args.resume, root, layout or ckpt.FULL)
    if path is None and ctx.is_main:
        print(f"{flag('resume')} latest: no checkpoint in {root} yet; starting from scratch", flush=True)
    return path


def restore_training_state(resumed, path, opt: Optimisation, args, ctx, dataset, log) -> tuple[int, int]:
    """Optimizer and loss-scale state of a checkpoint, with warnings where the data order cannot repeat;
    returns (step, global batches consumed)."""
    state = resumed["state"]
    if state.get("optimizer") != args.optimizer:
        raise TrainError(f"checkpoint {path} was trained with {state.get('optimizer')}, not --optimizer "
                         f"{args.optimizer}")
    try:
        opt.optimizer.load_state_dict(resumed["train_state"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    for p in opt.step_cell.state_parameters():
        if p.name in resumed["train_state"]:
            p.set_data(Tensor(resumed["train_state"][p.name], dtype=p.dtype))
    if state.get("global_batch") != args.batch_size * ctx.world_size:
        log.info(f"warning: the checkpoint was trained with a global batch of {state.get('global_batch')}, now "
                 f"{args.batch_size * ctx.world_size}: the data order differs from an uninterrupted run")
    if state.get("data", {}).get("fingerprint") != ckpt.fingerprint(e.path for e in dataset.entries):
        log.info("warning: the usable data differ from the checkpoint's; the data order differs from an "
                 "uninterrupted run")
    log.info(f"resumed from {path}: step {state['step']}, {state['batches_done']} batches consumed "
             f"(epoch {state.get('epoch')})")
    return int(state["step"]), int(state["batches_done"])


def run_state(step: int, batches: int, args, ctx, data: Data, stream, failures_before: list) -> dict:
    """What state.json records: step and data position (all a resume needs), and what the run was."""
    dataset = data.dataset
    return {
        "step": step, "batches_done": batches, "epoch": stream.position(batches)[0], "seed": args.seed,
        "rng": "numpy default_rng([seed, 1, epoch]) shuffles; default_rng([seed, 2, batch, slot]) per sample",
        "model": args.model, "optimizer": args.optimizer, "batch_size": args.batch_size,
        "world_size": ctx.world_size, "global_batch": data.global_batch, "grad_accumulation": args.grad_accumulation,
        "data": {"labels": dataset.num_labels, "usable": len(dataset),
                 "fingerprint": ckpt.fingerprint(e.path for e in dataset.entries)},
        "skipped": [dataclasses.asdict(s) for s in dataset.skipped],
        "decode_failures": failures_before + [dataclasses.asdict(s) for s in dataset.decode_failures],
        "args": {k: v for k, v in vars(args).items()},
    }


def param_state(model) -> dict[str, np.ndarray]:
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


