"""The steps of bench/gpu.sh, one per call, each adding its section to OUT/results.json as soon as it has it.

    python -m bench.gpu STEP --out OUT --work WORK --budget SECONDS [--dry-run]
    python -m bench.gpu summary --out OUT --work WORK      # OUT/summary.md from results.json and the step log

Steps: env (device, versions, yardsticks), tests (the CUDA test suite), check (makemore.check's
equivalence against float64), cross-entropy (the KERNEL suite's sweep and the crossover that sets
CUDA_ATEN_BELOW), orders (per-position loop, batched windows and convolutions at block 8 to 4096,
forward and forward + backward, float32 and bfloat16), generation (cached against re-run, with and
without CUDA graphs), lecture (the lecture's WaveNet at block 8, steps/s), race (bench/race.py:
transformer-gpu and the shakespeare-gpu candidates, 60 s of training each, with MFU).
``--dry-run``: the same code on the CPU at tiny sizes (CI runs it, so the command cannot rot);
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

STEPS = ("env", "tests", "check", "cross-entropy", "orders", "generation", "lecture", "race")


def device_of(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); use --dry-run on a CPU")
    return torch.device("cuda")


def update(out: Path, key: str, value) -> None:
    """results.json[key] = value, written atomically (a step killed mid-write leaves the last whole file)."""
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run(command: list[str], timeout: float, **kwargs) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds) of ``command``; 124 where it ran past ``timeout``."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs)
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        code, output = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    print(output, flush=True)  # into gpu.sh's log
    return code, output, round(time.perf_counter() - start, 1)


# Steps.


def env(args, device: torch.device) -> dict:
    from bench import timing

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1), l2_mib=p.L2_cache_size / 2**20)
        code, smi, _ = run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu", "--format=csv"], 20)
        info["nvidia_smi"] = smi.strip() if code == 0 else f"nvidia-smi exited {code}"
    info["math_mode"] = timing.set_math_mode(device)
    info["peaks"] = timing.peaks(device, quick=args.dry_run, budget_s=min(10.0, args.budget / 2))
    return info


def tests(args, device: torch.device) -> dict:
    """``pytest --device cuda``: every device-parametrised test on the GPU (skipped on a CPU: the dry run)."""
    code, output, seconds = run([sys.executable, "-m", "pytest", "--device", "cuda", "-q", "-p", "no:cacheprovider"], args.budget)
    lines = output.strip().splitlines()
    cuda = next((line for line in reversed(lines) if line.startswith("cuda cases:")), "no cuda cases line")
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"exit_code": code, "seconds": seconds, "cuda_cases": cuda, "last_line": lines[-1] if lines else "", "failures": failures[:40]}


CHECKS = [  # makemore.check runs: every order of each model against float64 (the CUDA tests cover smaller sizes)
    ["--model", "wavenet", "--block-size", "1024", "--dtype", "float32"],
    ["--model", "gated", "--n-levels", "8", "--stacks", "2", "--dtype", "bfloat16"],
    ["--model", "wavenet", "--block-size", "256", "--fused", "--dtype", "bfloat16"],
    ["--model", "gated", "--n-levels", "10", "--dtype", "float32"],
]
DRY_CHECKS = [["--model", "gated", "--n-levels", "3", "--dtype", "bfloat16"]]


def check(args, device: torch.device) -> dict:
    """``python -m makemore.check ... --device DEVICE``; the TF32 mode is the library default (makemore.check says which)."""
    runs = []
    for flags in DRY_CHECKS if args.dry_run else CHECKS:
        left = args.budget - sum(r["seconds"] for r in runs)
        if left < 5:
            runs.append({"flags": " ".join(flags), "exit_code": None, "skipped": "out of time budget", "seconds": 0})
            continue
        code, output, seconds = run([sys.executable, "-m", "makemore.check", *flags, "--device", device.type], left)
        runs.append({"flags": " ".join(flags), "exit_code": code, "seconds": seconds, "output": output.strip().splitlines()[-30:]})
    return {"runs": runs}


def cross_entropy(args, device: torch.device) -> dict:
    """bench/bench_cross_entropy.py's sweep: kernel and host times of every path, and the kernel-time
    crossover (``cuda_aten_below``) from which kernels/loss.py's CUDA_ATEN_BELOW is set. At most 170 s
    of sweep, so that the step with its start-up fits 3 minutes."""
    from bench import bench_cross_entropy, timing

    timing.set_math_mode(device)
    records = bench_cross_entropy.sweep(device, max(0.0, min(args.budget, 170.0) - 10), args.dry_run)
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


def orders(args, device: torch.device) -> dict:
    return suite("orders", args, device)


def generation(args, device: torch.device) -> dict:
    return suite("generation", args, device)


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
        if left < seconds + 5 or (args.dry_run and name == "compiled"):
            results[name] = {"skipped": "out of time budget" if left < seconds + 5 else "dry run: torch.compile is left to the GPU"}
            continue
        run_dir = args.work / f"lecture-{name}"
        common = ["--recipe", "lecture", "--max-seconds", str(seconds), "--samples", "0", "--quiet", "--force", "--device", device.type]
        common += ["--eval-max-tokens", "2000" if args.dry_run else "20000"]
        code, output, wall = run([sys.executable, "-m", "makemore", "train", *common, *flags, "--out", str(run_dir)], left)
        m = metrics(run_dir)
        if m.get("steps") and m.get("train_s"):
            m["steps_per_s"] = round(m["steps"] / m["train_s"], 1)
        results[name] = {"command": "makemore train " + " ".join(common + flags), "exit_code": code, "wall_s": wall, **m, "tail": output.strip().splitlines()[-5:]}
    return results


def metrics(run_dir: Path) -> dict:
    """The final losses, steps, training seconds, median logged tokens/s and the estimates' curve of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = next((r for r in reversed(records) if "final" in r), None)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    last = records[-1] if records else {}
    return {
        "final": final["final"] if final else None,
        "steps": last.get("step"),
        "train_s": round(last.get("time", 0.0), 1),
        "tokens_per_s": round(statistics.median(rates)) if rates else None,
        "curve": [{"step": r["step"], "time": round(r["time"], 1), **{k: round(v, 4) for k, v in r["estimate"].items()}} for r in records if "estimate" in r],
    }


# The summary.


def summary(out: Path, work: Path) -> str:
    """The run as Markdown: the device, the sweeps' tables, then the outcome of every step (last, so
    that the end of the printed output, all a lease's reply may hold, has it)."""
    data = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    status = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()] if (work / "steps.tsv").exists() else []
    e = data.get("env", {})
    head = f"{'DRY RUN (CPU, tiny sizes: the figures mean nothing). ' if data.get('dry_run') else ''}Date {data.get('date', '?')}."
    lines = ["# bench/gpu.sh", "", head]
    if e:
        lines.append(
            f"Device: {e.get('name', e.get('device'))} (sm {e.get('capability', '-')}, {e.get('sms', '-')} SMs, {e.get('memory_gib', '-')} GiB, "
            f"L2 {e.get('l2_mib', '-')} MiB); torch {e.get('torch')}, CUDA {e.get('cuda')}, triton {e.get('triton')}, Python {e.get('python')}. "
            f"{e.get('math_mode', '')}."
        )
        if e.get("nvidia_smi"):
            lines += ["", "```", e["nvidia_smi"], "```"]
    for key, title in (("cross-entropy", "Cross-entropy"), ("orders", "WaveNet orders"), ("generation", "Generation")):
        if key in data:
            peaks = data[key].get("peaks")
            lines += ["", f"## {title}"] + ([f"Yardsticks in this step: {peaks}"] if peaks else []) + table(data[key].get("benchmarks", []))
    lines += ["", "## Outcome", "", head]
    p = e.get("peaks", {})
    if p:
        lines.append(
            f"Yardsticks: float32 matmul {p.get('float32_gflops')} GFLOP/s, bfloat16 {p.get('bfloat16_gflops')} GFLOP/s (n = {p.get('matmul_n')}), "
            f"copy {p.get('copy_gbps')} GB/s ({p.get('copy_mib')} MiB)."
        )
    lines += ["", "| step | exit | seconds (cap) |", "|---|---|---|"] + [f"| {s[0]} | {s[1]} | {s[2]} ({s[3]}) |" for s in status if len(s) >= 4]
    t = data.get("tests")
    if t:
        lines += ["", f"CUDA tests: exit {t['exit_code']}, {t['cuda_cases']}; {t['last_line']}"] + [f"- {f}" for f in t["failures"][:15]]
    c = data.get("check")
    if c:
        lines += ["", "makemore.check (every order against float64):"]
        lines += [
            f"- `{r['flags']}`: " + (f"exit {r['exit_code']}, {r['seconds']} s: {(r.get('output') or ['no output'])[-1]}" if r.get("exit_code") is not None else r.get("skipped", ""))
            for r in c["runs"]
        ]
    if data.get("race") or data.get("lecture"):
        lines.append("")
    lines += race_lines(data.get("race"))
    for key, title in (("lecture", "lecture WaveNet, block 8"),):
        for name, r in data.get(key, {}).items():
            if "skipped" in r:
                lines.append(f"- {title}, {name}: not run ({r['skipped']})")
                continue
            final = {k: f"{v:.4f}" for k, v in (r.get("final") or {}).items() if isinstance(v, float)}
            lines.append(
                f"- {title}, {name}: exit {r['exit_code']}, val {final.get('val', '?')} (train {final.get('train', '?')}), "
                f"{r.get('steps')} steps in {r.get('train_s')} s of training, median {r.get('tokens_per_s')} tokens/s"
                + (f", {r['steps_per_s']} steps/s" if "steps_per_s" in r else "")
                + f"; wall {r['wall_s']} s. `{r['command']}`"
            )
            best = min((p for p in r.get("curve") or [] if "val" in p), key=lambda p: p["val"], default=None)
            if best:
                lines.append(f"  best val estimate {best['val']:.4f} at step {best['step']} ({best['time']} s; train {best.get('train', float('nan')):.4f})")
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
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=(*STEPS, "summary"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds this step may take")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.step == "summary":
        text = summary(args.out, args.work)
        (args.out / "summary.md").write_text(text)
        print(text)
        return 0
    device = device_of(args.dry_run)
    started = time.perf_counter()
    if not (args.out / "results.json").exists():  # the run's first step
        update(args.out, "date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        update(args.out, "dry_run", args.dry_run)
    section = globals()[args.step.replace("-", "_")](args, device)
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


if __name__ == "__main__":
    sys.exit(main())
