"""tools/selfcheck.py once its options are parsed (the library is `pixart.selfcheck`): print the plan, or run it,
print the table, and fail (SelfCheckFailed: exit 1) naming every failed row."""
from __future__ import annotations

import argparse
import sys

from pixart.cli.options import DEVICES, ArgumentParser
from pixart.selfcheck import runner
from pixart.selfcheck.checks import CHECKS
from pixart.selfcheck.plan import plan

DTYPES = tuple(runner.TOLERANCES)
MODES = ("graph", "pynative")


class SelfCheckFailed(ValueError):
    pass


def _device(value: str):
    """--device_target: 'auto' (None: `check_execution` picks Ascend where MindSpore reports one, else CPU) or a
    device name."""
    if value == "auto":
        return None
    if value not in DEVICES:
        raise argparse.ArgumentTypeError(f"must be auto, {', '.join(DEVICES)}; got {value!r}")
    return value


def _listed(allowed, what: str):
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(value)}; choose from "
                                             f"{', '.join(allowed)} (comma-separated)")
        return list(dict.fromkeys(items))
    return parse


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device_target", type=_device, default=None, metavar="{auto,CPU,GPU,Ascend}",
                   help="default auto: Ascend where MindSpore reports one, else CPU")
    p.add_argument("--dtype", type=_listed(DTYPES, "dtype"), default=["fp32", "fp16"],
                   help=f"comma-separated, from {', '.join(DTYPES)} (default fp32,fp16)")
    p.add_argument("--mode", type=_listed(MODES, "mode"), default=list(MODES),
                   help="comma-separated, from graph, pynative (default both)")
    p.add_argument("--checks", type=_listed(tuple(CHECKS), "check"), default=None,
                   help=f"comma-separated subset of {', '.join(CHECKS)} (default all)")
    p.add_argument("--msrun", action="store_true",
                   help="also run the training step data-parallel on 2 ranks under msrun --worker_num=2")
    p.add_argument("--plan", action="store_true", help="print which checks and kernels would run, run nothing")
    return p


def print_plan(steps) -> None:
    for s in steps:
        what = f"skip: {s.skip}" if s.skip else "; ".join(f"{k}: {v}" for k, v in s.kernels.items())
        print(f"{s.check:16} {s.dtype:5} {s.mode:8} {what}")


def run(args) -> None:
    from pixart import backend
    parallel = [c for c in args.checks or () if CHECKS[c].kind == "parallel"]
    if parallel and not args.msrun:
        raise ValueError(f"--checks {', '.join(parallel)} runs under msrun: add --msrun")
    if args.plan:
        backend.setup(args.device_target, args.mode[0])
        print_plan(plan(args.dtype, args.mode, args.checks, args.msrun))
        return
    print(f"self-check on {args.device_target}: dtypes {', '.join(args.dtype)}; modes {', '.join(args.mode)}",
          flush=True)
    rows = runner.run(args.device_target, args.dtype, args.mode, args.checks, args.msrun,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    print(runner.table(rows))
    verdict = runner.summary(rows)
    if any(r.failed for r in rows):
        *details, last = verdict.splitlines()
        print("\n".join(details))
        raise SelfCheckFailed(last)
    print(verdict)
