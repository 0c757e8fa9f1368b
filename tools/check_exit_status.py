"""Run a command N times and count its exit statuses and any heap-corruption message from glibc.

A process that finishes its work but corrupts the heap while it tears down exits 134 (SIGABRT) or 139 (SIGSEGV)
and prints e.g. "corrupted size vs. prev_size" or "double free". This checks that an entry point exits with its
real status, every time:

    python tools/make_demo_bundle.py
    python tools/check_exit_status.py -n 20                      # sample.py on the demo bundle, graph mode
    python tools/check_exit_status.py -n 5 -- python -m pytest -q tests/test_backend.py
    python tools/check_exit_status.py -n 5 --interrupt-when "serving on" -- \
        python gradio_demo.py -c configs/inference/demo.yaml

Exits 0 when every run returned the expected status (--expect, default 0) and no run printed a heap message.
"""
from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import threading
import time

DEFAULT = [sys.executable, "sample.py", "-c", "configs/inference/demo.yaml", "--prompt", "x", "--mode", "graph",
           "--progress", "false"]
# glibc's malloc checks and the signals a teardown crash ends in
HEAP = re.compile(r"corrupted size|double free|free\(\): |malloc\(\): |malloc_consolidate|munmap_chunk|"
                  r"corrupted double-linked|Segmentation fault|Aborted \(core dumped\)|Fatal Python error")


def run_once(cmd: list[str], timeout: float, interrupt_when: str | None = None) -> tuple[int, list[str], str]:
    """(exit status, heap messages, combined output) of one run; a signal shows as 128 + its number, as a shell
    reports it. With `interrupt_when`, the process gets SIGINT (Ctrl+C) once its output shows that text (a server
    stopped by its user)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if interrupt_when and interrupt_when in line:
                proc.send_signal(signal.SIGINT)
                interrupt_when = None
        rc = proc.wait()
    finally:
        timer.cancel()
    rc = rc if rc >= 0 else 128 - rc
    out = "".join(lines)
    return rc, [ln.strip() for ln in out.splitlines() if HEAP.search(ln)], out


def check(cmd: list[str], runs: int, expect: int = 0, timeout: float = 600, interrupt_when: str | None = None,
          log=print) -> bool:
    """Run `cmd` `runs` times; log one line per run and a summary; True when all runs were clean."""
    statuses: collections.Counter = collections.Counter()
    heap_runs = 0
    for i in range(runs):
        start = time.perf_counter()
        rc, heap, out = run_once(cmd, timeout, interrupt_when)
        statuses[rc] += 1
        heap_runs += bool(heap)
        log(f"run {i + 1}/{runs}: rc {rc}, {time.perf_counter() - start:.1f} s"
            + (f", heap: {' | '.join(heap)}" if heap else ""))
        if rc != expect and not heap:
            log("  last lines: " + " | ".join(out.strip().splitlines()[-3:]))
    ok = statuses[expect] == runs and not heap_runs
    summary = ", ".join(f"rc {rc}: {n}" for rc, n in sorted(statuses.items()))
    log(f"{'clean' if ok else 'NOT clean'}: {summary}; runs with a heap message: {heap_runs} of {runs}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=20)
    p.add_argument("--expect", type=int, default=0, help="the exit status every run should return")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run (then it is killed)")
    p.add_argument("--interrupt-when", default=None, metavar="TEXT",
                   help="send SIGINT (Ctrl+C) once the output shows TEXT: for a server such as gradio_demo.py")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --); default: sample.py on the demo "
                                                         "bundle in graph mode")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    return 0 if check(cmd or DEFAULT, a.runs, a.expect, a.timeout, a.interrupt_when) else 1


if __name__ == "__main__":
    sys.exit(main())
