"""Run the plan on the device, compare every output with its stored PyTorch reference, report a table.

The error of a check is max |ours - reference| / max |reference| over its outputs; it passes when that is at most
the tolerance of its dtype in TOLERANCES (the one table, which the tests use too).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pixart import backend
from pixart.selfcheck import fixtures
from pixart.selfcheck.checks import CHECKS, NOT_COVERED, Session
from pixart.selfcheck.plan import plan

# dtype -> the largest relative error (max |ours - reference| / max |reference|) a check may show: a few times the
# largest error of a correct run on MindSpore's CPU backend (docs/selfcheck.md), so that another device's kernel
# order and accumulation pass and a wrong kernel (mask, layout, softmax, dtype rule) fails. fp32: rounding of a
# different summation order; fp16: 11 significant bits through a few layers and steps; bf16: 8 bits, 8 times fp16.
TOLERANCES = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 2e-1}


@dataclass
class Row:
    check: str
    device: str
    dtype: str
    mode: str
    error: float | None = None  # None: skipped, or failed before comparing
    status: str = "ok"          # "ok", "FAIL", "skip"
    note: str = ""
    seconds: float = 0.0

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    @property
    def label(self) -> str:
        return f"{self.check} ({self.dtype}, {self.mode})"


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|; inf where ours is not finite or the shapes differ."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape or not np.isfinite(ours).all():
        return math.inf
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def load_references(path: Path = fixtures.REFERENCES) -> dict[str, np.ndarray]:
    if not Path(path).exists():
        raise ValueError(f"no stored self-check references at {path}: run python -m tools.make_selfcheck_refs")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def compare(outputs: dict, references: dict, name: str) -> float:
    """The check's error: the largest over its outputs (every output needs a reference)."""
    errors = []
    for key, value in outputs.items():
        ref = references.get(f"{name}/{key}")
        if ref is None:
            raise KeyError(f"no stored reference {name}/{key}: run python -m tools.make_selfcheck_refs")
        errors.append(rel_err(value, ref))
    return max(errors)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def run(device: str, dtypes, modes, checks=None, msrun: bool = False, log: Callable[[str], None] = print,
        references: dict | None = None) -> list[Row]:
    """Set the device, then run the plan's checks pass by pass (mode, then dtype) and compare; one Row each."""
    references = load_references() if references is None else references
    rows = []
    for mode in modes:
        backend.setup(device, mode)
        by_pass: dict[str, Session] = {}
        for step in plan(dtypes, [mode], checks, msrun):
            row = Row(step.check, device, step.dtype, mode)
            rows.append(row)
            if step.skip:
                row.status, row.note = "skip", step.skip
                log(f"  {row.label}: skipped")
                continue
            session = by_pass.setdefault(step.dtype, Session(device, step.dtype, mode))
            check = CHECKS[step.check]
            start = time.perf_counter()
            try:
                row.error = compare(check.run(session), references, check.reference_name)
                ok = row.error <= row.tolerance
                row.status = "ok" if ok else "FAIL"
                if not ok:
                    row.note = f"error {row.error:.2e} above the {step.dtype} tolerance {row.tolerance:.0e}"
            except Exception as e:  # noqa: BLE001 (a kernel the device lacks, a failed launch: the row fails)
                row.status, row.note = "FAIL", _one_line(e)
            row.seconds = time.perf_counter() - start
            log(f"  {row.label}: {row.status} ({row.seconds:.1f} s)")
    return rows


def _fmt_error(row: Row) -> str:
    return "-" if row.error is None else f"{row.error:.2e}"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table: check, device, dtype, mode, max error, tolerance, ok."""
    head = ["check", "device", "dtype", "mode", "max error", "tolerance", "ok"]
    body = [[r.check, r.device, r.dtype, r.mode, _fmt_error(r), f"{r.tolerance:.0e}", r.status] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def summary(rows: list[Row]) -> str:
    """What follows the table: skip reasons (once each), failures with their reasons, what is not covered, and the
    verdict line."""
    lines = []
    reasons = sorted({r.note for r in rows if r.status == "skip"})
    lines += [f"skipped: {reason}" for reason in reasons]
    lines += [f"not covered: {what}" for what in NOT_COVERED.values()]
    failed = [r for r in rows if r.failed]
    lines += [f"FAILED {r.label}: {r.note}" for r in failed]
    ran = sum(r.status != "skip" for r in rows)
    if failed:
        lines.append(f"self-check FAILED: {len(failed)} of {ran} checks: {', '.join(r.label for r in failed)}")
    else:
        lines.append(f"self-check passed: {ran} checks ({len(rows) - ran} skipped)")
    return "\n".join(lines)
