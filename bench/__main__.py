"""Every benchmark suite, then its report: JSON, Markdown tables and PNG plots in one folder.

    python -m bench [--device cpu|cuda] [--out DIR] [--quick] [PYTEST_ARGS...]

Writes DIR/results.json (pytest-benchmark's), DIR/results.md and DIR/*.png (bench/report.py);
DIR defaults to docs/benchmarks, where the README's tables and plots come from. ``--quick`` runs
every suite at tiny sizes, one round each (what CI runs, so no suite and no report can rot); its
figures mean nothing. Extra arguments go to pytest, e.g. ``-k wavenet`` for one suite.
"""

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import report

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    args, pytest_args = parser.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    env = dict(os.environ, MAKEMORE_BENCH_QUICK="1" if args.quick else "0")
    command = [sys.executable, "-m", "pytest", str(BENCH_DIR), "-p", "no:cacheprovider", f"--device={args.device}", f"--benchmark-json={results}"]
    if args.quick:
        command += ["-q", "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]
    code = subprocess.call(command + pytest_args, env=env)
    if code != 0:
        return code
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    note = f"Device: {device}, torch {torch.__version__}, {datetime.date.today()}, `python -m bench {' '.join(argv or sys.argv[1:])}`."
    for path in report.write(results, args.out, note):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
