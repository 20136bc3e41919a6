"""The prepared command for a lent GPU: every GPU figure the project needs, step by step, within one time bound.

    bash bench/gpu.sh [--dry-run] [--steps STEP,STEP,...] [OUT]       # OUT defaults to gpu-results
    python -m bench.gpu [--dry-run] [--steps STEP,STEP,...] [OUT]     # the same, with this Python

Steps (STEPS in bench/gpu.py, with their caps): env (device, versions, yardsticks), tests (the CUDA test
suite), check (makemore.check's equivalence against float64), cross-entropy (the kernel suite's
sweep and the crossover that sets CUDA_ATEN_BELOW), orders (per-position loop, batched windows and
convolutions at block 8 to 4096, forward and forward + backward, float32 and bfloat16), generation
(cached against re-run, with and without CUDA graphs), lecture (the lecture's WaveNet at block 8,
steps/s), race (bench/race.py: transformer-gpu and the shakespeare-gpu candidates, with MFU).

Each step runs in a fresh process group of its own, killed at the step's cap; a cap is also bounded
by what is left of TOTAL_S, so a hang costs only its cap and the whole command ends within
TOTAL_S. OUT receives results.json (each step's section, written as it finishes), summary.md
(printed last, so the end of the output has the outcome), log.txt (every step's output) and the
race's table, plot and JSON in OUT/race/. Exits 1 if a step failed or ran past its cap.
``--dry-run``: the same steps on the CPU at tiny sizes (CI runs it, so the command cannot rot);
its figures mean nothing. ``--step NAME``: one step in this process, what the command's children run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from makemore.device import check_device, describe

REPO = Path(__file__).resolve().parents[1]
TOTAL_S = 560  # the whole command on a GPU; the dry run's only stops a hang, generously (CI machines may be busy)
DRY_TOTAL_S = 600
RESERVE_S = 10  # of the total, kept back for the summary
STARTUP_S = 8  # of a step's cap, left to Python's and CUDA's start-up: the step's own budget is the rest


def update(out: Path, key: str, value) -> None:
    """results.json[key] = value, written atomically (a step killed mid-write leaves the last whole file)."""
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run(command: list[str], timeout: float, log=None) -> tuple[int, str, float]:
    """(exit code, output, seconds) of ``command``, run from the repository root in a process group of
    its own; where it runs past ``timeout`` the whole group (grandchildren too) is killed and the exit
    code is 124. The output goes to the open file ``log`` where given, else it is returned and printed
    (into the step's output, which the command's log keeps)."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=REPO, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = child.communicate(timeout=timeout)
        code = child.returncode
    except subprocess.TimeoutExpired:
        kill(child.pid, signal.SIGTERM)
        try:
            output, _ = child.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            kill(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
        code = 124
    kill(child.pid, signal.SIGKILL)  # whatever the command left running
    if log is None:
        print(output, flush=True)
    return code, output or "", round(time.perf_counter() - start, 1)


def kill(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:  # the group has no process left
        pass


# Steps.


def env(args, device: torch.device) -> dict:
    from bench import timing

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    info.update(device=str(device), name=describe(device))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        info.update(memory_gib=round(p.total_memory / 2**30, 1), l2_mib=p.L2_cache_size / 2**20)
        query = "--query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
        code, smi, _ = run(["nvidia-smi", query, "--format=csv"], 20)
        info["nvidia_smi"] = smi.strip() if code == 0 else f"nvidia-smi exited {code}"
    info["math_mode"] = timing.set_math_mode(device)
    info["peaks"] = timing.peaks(device, quick=args.dry_run, budget_s=min(10.0, args.budget / 2))
    return info


def tests(args, device: torch.device) -> dict:
    """``pytest --device cuda``: every device-parametrised test on the GPU (skipped on a CPU: the dry run)."""
    command = [sys.executable, "-m", "pytest", "--device", "cuda", "-q", "-p", "no:cacheprovider"]
    code, output, seconds = run(command, args.budget)
    lines = output.strip().splitlines()
    cuda = next((line for line in reversed(lines) if line.startswith("cuda cases:")), "no cuda cases line")
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    last = lines[-1] if lines else ""
    return {"exit_code": code, "seconds": seconds, "cuda_cases": cuda, "last_line": last, "failures": failures[:40]}


CHECKS = [  # makemore.check runs: every order of each model against float64 (the CUDA tests cover smaller sizes)
    ["--model", "wavenet", "--block-size", "1024", "--dtype", "float32"],
    ["--model", "gated", "--n-levels", "8", "--stacks", "2", "--dtype", "bfloat16"],
    ["--model", "wavenet", "--block-size", "256", "--fused", "--dtype", "bfloat16"],
    ["--model", "gated", "--n-levels", "10", "--dtype", "float32"],
]
DRY_CHECKS = [["--model", "gated", "--n-levels", "3", "--dtype", "bfloat16"]]


def check(args, device: torch.device) -> dict:
    """``python -m makemore.check ... --device DEVICE``; TF32 as the library's default (makemore.check says which)."""
    runs = []
    for flags in DRY_CHECKS if args.dry_run else CHECKS:
        left = args.budget - sum(r["seconds"] for r in runs)
        if left < 5:
            runs.append({"flags": " ".join(flags), "exit_code": None, "skipped": "out of time budget", "seconds": 0})
            continue
        code, output, seconds = run([sys.executable, "-m", "makemore.check", *flags, "--device", device.type], left)
        tail = output.strip().splitlines()[-30:]
        runs.append({"flags": " ".join(flags), "exit_code": code, "seconds": seconds, "output": tail})
    return {"runs": runs}


def cross_entropy(args, device: torch.device) -> dict:
    """bench/bench_cross_entropy.py's sweep: kernel and host times of every path, and the kernel-time
    crossover (``cuda_aten_below``) from which kernels/loss.py's CUDA_ATEN_BELOW is set, within the step's budget."""
    from bench import bench_cross_entropy, timing

    timing.set_math_mode(device)
    records = bench_cross_entropy.sweep(device, max(0.0, args.budget - 10), args.dry_run)  # the last cell may overrun
    copy = next((b["extra_info"]["copy_gbps"] for b in records if "copy_gbps" in b["extra_info"]), None)
    return {"peaks": {"copy_gbps": copy}, "benchmarks": records}


def suite(name: str, args, device: torch.device) -> dict:
    """One of bench/suites.py's suites (the orders, generation), with this process's math mode and yardsticks."""
    from bench import timing
    from bench.suites import SUITES

    started = time.perf_counter()
    math_mode = timing.set_math_mode(device)
    peaks = timing.peaks(device, quick=args.dry_run, budget_s=3.0)
    left = args.budget - (time.perf_counter() - started) - 10  # the last cell may overrun its share
    records = SUITES[name][0](device, max(0.0, left), quick=args.dry_run)
    return {"math_mode": math_mode, "peaks": peaks, "benchmarks": records}


RACE_RECIPES = ("transformer-gpu", "shakespeare-gpu-a", "shakespeare-gpu-b", "shakespeare-gpu-c")
RACE_SECONDS = 60.0  # of training for each recipe


def race(args, device: torch.device) -> dict:
    """The GPU race (bench/race.py): transformer-gpu, then the WaveNet candidates, RACE_SECONDS of training each,
    back to back in one process, as many as the step's budget holds with their start-up, compilation and
    evaluation; its table, plot and JSON go to OUT/race/. Dry run: the race's --quick on the CPU."""
    out = args.out / "race"
    flags = ["--recipes", ",".join(RACE_RECIPES), "--device", device.type]
    flags += ["--out", str(out), "--runs", str(args.work / "race")]
    flags += ["--quick"] if args.dry_run else ["--budget", str(RACE_SECONDS)]
    flags += ["--time-limit", str(max(1.0, args.budget - 15))]  # the race's own start-up and its outputs come on top
    code, output, wall = run([sys.executable, "-m", "bench.race", *flags], args.budget)
    found = sorted(out.glob("race-*.json"))
    record = json.loads(found[0].read_text()) if found else {}
    keep = ("recipe", "params", "steps", "train_seconds", "tokens_per_s", "flops_per_step", "mfu", "dtype")
    keep += ("wall_seconds", "train", "own_val", "val", "best_val", "best_step", "best_seconds")
    return {
        "command": "python -m bench.race " + " ".join(flags),
        "exit_code": code,
        "wall_s": wall,
        "peaks": record.get("peaks"),
        "rows": [{k: r.get(k) for k in keep} for r in record.get("rows", [])],
        "skipped": record.get("skipped", []),
        "tail": output.strip().splitlines()[-5:],
    }


def lecture(args, device: torch.device) -> dict:
    """The lecture's WaveNet (block 8, batch 32, SGD) for 5 s of training: steps/s, eager and compiled."""
    seconds = 1.0 if args.dry_run else 5.0
    results = {}
    for name, flags in {"eager": ["--no-compile"], "compiled": ["--compile"]}.items():
        left = args.budget - sum(r.get("wall_s", 0) for r in results.values())
        if left < seconds + 5:
            results[name] = {"skipped": "out of time budget"}
            continue
        if args.dry_run and name == "compiled":
            results[name] = {"skipped": "dry run: torch.compile is left to the GPU"}
            continue
        run_dir = args.work / f"lecture-{name}"
        common = ["--recipe", "lecture", "--max-seconds", str(seconds), "--samples", "0", "--quiet", "--force"]
        common += ["--device", device.type, "--eval-max-tokens", "2000" if args.dry_run else "20000"]
        command = [sys.executable, "-m", "makemore", "train", *common, *flags, "--out", str(run_dir)]
        code, output, wall = run(command, left)
        m = metrics(run_dir)
        if m.get("steps") and m.get("train_s"):
            m["steps_per_s"] = round(m["steps"] / m["train_s"], 1)
        tail = output.strip().splitlines()[-5:]
        command = "makemore train " + " ".join(common + flags)
        results[name] = {"command": command, "exit_code": code, "wall_s": wall, **m, "tail": tail}
    return results


def metrics(run_dir: Path) -> dict:
    """A run's final losses, steps, training seconds, median logged tokens/s and estimates' curve (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = next((r for r in reversed(records) if "final" in r), None)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    last = records[-1] if records else {}
    curve = [
        {"step": r["step"], "time": round(r["time"], 1), **{k: round(v, 4) for k, v in r["estimate"].items()}}
        for r in records
        if "estimate" in r
    ]
    return {
        "final": final["final"] if final else None,
        "steps": last.get("step"),
        "train_s": round(last.get("time", 0.0), 1),
        "tokens_per_s": round(statistics.median(rates)) if rates else None,
        "curve": curve,
    }


# name: (the step, its cap in seconds on a GPU, its cap in the dry run). The GPU caps sum to more than TOTAL_S:
# a step that ends early leaves its time to the rest.
STEPS = {
    "env": (env, 20, 60),
    "tests": (tests, 90, 120),
    "check": (check, 50, 90),
    "cross-entropy": (cross_entropy, 180, 60),
    "orders": (partial(suite, "orders"), 65, 60),
    "generation": (partial(suite, "generation"), 30, 60),
    "lecture": (lecture, 60, 60),
    "race": (race, 480, 150),
}


# The command.


def run_steps(names: list[str], out: Path, dry_run: bool) -> int:
    """Each step in a child process under its cap, its output into OUT/log.txt; then the summary, printed."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "summary.md", "log.txt"):
        (out / name).unlink(missing_ok=True)
    started = time.monotonic()
    total = DRY_TOTAL_S if dry_run else TOTAL_S
    update(out, "date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    update(out, "dry_run", dry_run)
    status, failed = [], []
    with open(out / "log.txt", "a") as log, tempfile.TemporaryDirectory(prefix="gpu-work-") as work:
        for name in names:
            elapsed = round(time.monotonic() - started)
            cap = min(STEPS[name][2 if dry_run else 1], total - RESERVE_S - elapsed)
            if cap < 5:
                status.append({"step": name, "exit": "skipped", "seconds": 0, "cap": "out of time"})
                continue
            say(f"== {name} (cap {cap} s, {elapsed} s so far)", log)
            command = [sys.executable, "-m", "bench.gpu", str(out), "--step", name, "--work", work]
            command += ["--budget", str(cap - STARTUP_S)] + (["--dry-run"] if dry_run else [])
            code, _, seconds = run(command, cap, log)
            status.append({"step": name, "exit": code, "seconds": round(seconds), "cap": cap})
            update(out, "steps", status)
            if code:
                failed.append(name)
            say(f"   {name}: exit {code} in {seconds:.0f} s", log)
    update(out, "steps", status)
    text = summary(json.loads((out / "results.json").read_text()))
    (out / "summary.md").write_text(text)
    print(text)
    files = " ".join(sorted(p.name for p in out.iterdir()))
    print(f"total: {time.monotonic() - started:.0f} s; files in {out}: {files}")
    if failed:
        names = " ".join(failed)
        print(f"bench/gpu.sh: steps that failed or ran out of time: {names} (output: {log.name})", file=sys.stderr)
    return 1 if failed else 0


def say(line: str, log) -> None:
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def installed() -> bool:
    """Whether makemore.kernels imports: it is the tree's kernels/ folder (pyproject's package-dir), found
    once the project is installed. Where it is not, installs the project offline: no build isolation (the
    image's setuptools), no dependencies."""
    try:
        if importlib.util.find_spec("makemore.kernels") is not None:
            return True
    except ModuleNotFoundError:
        pass
    print("== installing the project (pip install --no-deps --no-build-isolation -e .)", flush=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", "."]
    return run(command, 120)[0] == 0


def step(args) -> int:
    """One step in this process: its section into OUT/results.json; exit 1 where a command it ran failed."""
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    started = time.perf_counter()
    section = STEPS[args.step][0](args, device)
    update(args.out, args.step, section)
    print(f"{args.step}: {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if failed(section) else 0


def failed(section) -> bool:
    """Whether a command the step ran exited non-zero (a failing test, check or training run)."""
    if isinstance(section, dict):
        return section.get("exit_code") not in (0, None) or any(failed(v) for v in section.values())
    if isinstance(section, list):
        return any(failed(v) for v in section)
    return False


# The summary.


def summary(data: dict) -> str:
    """The run as Markdown: the device, the sweeps' tables, then the outcome of every step (last, so
    that the end of the printed output has it)."""
    e = data.get("env", {})
    dry = "DRY RUN (CPU, tiny sizes: the figures mean nothing). " if data.get("dry_run") else ""
    head = f"{dry}Date {data.get('date', '?')}."
    lines = ["# bench/gpu.sh", "", head]
    if e:
        lines.append(
            f"Device: {e.get('name', e.get('device'))} (sm {e.get('capability', '-')}, {e.get('sms', '-')} SMs, "
            f"{e.get('memory_gib', '-')} GiB, L2 {e.get('l2_mib', '-')} MiB); torch {e.get('torch')}, "
            f"CUDA {e.get('cuda')}, triton {e.get('triton')}, Python {e.get('python')}. {e.get('math_mode', '')}."
        )
        if e.get("nvidia_smi"):
            lines += ["", "```", e["nvidia_smi"], "```"]
    for key, title in (("cross-entropy", "Cross-entropy"), ("orders", "WaveNet orders"), ("generation", "Generation")):
        if key in data:
            peaks = data[key].get("peaks")
            lines += ["", f"## {title}"] + ([f"Yardsticks in this step: {peaks}"] if peaks else [])
            lines += table(data[key].get("benchmarks", []))
    lines += ["", "## Outcome", "", head]
    p = e.get("peaks", {})
    if p:
        lines.append(
            f"Yardsticks: float32 matmul {p.get('float32_gflops')} GFLOP/s, "
            f"bfloat16 {p.get('bfloat16_gflops')} GFLOP/s (n = {p.get('matmul_n')}), "
            f"copy {p.get('copy_gbps')} GB/s ({p.get('copy_mib')} MiB)."
        )
    lines += ["", "| step | exit | seconds (cap) |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} ({s['cap']}) |" for s in data.get("steps", [])]
    t = data.get("tests")
    if t:
        lines += ["", f"CUDA tests: exit {t['exit_code']}, {t['cuda_cases']}; {t['last_line']}"]
        lines += [f"- {f}" for f in t["failures"][:15]]
    c = data.get("check")
    if c:
        lines += ["", "makemore.check (every order against float64):"]
        for r in c["runs"]:
            if r.get("exit_code") is None:
                lines.append(f"- `{r['flags']}`: {r.get('skipped', '')}")
            else:
                last = (r.get("output") or ["no output"])[-1]
                lines.append(f"- `{r['flags']}`: exit {r['exit_code']}, {r['seconds']} s: {last}")
    if data.get("race") or data.get("lecture"):
        lines.append("")
    lines += race_lines(data.get("race"))
    lines += lecture_lines(data.get("lecture", {}))
    return "\n".join(lines) + "\n"


def race_lines(race: dict | None) -> list[str]:
    """The race's outcome: per run the best checkpoint's and the last weights' whole-split val, speed and MFU."""
    if not race:
        return []
    lines = [f"- race: exit {race['exit_code']}, wall {race['wall_s']} s. `{race['command']}`"]
    p = race.get("peaks") or {}
    if p:
        lines.append(f"  bfloat16 matmul peak in the race: {p.get('bfloat16_gflops')} GFLOP/s (n {p.get('matmul_n')})")
    for r in race["rows"]:
        best = ""
        if r.get("best_val") is not None:
            best = f"{r['best_val']:.4f} best (step {r['best_step']}, {r['best_seconds']:.0f} s), "
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "?"
        rate = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "?"
        lines.append(
            f"  - {r['recipe']}: val {best}{r['val']:.4f} last (train {r['train']:.4f}); {r['steps']} steps in "
            f"{r['train_seconds']:.1f} s, {rate} tokens/s, {r['flops_per_step'] / 1e9:.3g} GFLOP a step, MFU {mfu}; "
            f"wall {r['wall_seconds']:.0f} s"
        )
    lines += [f"  - {s['recipe']}: not run ({s['reason']})" for s in race["skipped"]]
    return lines


def lecture_lines(lecture: dict) -> list[str]:
    """The lecture's WaveNet runs: val, steps, tokens/s and steps/s, and the best val estimate on the way."""
    lines = []
    for name, r in lecture.items():
        if "skipped" in r:
            lines.append(f"- lecture WaveNet, block 8, {name}: not run ({r['skipped']})")
            continue
        final = {k: f"{v:.4f}" for k, v in (r.get("final") or {}).items() if isinstance(v, float)}
        lines.append(
            f"- lecture WaveNet, block 8, {name}: exit {r['exit_code']}, val {final.get('val', '?')} "
            f"(train {final.get('train', '?')}), {r.get('steps')} steps in {r.get('train_s')} s of training, "
            f"median {r.get('tokens_per_s')} tokens/s"
            + (f", {r['steps_per_s']} steps/s" if "steps_per_s" in r else "")
            + f"; wall {r['wall_s']} s. `{r['command']}`"
        )
        best = min((p for p in r.get("curve") or [] if "val" in p), key=lambda p: p["val"], default=None)
        if best:
            train = best.get("train", float("nan"))
            at = f"at step {best['step']} ({best['time']} s; train {train:.4f})"
            lines.append(f"  best val estimate {best['val']:.4f} {at}")
    return lines


def table(benchmarks: list[dict]) -> list[str]:
    """The measured entries as bench/report.py's tables; then a count of the entries not measured, and
    the values the suite reports beside its entries (the crossover)."""
    from bench import report

    lines = report.tables(report.by_group(benchmarks), level=3)
    missing = [b for b in benchmarks if not b.get("stats")]
    if missing:
        reasons = "; ".join(sorted({b.get("extra_info", {}).get("skipped", "?") for b in missing}))
        names = ", ".join(f"{b['group']} / {b['name']}" for b in missing[:12]) + (" …" if len(missing) > 12 else "")
        lines += ["", f"Not measured: {len(missing)} entries ({reasons}): {names}"]
    for key in ("crossover", "cuda_aten_below", "eager_crossover"):
        found = [b["extra_info"][key] for b in benchmarks if key in b.get("extra_info", {})]
        if found:
            lines.append(f"{key}: {found[0]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", nargs="?", type=Path, default=Path("gpu-results"), help="default: gpu-results")
    parser.add_argument("--steps", default=",".join(STEPS), help="these steps only, in this order (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes (the figures mean nothing)")
    parser.add_argument("--step", choices=STEPS, help="run this one step in this process")
    parser.add_argument("--work", type=Path, help="with --step: a folder for its training runs")
    parser.add_argument("--budget", type=float, default=60.0, help="with --step: the seconds it may take")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    names = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        parser.error(f"--steps: no step {', '.join(unknown)} (steps: {', '.join(STEPS)})")
    if args.step and args.work is None:
        parser.error("--step needs --work DIR")
    if not args.dry_run:
        try:
            check_device(torch.device("cuda"))
        except ValueError:
            parser.error("no CUDA device here (or this torch was built without CUDA); on a CPU, use --dry-run")
    if args.step:
        return step(args)
    if not installed():
        parser.error("could not install the project (pip install --no-deps --no-build-isolation -e .); install it")
    return run_steps(names, args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
