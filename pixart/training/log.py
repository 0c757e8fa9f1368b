"""The run's log: rank 0 prints and writes train.log (text) and train_log.jsonl (one row per step), and with
`--report_to tensorboard` TensorBoard events (the step metrics as scalars, validation images as image summaries);
every rank may print a line tagged with its rank (msrun keeps one log per worker)."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

from PIL import Image

TENSORBOARD_SCALARS = ("loss", "mse", "vb", "lr", "grad_norm", "loss_scale", "images_per_s", "step_time",
                       "data_time")


class TensorBoard:
    """TensorBoard events written by the `tensorboard` package's own event-file writer (no TensorFlow, no torch)."""

    def __init__(self, folder: Path, resume_step: int | None):
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:  # optional: only --report_to tensorboard needs it
            raise ValueError("--report_to tensorboard needs the `tensorboard` package (pip install tensorboard)") \
                from None
        self.Event, self.Summary = Event, Summary
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(folder))
        if resume_step is not None:  # TensorBoard drops the events a killed run wrote past the resumed step
            self.writer.add_event(Event(wall_time=time.time(), step=resume_step + 1,
                                        session_log=SessionLog(status=SessionLog.START)))

    def _write(self, step: int, values: list) -> None:
        self.writer.add_event(self.Event(wall_time=time.time(), step=step, summary=self.Summary(value=values)))

    def scalars(self, row: dict) -> None:
        self._write(row["step"], [self.Summary.Value(tag=f"train/{k}", simple_value=float(row[k]))
                                  for k in TENSORBOARD_SCALARS if k in row])

    def images(self, step: int, paths, tag: str = "validation") -> None:
        values = []
        for i, path in enumerate(paths):
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                channels = len(im.getbands())
            values.append(self.Summary.Value(tag=f"{tag}/{i:02d}", image=self.Summary.Image(
                height=h, width=w, colorspace=channels, encoded_image_string=data)))
        if values:
            self._write(step, values)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Logger:
    def __init__(self, output_dir: Path, ctx, resume_step: int | None, report_to: str = "none",
                 logging_dir: str = "logs"):
        self.ctx = ctx
        self.text = self.jsonl = self.tensorboard = None
        if ctx.is_main and report_to in ("tensorboard", "all"):
            self.tensorboard = TensorBoard(Path(output_dir) / logging_dir, resume_step)
        if ctx.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl_path = output_dir / "train_log.jsonl"
            if resume_step is not None and self.jsonl_path.exists():  # drop what a killed run logged past the resume
                kept = [line for line in self.jsonl_path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", resume_step + 1) <= resume_step]
                tmp = self.jsonl_path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.jsonl_path)
            elif self.jsonl_path.exists():
                self.jsonl_path.unlink()
            self.jsonl = open(self.jsonl_path, "a")
            self.text = open(output_dir / "train.log", "a")

    def info(self, msg: str) -> None:
        if self.ctx.is_main:
            print(msg, flush=True)
            self.text.write(msg + "\n")
            self.text.flush()

    def rank(self, msg: str) -> None:
        """A line from every rank (msrun keeps one log per worker)."""
        print(f"[rank {self.ctx.rank}/{self.ctx.world_size}] {msg}", flush=True)

    def record(self, row: dict) -> None:
        if self.ctx.is_main:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
            if self.tensorboard is not None and "step" in row:
                self.tensorboard.scalars(row)

    def images(self, step: int, paths) -> None:
        """Validation images (PNG files) as TensorBoard image summaries, when TensorBoard is on."""
        if self.ctx.is_main and self.tensorboard is not None:
            self.tensorboard.images(step, paths)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        for f in (self.text, self.jsonl):
            if f is not None:
                f.close()
