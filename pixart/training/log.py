"""The run's log: rank 0 prints and writes train.log (text) and train_log.jsonl (one row per step); every rank may
print a line tagged with its rank (msrun keeps one log per worker)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class Logger:
    def __init__(self, output_dir: Path, ctx, resume_step: int | None):
        self.ctx = ctx
        self.text = self.jsonl = None
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

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f is not None:
                f.close()
