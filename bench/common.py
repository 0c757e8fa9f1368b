"""What every bench/ script shares: alternating child processes, JSON results, medians, peak RSS, the table.

Each measurement runs in a fresh child process (`python bench/X.py --child SIDE ...`), so peak RSS is that side's
alone and nothing warm carries over; the parent alternates the sides (ours, reference, ours, ...) so drifting machine
load hits both alike, then prints medians with min-max over every timed call of every run, the worst peak RSS, the
ratios ours / reference, the machine and the 1-minute load average seen at each run (timings taken at a load above
the core count are noisy: compare ratios only).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The OpenMP wait policy of the user's environment, read before anything this process imports could set it: each
# child gets it back, so that both sides run as their users run them (libgomp reads the policy once, when it loads).
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")


def child_env() -> dict:
    """The environment of a child process: this one's, with the user's OpenMP wait policy."""
    env = dict(os.environ)
    if USER_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = USER_WAIT_POLICY
    return env


def start_side(side: str, mode: str) -> int:
    """A child's set-up for its side: PyTorch on every core; ours imports pixart before mindspore (pixart sets the
    OpenMP wait policy, as the entry points do) and sets up MindSpore's CPU backend in `mode`. Returns the thread
    count."""
    threads = os.cpu_count() or 1
    if side == "torch":
        import torch
        torch.set_num_threads(threads)
    else:
        from pixart import backend
        backend.setup("CPU", mode)
    return threads


def peak_rss_gb() -> float:
    """This process's peak resident set size in GiB since it started or since `reset_peak_rss()` (Linux: VmHWM;
    elsewhere ru_maxrss, never reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def reset_peak_rss() -> float:
    """Start a new peak RSS window (Linux: `5` to /proc/self/clear_refs resets VmHWM) after loading, so that the
    peak then reported is the steady state's; returns the peak until now (the loading's) in GiB."""
    before = peak_rss_gb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def load_average() -> float:
    return os.getloadavg()[0]


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    """(first call's seconds, the next `repeat` calls' seconds): the first includes compilation."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def emit(result: dict) -> None:
    """A child's last stdout line: its result as JSON, with its peak RSS."""
    result.setdefault("peak_rss_gb", peak_rss_gb())
    print("RESULT " + json.dumps(result), flush=True)


def run_children(script: str, sides: tuple[str, ...], runs: int, args: list[str], timeout: float | None = None,
                 log=print) -> dict[str, list[dict]]:
    """Run `script --child SIDE *args` `runs` times per side, alternating sides; returns the results per side."""
    results = {side: [] for side in sides}
    for r in range(runs):
        for side in sides:
            load = load_average()
            cmd = [sys.executable, script, "--child", side, *args]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())
            wall = time.perf_counter() - t0
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{side} run {r} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            res.update(load_before=load, process_wall_s=wall)
            results[side].append(res)
            # the first timed series (bench_t5.py names them per prompt length: times_120, ...)
            times = res.get("times") or next((v for k, v in sorted(res.items()) if k.startswith("times_") and v),
                                             None) or [res.get("total_s", 0.0)]
            log(f"run {r} {side:6s}: median {statistics.median(times):.3f}s  first {res.get('first_s', 0):.1f}s  "
                f"peak RSS {res['peak_rss_gb']:.2f} GiB  load {load:.1f}", flush=True)
    return results


def summary(runs: list[dict], key: str = "times") -> dict:
    """Median and min-max over every timed call of every run, worst peak RSS, median first call."""
    values = []
    for r in runs:
        v = r[key]
        values.extend(v if isinstance(v, list) else [v])
    firsts = [r["first_s"] for r in runs if "first_s" in r]
    return dict(median=statistics.median(values), lo=min(values), hi=max(values), n=len(values),
                rss=max(r["peak_rss_gb"] for r in runs),
                first=statistics.median(firsts) if firsts else None,
                load=max(r["load_before"] for r in runs))


def fmt_row(name: str, s: dict, first_label: bool = True) -> str:
    first = f"{s['first']:.1f}" if s.get("first") is not None else "-"
    return (f"| {name} | {s['median']:.3f} ({s['lo']:.3f}-{s['hi']:.3f}) | {first} | {s['rss']:.2f} |")


def table(title: str, rows: list[tuple[str, dict]], ours: str = "ours", ref: str = "torch",
          first_header: str = "first call s (ours: compile)") -> str:
    """The markdown table the scripts print: one row per side, then each `ours*` side's ratios to `ref`."""
    lines = [f"**{title}**", "", f"| side | s per call: median (min-max) | {first_header} | peak RSS GiB |",
             "|---|---|---|---|"]
    by = dict(rows)
    lines += [fmt_row(name, s) for name, s in rows]
    for name, o in rows:  # every variant of ours (ours, ours_amx, ours_whole, ...) against the reference
        if name.startswith(ours) and ref in by:
            t = by[ref]
            lines.append(f"| **ratio {name} / {ref}** | **{o['median'] / t['median']:.2f}x** | | "
                         f"**{o['rss'] / t['rss']:.2f}x** |")
    load = max(s["load"] for _, s in rows)
    lines.append("")
    lines.append(f"max 1-minute load before a run: {load:.1f} on {os.cpu_count()} cores"
                 + (" (timings under load: compare ratios)" if load >= 1.3 else ""))
    return "\n".join(lines)


def machine() -> str:
    """One line: CPU, cores, memory, Python and library versions."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 ** 2
    except OSError:
        mem = float("nan")
    versions = []
    for mod in ("mindspore", "torch", "diffusers", "transformers", "numpy"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            versions.append(f"{mod} -")
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}; " + ", ".join(versions)


def wait_for_quiet(max_load: float, max_wait_s: float, log=print) -> float:
    """Poll the 1-minute load average until it drops below `max_load` (or `max_wait_s` passes); returns it."""
    t_end = time.time() + max_wait_s
    load = load_average()
    while load >= max_load and time.time() < t_end:
        log(f"load {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
        load = load_average()
    return load


def parse_or_run_child(parser, child):
    """Add --sides/--child and parse. In a child (`--child SIDE`), run `child(side, args)`, print its result and
    return None; in the parent return the arguments."""
    import argparse
    parser.add_argument("--sides", default="ours,torch")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        emit(child(a.child, a))
        return None
    return a


def without_attention_kernel() -> None:
    """Side `ours_bmm`: attention as BatchMatMul + softmax kernels, the path before the one-kernel attention
    (`pixart.cpu.kernels.attention`); call before accelerating the model."""
    from pixart.cpu import kernels
    kernels.attention = lambda masked: None


def torch_pixart(depth: int, size: int, threads: int = 0):
    """diffusers' PixArtTransformer2DModel shaped as PixArt-XL/2 (α, no micro-conditions), random weights, at
    `size` px, with `threads` intra-op threads (0: PyTorch's default)."""
    import torch
    from diffusers import PixArtTransformer2DModel
    if threads:
        torch.set_num_threads(threads)
    return PixArtTransformer2DModel(num_layers=depth, sample_size=size // 8, caption_channels=4096,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000,
                                    out_channels=8, use_additional_conditions=False)
