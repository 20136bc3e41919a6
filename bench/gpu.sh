#!/usr/bin/env bash
# The prepared command for a lent GPU: bench/gpu.py's steps, each under its cap, then the summary.
#
#   bash bench/gpu.sh [--dry-run] [--steps STEP,STEP,...] [OUT_DIR]     (OUT_DIR default: gpu-results)
#
# Runs from any directory, on a fresh checkout, offline. The Python: $PYTHON, else the checkout's .venv, else
# python or python3 on the PATH. Steps, caps, the files written and the exit code: bench/gpu.py's docstring
# (bash bench/gpu.sh --help); which steps to run in which call: docs/benchmarks.md.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[[ -n ${PYTHON:-} || -x $PY ]] || PY=$(command -v python || command -v python3)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu "$@"
