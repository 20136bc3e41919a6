"""Every benchmark within a time budget, then its report: JSON, Markdown tables and PNG plots, at most 8 files.

    python -m bench [--device cpu|cuda] [--out DIR] [--budget SECONDS] [--quick] [--only SUITE ...]

Measures the yardsticks first (float32 and bfloat16 matmul GFLOP/s, copy GB/s: bench/timing.py),
sets the one float32 math mode of the run (timing.TF32), then runs each suite in a share of the
budget; inside a suite the implementations under comparison run interleaved, and a cell the
budget cannot reach is listed as not measured. Writes DIR/results.json (pytest-benchmark's
shape, plus the yardsticks and the math mode), DIR/results.md and at most 5 PNGs (bench/report.py);
DIR defaults to docs/benchmarks. ``--quick``: every suite at tiny sizes, one or two rounds, no
torch.compile (what CI runs, so no suite and no report can rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import bench_cross_entropy, bench_gated, bench_train, bench_wavenet, report, timing

# Share of the budget per suite (each stops where its share runs out).
SUITES = {
    "orders": 0.35,
    "generation": 0.10,
    "gated": 0.15,
    "cross-entropy": 0.15,
    "train": 0.25,
}
QUICK_BUDGET = 60.0  # --quick: every cell runs at least once; the budget only bounds the rounds


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cross_entropy(device: torch.device, budget_s: float, quick: bool, peaks: dict) -> list[dict]:
    """The KERNEL suite's sweep (bench/bench_cross_entropy.py), given the arguments it takes."""
    sweep = getattr(bench_cross_entropy, "sweep", None)
    if sweep is None:
        return [timing.skipped("cross-entropy", "sweep", "bench/bench_cross_entropy.py has no sweep() yet")]
    offered = {"device": device, "budget_s": budget_s, "quick": quick, "peaks": peaks}
    accepted = inspect.signature(sweep).parameters
    return list(sweep(**{k: v for k, v in offered.items() if k in accepted}))


def run_suite(name: str, device: torch.device, budget_s: float, quick: bool, peaks: dict, compiled: bool) -> list[dict]:
    if name == "orders":
        return bench_wavenet.orders(device, budget_s, peaks, quick=quick, compiled=compiled)
    if name == "generation":
        return bench_wavenet.generation(device, budget_s, quick=quick)
    if name == "gated":
        return bench_gated.sweep(device, budget_s, quick=quick)
    if name == "train":
        return bench_train.sweep(device, budget_s, quick=quick)
    return cross_entropy(device, budget_s, quick, peaks)


def run(device: torch.device, out: Path, budget_s: float, quick: bool, only: list[str], command: str) -> list[Path]:
    """Measure ``only`` suites on ``device`` within ``budget_s`` seconds; write the report into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    math_mode = timing.set_math_mode(device)
    started = time.perf_counter()
    peaks = timing.peaks(device, quick=quick, budget_s=min(10.0, 0.05 * budget_s))
    print(f"yardsticks: {peaks}; {math_mode}", flush=True)
    benchmarks, seconds = [], {}
    weights = {name: SUITES[name] for name in only}
    for name, weight in weights.items():
        share = max(0.0, budget_s - (time.perf_counter() - started)) * weight / sum(w for n, w in weights.items() if n not in seconds)
        t0 = time.perf_counter()
        benchmarks += run_suite(name, device, share, quick, peaks, compiled=not quick and device.type == "cpu")
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s (share {share:.0f} s)", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = out / "results.json"
    results.write_text(
        json.dumps(
            {
                "machine_info": {"cpu": {"brand_raw": cpu_name(), "count": os.cpu_count()}, "python_version": platform.python_version()},
                "device": device_name,
                "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command,
                "math_mode": math_mode,
                "peaks": peaks,
                "suite_seconds": seconds,
                "benchmarks": benchmarks,
            },
            indent=1,
        )
    )
    note = (
        f"Device: {device_name}, torch {torch.__version__}, {datetime.date.today()}, `{command}`. {math_mode}; "
        f"yardsticks in this run: float32 matmul {peaks['float32_gflops']:g} GFLOP/s, bfloat16 {peaks['bfloat16_gflops']:g} GFLOP/s, "
        f"copy {peaks['copy_gbps']:g} GB/s."
    )
    return [results, *report.write(results, out, note)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--budget", type=float, default=480.0, metavar="SECONDS", help="time for all suites together (default: 480)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one or two rounds: a smoke run")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES), help="these suites only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here: use --device cpu")
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    budget = min(args.budget, QUICK_BUDGET) if args.quick else args.budget
    for path in run(device, args.out, budget, args.quick, args.only, command.strip()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
