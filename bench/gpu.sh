#!/usr/bin/env bash
# One prepared command for a lent GPU (issue 15 §8): every GPU figure the project needs, in calls of
# under 8 minutes (a lease allows 10 a command, 15 in all):
#   bash bench/gpu.sh --steps env,tests,check,cross-entropy OUT  # part 1, about 4 minutes
#   bash bench/gpu.sh --steps env,orders,generation,lecture OUT  # part 2, about 3 minutes
#   bash bench/gpu.sh --steps env,race OUT                       # the race, at most 8 minutes
#
#   bash bench/gpu.sh [--dry-run] [--steps STEP,STEP,...] [OUT_DIR]     (OUT_DIR default: gpu-results)
#
# Run from the repository root of a fresh checkout on one H100 or H200 with torch, triton, pytest,
# pytest-benchmark, hypothesis, tqdm, matplotlib and numpy installed; no network is needed (where
# the project is not installed yet, the script runs `pip install --no-deps --no-build-isolation
# -e .`, which needs only the image's setuptools). Each step runs under `timeout`, capped by its own
# limit and by what is left of TOTAL seconds, so a hang costs only its cap and the whole command
# ends within TOTAL (560 s). Steps (bench/gpu.py): env, tests, check, cross-entropy, orders,
# generation, lecture, race; then the summary. OUT_DIR receives results.json (each step's
# section, written as it finishes), summary.md (printed last) and log.txt (every step's output),
# and the race's table, plot and JSON in OUT_DIR/race/: 6 files. --steps reruns some steps only (after a fix, in a second call). --dry-run: the same
# steps on the CPU at tiny sizes (CI runs it). Exits 1 if a step failed or ran past its cap (the
# summary still comes first).
set -uo pipefail

DRY=0
OUT=gpu-results
STEPS=env,tests,check,cross-entropy,orders,generation,lecture,race
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) STEPS=$2; shift ;;
        --steps=*) STEPS=${1#--steps=} ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        -*) echo "bench/gpu.sh: unknown option $1 (usage: bash bench/gpu.sh [--dry-run] [--steps a,b] [OUT_DIR])" >&2; exit 2 ;;
        *) OUT=$1 ;;
    esac
    shift
done

IFS=, read -ra WANTED <<<"$STEPS"
for step in "${WANTED[@]}"; do
    case "$step" in
        env|tests|check|cross-entropy|orders|generation|lecture|race) ;;
        *) echo "bench/gpu.sh: unknown step $step (steps: env, tests, check, cross-entropy, orders, generation, lecture, race)" >&2; exit 2 ;;
    esac
done

# Paths given relative to where the command was started, made absolute: the steps run from the repository root.
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
if [[ $PY == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rm -f "$OUT/results.json" "$OUT/summary.md" "$OUT/log.txt"
WORK=$(mktemp -d)  # training runs and the step table: outside OUT_DIR, which a lease brings back (8 files at most)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/log.txt
START=$SECONDS

# Seconds: the whole command, kept back for the summary, and each step's cap (the sweeps fit their
# budget to it). The GPU caps sum to more than TOTAL: a step that ends early leaves its time to the rest.
if ((DRY)); then  # the CPU's figures mean nothing: these caps only stop a hang, generously (CI machines may be busy)
    TOTAL=600 RESERVE=10
    declare -A CAP=([env]=60 [tests]=120 [check]=90 [cross-entropy]=60 [orders]=60 [generation]=60 [race]=150 [lecture]=60)
else
    # From the first H100 lease (2026-11-27): env 8 s, tests 39, check 24 (2 of its 4 variants), cross-entropy 34
    # (torch.compile's builds left out), orders 48, generation 17, lecture 31 (its compiled run cut). The race: 8 minutes.
    TOTAL=560 RESERVE=12
    declare -A CAP=([env]=20 [tests]=90 [check]=50 [cross-entropy]=90 [orders]=65 [generation]=30 [lecture]=60 [race]=480)
fi

# makemore.kernels is the tree's kernels/ folder (pyproject's package-dir): it imports only once the
# project is installed. Offline: no build isolation, the image's setuptools; no dependencies.
if ! "$PY" -c 'import makemore.kernels' >>"$LOG" 2>&1; then
    echo "== installing the project (pip install --no-deps --no-build-isolation -e .)" | tee -a "$LOG"
    timeout 120 "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
        || { echo "bench/gpu.sh: could not install the project (see $LOG); install it with pip install --no-deps -e ." >&2; exit 2; }
fi

DRYFLAG=()
((DRY)) && DRYFLAG=(--dry-run)

FAILED=()
for step in "${WANTED[@]}"; do
    left=$((TOTAL - RESERVE - (SECONDS - START)))
    cap=${CAP[$step]}
    ((cap > left)) && cap=$left
    if ((cap < 5)); then
        printf '%s\tskipped\t0\t%s\n' "$step" "out of time" >>"$WORK/steps.tsv"
        continue
    fi
    echo "== $step (cap ${cap} s, $((SECONDS - START)) s so far)" | tee -a "$LOG"
    t0=$SECONDS
    # The step's own budget is its cap less a margin for Python and CUDA start-up; timeout kills the step's process group.
    timeout -k 5 "$cap" "$PY" -m bench.gpu "$step" --out "$OUT" --work "$WORK" --budget $((cap - 8)) "${DRYFLAG[@]}" >>"$LOG" 2>&1
    rc=$?
    ((rc)) && FAILED+=("$step")
    printf '%s\t%s\t%s\t%s\n' "$step" "$rc" $((SECONDS - t0)) "$cap" >>"$WORK/steps.tsv"
    echo "   $step: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
done

timeout $((RESERVE + 8)) "$PY" -m bench.gpu summary --out "$OUT" --work "$WORK" 2>>"$LOG"
echo "total: $((SECONDS - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if ((${#FAILED[@]})); then
    echo "bench/gpu.sh: steps that failed or ran out of time: ${FAILED[*]} (their output: $LOG)" >&2
    exit 1
fi
