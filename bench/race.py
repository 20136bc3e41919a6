"""The race: recipes trained back to back for the same wall-clock budget on one device, judged on the same val targets.

    python -m bench.race --data tinyshakespeare --budget 60     # also 180, 900: the WaveNet and the Transformer
    python -m bench.race --device cuda --budget 60 --recipes transformer-gpu,shakespeare-gpu-a,shakespeare-gpu-b
    python -m bench.race --quick --out /tmp/race                # tiny models, 1 s each: a smoke run (CI)

Without ``--recipes`` it races the WaveNet recipe and the Transformer recipe whose budget is nearest
``--budget`` (shakespeare-60s / transformer-60s, -3m, -15m). Each recipe is stopped at ``--budget``
seconds of training clock (steps only), in this process, one after the other on the same machine,
then judged with one protocol: the whole val split, every target with its full context, and the
same targets for all (on a text, the val split's tokens after the first R_max, R_max the largest
receptive field; on line data every item, left-padded). A run that estimated its val loss during
training (``--eval-interval``) also kept the checkpoint of its best estimate; the race evaluates
both that checkpoint and the last weights, as nanoGPT reports the best checkpoint's val.

Each run also records the matmul FLOPs of one training step (``FlopCounterMode`` over the forward
and backward at the run's batch shape: every matmul and attention product the step executes,
the attention blocks' masked scores included) and its MFU: FLOPs per step x steps / training
seconds, as a share of the matmul peak of the run's dtype measured at the start of this process.

Writes into ``--out`` (default docs/race/) race-{budget}s.md (the table), .json (the table, the
peaks, the machine, the command) and .png (val loss against training time: each run's periodic
estimates on random val batches as a line, the whole-split val of the last weights as a star and
of the best checkpoint as a circle), after every run, so a race cut short keeps the runs it
finished; and prints the table. The runs themselves go to ``--runs`` (default runs/race-{budget}s/).
"""

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import timing
from makemore.cli import load_model
from makemore.data import Vocab, load_source
from makemore.device import describe, resolve_device, resolve_dtype
from makemore.models import build_model
from makemore.train import BEST, CHECKPOINT, METRICS, RECIPES, evaluate, make_configs, train
from makemore.train.config import TrainConfig, check_new_run

# The recipes of each budget (seconds): the WaveNet's and the Transformer's, tuned for the same clock.
RACES = {
    60: ("shakespeare-60s", "transformer-60s"),
    180: ("shakespeare-3m", "transformer-3m"),
    900: ("shakespeare-15m", "transformer-15m"),
}
# --quick: the same code path on models small enough to train for a second or two and evaluate in
# seconds (CI runs it so that the command cannot rot); its figures mean nothing. Eager: torch.compile
# takes minutes on a CPU (tests/test_compile_train.py covers compiled training).
QUICK = {
    "gated": dict(n_embd=8, n_hidden=8, n_skip=16, n_levels=4, seq_len=64),
    "transformer": dict(n_embd=16, n_layer=2, n_head=2, block_size=16, seq_len=64),
}
QUICK_RUN = dict(eval_interval=5, eval_iters=2, log_interval=5, batch_size=4, compile=False)
QUICK_EVAL_TOKENS = 4096


def nearest_race(budget: float) -> tuple[str, ...]:
    """The recipes of the budget nearest ``budget`` on a log scale (60 s for 90 s, 180 s for 300 s, ...)."""
    return RACES[min(RACES, key=lambda b: abs(math.log(budget / b)))]


def train_recipe(recipe: str, overrides: dict, out: Path) -> Path:
    """Train ``recipe`` with ``overrides`` into ``out`` (a fresh run, no progress bar); returns ``out``."""
    config, model_config = make_configs({**RECIPES[recipe], **overrides})
    check_new_run(config, model_config)
    for name in (CHECKPOINT, BEST):  # a fresh run every time: the race never resumes an old one
        (out / name).unlink(missing_ok=True)
    torch.compiler.reset()  # compiled as in a fresh process: no run inherits another's graphs or recompile count
    train(config, model_config, out, progress=False)
    return out


def receptive_field(settings: dict) -> int:
    """R of the model that ``settings`` (a recipe with overrides) would train."""
    config, model_config = make_configs(settings)
    return build_model(config.model, model_config).receptive_field


def same_targets_val(model, state: dict, r_max: int, max_tokens: int = sys.maxsize) -> dict:
    """A trained model (``load_model``'s pair) on the val split, every target with its full context.

    A text's eval batches predict every token after the first R of the split; a model with a smaller R
    reads its split from r_max - R on, so every model with R <= r_max predicts the tokens after position r_max.
    """
    config = state["config"]
    source = load_source(config["data"], state["kind"], seed=config["seed"], vocab=Vocab(state["vocab"]))
    if source.kind == "stream":
        source = copy.copy(source)
        source.ids = {**source.ids, "val": source.ids["val"][r_max - model.receptive_field :]}
        targets = min(len(source.ids["val"]) - model.receptive_field, max_tokens)
    else:
        targets = min(source.n_targets("val"), max_tokens)
    device = resolve_device(config["device"])  # where it trained
    val = evaluate(model.to(device), source, splits=("val",), max_tokens=max_tokens, device=device)["val"]
    return {"val": val, "val_targets": targets, "receptive_field": model.receptive_field}


def judge(run: Path, r_max: int, max_tokens: int = sys.maxsize) -> dict:
    """The last weights' whole-split val and, where the run kept one, its best checkpoint's with that checkpoint's
    step and training time (None without one)."""
    result = same_targets_val(*load_model(run), r_max, max_tokens)
    result.update(best_val=None, best_step=None, best_seconds=None)
    if (run / BEST).is_file():
        model, state = load_model(run, "best")
        best = same_targets_val(model, state, r_max, max_tokens)["val"]
        result.update(best_val=best, best_step=state["best"]["step"], best_seconds=state["best"]["time"])
    return result


def run_summary(run: Path) -> dict:
    """From a run's metrics and checkpoint: parameters, steps, training time, median tokens/s, its own final losses."""
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if line.strip()]
    model, state = load_model(run)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    final = next(r for r in reversed(records) if "final" in r)
    run_info = next((r["run"] for r in records if "run" in r), {})
    return {
        "run": str(run),
        "model": state["config"]["model"],
        "params": sum(p.numel() for p in model.parameters()),
        "steps": state["step"],
        "train_seconds": state["elapsed"],
        "tokens_per_s": statistics.median(rates) if rates else None,
        "train": final["final"].get("train"),
        "own_val": final["final"].get("val"),
        "estimates": [(r["time"], r["estimate"]["val"]) for r in records if "estimate" in r and r["time"] > 0],
        "device": run_info.get("device"),  # where and in what dtype it trained (metrics.jsonl's first record)
        "dtype": run_info.get("dtype"),
    }


def step_flops(run: Path) -> int:
    """Matmul FLOPs of one training step of ``run`` (forward and backward of every micro-batch), counted by
    FlopCounterMode on the eager model at the run's batch shape, device and dtype."""
    model, state = load_model(run)
    config = TrainConfig(**state["config"])
    device = resolve_device(config.device)
    source = load_source(config.data, state["kind"], seed=config.seed, vocab=Vocab(state["vocab"]))
    R = model.receptive_field
    batch = source.batch("train", config.batch_size, config.layout, R, torch.Generator(), config.seq_len).to(device)
    model.to(device).train()
    bf16 = resolve_dtype(config.dtype, device) == torch.bfloat16
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter:
        with autocast:
            _, loss = model(batch.idx, batch.targets)
        loss.backward()
    return counter.get_total_flops() * config.grad_accum


def mfu(row: dict, peaks: dict) -> float | None:
    """The run's matmul FLOP/s over the peak of its dtype measured in this process."""
    peak = peaks.get(f"{row['dtype']}_gflops")
    if not (peak and row["train_seconds"] and row["steps"]):
        return None
    return row["flops_per_step"] * row["steps"] / row["train_seconds"] / (peak * 1e9)


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, GPU, torch, threads, the load average at the start."""
    cpu = describe(torch.device("cpu"))
    gpu = describe(torch.device("cuda")) if torch.cuda.is_available() else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads = torch.get_num_threads()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "threads": threads,
        "load_average": load,
    }


def loss(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def best_cell(r: dict) -> str:
    """The best checkpoint's val with its step and time, or a dash for a run that kept none."""
    if r.get("best_val") is None:
        return "—"
    return f"{r['best_val']:.4f} at step {r['best_step']:,} ({r['best_seconds']:.0f} s)"


def markdown_table(rows: list[dict], budget: float, note: str) -> str:
    lines = [
        f"Race at a {budget:g} s training budget. {note}",
        "",
        "| model | recipe | params | steps | training time | tokens/s (median) | GFLOP a step | MFU | train "
        "| val: last weights | val: best checkpoint | val targets | R |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        flops = f"{r['flops_per_step'] / 1e9:.3g}" if r.get("flops_per_step") else "—"
        share = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—"
        lines.append(
            f"| {r['model']} | `{r['recipe']}` | {r['params']:,} | {r['steps']:,} | {r['train_seconds']:.1f} s "
            f"| {rate} | {flops} | {share} | {loss(r['train'])} | {loss(r['val'])} | {best_cell(r)} "
            f"| {r['val_targets']:,} | {r['receptive_field']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        label = f"{r['model']} ({r['recipe']})"
        times, vals = [t for t, _ in r["estimates"]], [v for _, v in r["estimates"]]
        (line,) = ax.plot(times, vals, "-", lw=1.2, label=f"{label}: val estimates")
        last = f"last weights: whole val {r['val']:.4f} at {r['train_seconds']:.0f} s"
        ax.plot(r["train_seconds"], r["val"], "*", ms=12, color=line.get_color(), label=last)
        if r.get("best_val") is not None:
            best = f"best checkpoint: whole val {r['best_val']:.4f} at {r['best_seconds']:.0f} s"
            ax.plot(r["best_seconds"], r["best_val"], "o", ms=8, mfc="none", color=line.get_color(), label=best)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("val loss (nats per character)")
    # The first estimates (ln 65 = 4.2) would flatten the rest.
    ax.set_ylim(top=min(ax.get_ylim()[1], max(2.6, max(r["val"] for r in rows) + 0.3)))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, name: str, record: dict, note: str, title: str) -> str:
    """The race so far as ``name``.md, .json and .png in ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    skipped = "".join(f"\n`{s['recipe']}` not run: {s['reason']}.\n" for s in record["skipped"])
    table = markdown_table(record["rows"], record["budget"], note) + skipped
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    if record["rows"]:
        plot(record["rows"], out / f"{name}.png", title)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.race", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="tinyshakespeare", help="the data set all train on (default: tinyshakespeare)"
    )
    parser.add_argument("--budget", type=float, help="seconds of training for each recipe (default 60; 1 with --quick)")
    parser.add_argument(
        "--recipes",
        help="the recipes to race, comma-separated (default: the WaveNet's and the Transformer's recipe of the "
        "budget nearest --budget)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/race"), help="where the table and the plot go (default docs/race)"
    )
    parser.add_argument("--runs", type=Path, help="where the runs go (default runs/race-{budget}s)")
    parser.add_argument("--device", default=None, help="the device all train on (default: the recipes')")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="wall-clock seconds for the whole race (default 0: none): a recipe starts only if its budget and the "
        "longest start-up, compilation and evaluation of a run so far still fit; the first always runs",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, eager: a smoke run whose figures mean nothing"
    )
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 1.0 if args.quick else 60.0
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    if not args.time_limit >= 0:
        parser.error(f"--time-limit must be >= 0 seconds, got {args.time_limit}")
    recipes = args.recipes.split(",") if args.recipes else nearest_race(args.budget)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"--recipes: no recipe {', '.join(unknown)}; recipes: {', '.join(RECIPES)}")
    if len(set(recipes)) != len(recipes):
        parser.error(f"--recipes names a recipe twice: {args.recipes}")
    start = time.perf_counter()
    settings = {}
    for recipe in recipes:
        overrides = {"data": args.data, "max_seconds": args.budget, **({"device": args.device} if args.device else {})}
        if args.quick:
            overrides.update(QUICK[RECIPES[recipe]["model"]], **QUICK_RUN, eval_max_tokens=QUICK_EVAL_TOKENS)
        settings[recipe] = overrides
    try:
        r_max = max(receptive_field({**RECIPES[r], **o}) for r, o in settings.items())
    except ValueError as e:
        parser.error(str(e))
    device = resolve_device(args.device or "auto")
    runs_dir = args.runs or Path("runs") / f"race-{args.budget:g}s"
    command = "python -m bench.race " + " ".join(argv if argv is not None else sys.argv[1:])
    started = machine()
    peaks = timing.peaks(device, quick=args.quick, budget_s=3.0)
    name = f"race-{args.budget:g}s"
    date = datetime.date.today().isoformat()
    where = started["gpu"] or f"{started['cpu']} ({started['cores']} cores)"
    load = started["load_average"]
    note = (
        f"`{command}`, {date}, {where}, torch {started['torch']}"
        + (f", load average {load[0]:.1f} at the start" if load else "")
        + f"; matmul peaks measured in the same process: bfloat16 {peaks['bfloat16_gflops']:,.0f} GFLOP/s, "
        f"float32 {peaks['float32_gflops']:,.0f} GFLOP/s (n = {peaks['matmul_n']}); "
        "MFU: a run's matmul FLOP/s over its dtype's peak"
        + (" (--quick: tiny models, figures mean nothing)" if args.quick else "")
        + "."
    )
    title = f"{args.data}: val loss against training time, {args.budget:g} s each"
    record = {"command": command, "date": date, "machine": started, "budget": args.budget, "peaks": peaks}
    record.update(rows=[], skipped=[])
    max_tokens = QUICK_EVAL_TOKENS if args.quick else sys.maxsize
    overhead = 0.0  # the longest wall time beyond the training budget of a run so far
    for recipe in recipes:
        left = args.time_limit - (time.perf_counter() - start)
        if args.time_limit and record["rows"] and left < args.budget + overhead:
            reason = f"{left:.0f} s of --time-limit left, a run took up to {args.budget + overhead:.0f} s"
            record["skipped"].append({"recipe": recipe, "reason": reason})
            print(f"race: {recipe} not run: {reason}", file=sys.stderr, flush=True)
            continue
        print(f"race: training {recipe} for {args.budget:g} s", file=sys.stderr, flush=True)
        began = time.perf_counter()
        run = train_recipe(recipe, settings[recipe], runs_dir / recipe)
        row = {"recipe": recipe, **run_summary(run), **judge(run, r_max, max_tokens), "flops_per_step": step_flops(run)}
        row["mfu"] = mfu(row, peaks)
        row["wall_seconds"] = time.perf_counter() - began
        overhead = max(overhead, row["wall_seconds"] - args.budget)
        record["rows"].append(row)
        write(args.out, name, record, note, title)  # a race cut short keeps the runs it finished
    print(write(args.out, name, record, note, title))
    print(f"wrote {args.out / name}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
