"""Every benchmark within a time budget, then its report: JSON, Markdown tables and PNG plots, at most 7 files.

    python -m bench [--device auto|cpu|cuda] [--out DIR] [--budget SECONDS] [--quick] [--only SUITE ...]

Measures the yardsticks first (float32 and bfloat16 matmul GFLOP/s, copy GB/s: bench/timing.py),
sets the one float32 math mode of the run (timing.TF32), then runs each suite (bench/suites.py) in
its share of the budget; inside a suite the implementations under comparison run interleaved, and
a cell the budget cannot reach is listed as not measured. Writes DIR/results.json
(pytest-benchmark's shape, plus the yardsticks and the math mode), DIR/results.md and at most
report.MAX_PNGS plots (bench/report.py); DIR defaults to docs/benchmarks. ``--quick``: every suite
at tiny sizes, one or two rounds, no torch.compile (what CI runs, so no suite and no report can
rot); its figures mean nothing.

This is the report for published figures. To track one machine's speed from commit to commit,
``pytest bench --benchmark-only`` times the headline cases through pytest-benchmark
(bench/test_regression.py), with its ``--benchmark-save`` and ``--benchmark-compare``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import report, timing
from bench.suites import SUITES
from makemore.device import check_device, describe, resolve_device

QUICK_BUDGET = 60.0  # --quick: every cell runs at least once; the budget only bounds the rounds


def run(device: torch.device, out: Path, budget_s: float, quick: bool, only: list[str], command: str) -> list[Path]:
    """Measure ``only`` suites on ``device`` within ``budget_s`` seconds; write the report into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    math_mode = timing.set_math_mode(device)
    started = time.perf_counter()
    peaks = timing.peaks(device, quick=quick, budget_s=min(10.0, 0.05 * budget_s))
    print(f"yardsticks: {peaks}; {math_mode}", flush=True)
    benchmarks, seconds = [], {}
    for i, name in enumerate(only):
        suite, weight = SUITES[name]
        left = max(0.0, budget_s - (time.perf_counter() - started))
        share = left * weight / sum(SUITES[n][1] for n in only[i:])
        t0 = time.perf_counter()
        benchmarks += suite(device, share, quick=quick)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s (share {share:.0f} s)", flush=True)
    results = out / "results.json"
    machine = {"cpu": {"brand_raw": describe(torch.device("cpu")), "count": os.cpu_count()}}
    record = {
        "machine_info": {**machine, "python_version": platform.python_version()},
        "device": describe(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "math_mode": math_mode,
        "peaks": peaks,
        "suite_seconds": seconds,
        "benchmarks": benchmarks,
    }
    results.write_text(json.dumps(record, indent=1))
    note = (
        f"Device: {describe(device)}, torch {torch.__version__}, {datetime.date.today()}, `{command}`. {math_mode}; "
        f"yardsticks in this run: float32 matmul {peaks['float32_gflops']:g} GFLOP/s, "
        f"bfloat16 {peaks['bfloat16_gflops']:g} GFLOP/s, copy {peaks['copy_gbps']:g} GB/s."
    )
    return [results, *report.write(results, out, note)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--budget", type=float, default=480.0, metavar="SECONDS", help="all suites together")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one or two rounds: a smoke run")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES), help="these suites only")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_device(device)
    except (RuntimeError, ValueError) as e:
        parser.error(str(e))
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    budget = min(args.budget, QUICK_BUDGET) if args.quick else args.budget
    for path in run(device, args.out, budget, args.quick, args.only, command.strip()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
