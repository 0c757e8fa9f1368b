"""The training loop: optimizer steps with their learning rate, micro-batches, log lines and rows, checkpoints and
validation at their intervals; then the run's summary."""
from __future__ import annotations

import dataclasses
import resource
import time
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pixart.training.batch import BATCH_KEYS
from pixart.training.checkpoint import check_finite_step
from pixart.training.optimizers import learning_rate_at
from pixart.training.setup import Data, Optimisation


def train_loop(args, opt: Optimisation, stream, builder, start_step: int, max_steps: int, log,
               save: Callable[[int, int], None], validate: Callable[[int], None] | None = None,
               validate_every: int = 0, steps_per_epoch: int = 0, validate_last: bool = False) -> dict:
    """Optimizer steps start_step+1 .. max_steps: lr, micro-batches, step, log line and jsonl row, checkpoints every
    --save_every steps, at the end of every --ckpt_save_interval-th epoch (`steps_per_epoch` steps each) and at the
    last step; validation every `validate_every` steps (and at the last step with `validate_last`). Returns the step
    times and overflows."""
    save_epochs = getattr(args, "ckpt_save_interval", None)
    step_times, window, skipped_steps = [], [], 0
    last_tic = time.time()
    step = start_step
    for step in range(start_step + 1, max_steps + 1):
        tic = time.time()
        step_lr = Tensor(learning_rate_at(getattr(args, "lr_scheduler", "constant_with_warmup"), step - 1, opt.lr,
                                          args.warmup_steps, max_steps, getattr(args, "lr_num_cycles", 1),
                                          getattr(args, "lr_power", 1.0)), ms.float32)
        losses, data_time = [], 0.0
        for micro in range(args.grad_accumulation):
            t_data = time.time()
            ref = next(stream)
            batch = builder(ref)
            data_time += time.time() - t_data
            if step == start_step + 1 and micro == 0:
                log.rank(f"first batch (global batch {ref.index}, bucket {ref.bucket}): "
                         + ", ".join(e.path for e in ref.entries))
            out = opt.step_cell(*(Tensor(batch[k]) for k in BATCH_KEYS), step_lr,
                                micro == args.grad_accumulation - 1)
            losses.append(out[1].asnumpy())
        _, _, norm, finite, scale = out
        terms = np.mean(losses, 0)
        finite = bool(finite.asnumpy())
        skipped_steps += not finite
        dt = time.time() - tic
        step_times.append(dt)
        row = {"step": step, "loss": float(terms[0]), "mse": float(terms[1]), "vb": float(terms[2]),
               "lr": float(step_lr.asnumpy()), "grad_norm": float(norm.asnumpy()),
               "loss_scale": float(scale.asnumpy()), "skipped": not finite, "epoch": stream.position(ref.index)[0],
               "bucket": ref.bucket, "images_per_s": opt.effective_batch / dt, "step_time": dt,
               "data_time": data_time}
        log.record(row)
        check_finite_step(step, row["loss"], finite, opt.dynamic)  # stops before a checkpoint of a diverged run
        window.append(row)
        if step % args.log_every == 0 or step == start_step + 1 or step == max_steps:
            t = time.time() - last_tic
            imgs = opt.effective_batch * len(window) / max(t, 1e-9)
            mean = lambda k: float(np.mean([r[k] for r in window]))  # noqa: E731
            log.info(f"step {step}/{max_steps} | loss {mean('loss'):.4f} (mse {mean('mse'):.4f}, vb {mean('vb'):.4f}) "
                     f"| lr {row['lr']:.3g} | grad norm {mean('grad_norm'):.3g} | {imgs:.2f} img/s (data "
                     f"{mean('data_time'):.3f}s) | loss scale {row['loss_scale']:g}"
                     + (f" | {sum(r['skipped'] for r in window)} skipped (overflow)"
                        if any(r["skipped"] for r in window) else ""))
            window, last_tic = [], time.time()
        epoch_end = bool(steps_per_epoch) and step % steps_per_epoch == 0
        if step != max_steps and (step % args.save_every == 0 or (
                save_epochs and epoch_end and (step // steps_per_epoch) % save_epochs == 0)):
            save(step, stream.next_index)
        if validate is not None and ((validate_every and step % validate_every == 0)
                                     or (validate_last and step == max_steps)):
            validate(step)
    if max_steps > start_step:
        save(step, stream.next_index)
    return {"step_times": step_times, "skipped_steps": skipped_steps}


def finish(args, log, data: Data, failures_before: list, max_steps: int, loop: dict) -> dict:
    """Report replaced images, the speed and memory summary (log line and jsonl row); returns the summary."""
    failures = failures_before + [dataclasses.asdict(s) for s in data.dataset.decode_failures]
    if failures:
        log.info(f"data: {len(failures)} image(s) failed to decode and were replaced: " +
                 "; ".join(f"{f['path']} ({f['reason']})" for f in failures[:5]))
    step_times = loop["step_times"]
    summary = {"steps": max_steps, "skipped_steps": loop["skipped_steps"], "peak_rss_mb": _peak_rss_mb(),
               # the first steps compile (one graph per bucket shape in graph mode): the median skips them
               "median_step_s": float(np.median(step_times[2:] or step_times)) if step_times else None,
               "skipped_images": len(data.dataset.skipped) + len(failures)}
    log.info(f"done: {max_steps} steps, {summary['skipped_steps']} skipped; median step "
             f"{summary['median_step_s'] or 0:.3f}s, peak RSS {summary['peak_rss_mb']:.0f} MB; "
             f"{summary['skipped_images']} image(s) skipped")
    log.record({"summary": summary})
    return summary


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
