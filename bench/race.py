"""The race: the gated WaveNet and the Transformer, each trained for the same wall-clock budget, back to back.

    python -m bench.race --data tinyshakespeare --budget 60     # also 180, 900
    python -m bench.race --quick --out /tmp/race                # tiny models, 1 s each: a smoke run (CI)

Trains the WaveNet recipe and the Transformer recipe whose budget is nearest ``--budget``
(shakespeare-60s / transformer-60s, -3m, -15m), each stopped at ``--budget`` seconds of training
clock (steps only), in this process, one after the other on the same machine. Then evaluates both
with one protocol: the whole val split, every target with its full context, and the same targets
for both (on a text, the val split's tokens after the first R_max, R_max the larger receptive
field; on line data every item, left-padded). Writes into ``--out`` (default docs/race/)
race-{budget}s.md (the table), .json (the table, the machine, the command) and .png (val loss
against training time: each run's periodic estimates on random val batches as a line, the race's
whole-split val as a star), and prints the table. The runs themselves (checkpoints, metrics) go
to ``--runs`` (default runs/race-{budget}s/).
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from makemore.cli import load_model
from makemore.data import Vocab, load_source
from makemore.train import METRICS, RECIPES, evaluate, make_configs, train
from makemore.train.config import check_new_run, resolve_device

# The recipes of each budget (seconds): the WaveNet's and the Transformer's, tuned for the same clock.
RACES = {
    60: ("shakespeare-60s", "transformer-60s"),
    180: ("shakespeare-3m", "transformer-3m"),
    900: ("shakespeare-15m", "transformer-15m"),
}
# --quick: the same code path on models small enough to train for a second or two and evaluate in
# seconds (CI runs it so that the command cannot rot); its figures mean nothing.
QUICK = {
    "gated": dict(n_embd=8, n_hidden=8, n_skip=16, n_levels=4, seq_len=64, eval_interval=5, eval_iters=2, log_interval=5),
    "transformer": dict(n_embd=16, n_layer=2, n_head=2, block_size=16, seq_len=64, eval_interval=5, eval_iters=2, log_interval=5),
}
QUICK_EVAL_TOKENS = 4096


def nearest_race(budget: float) -> tuple[str, str]:
    """The recipes of the budget nearest ``budget`` on a log scale (60 s for 90 s, 180 s for 300 s, ...)."""
    return RACES[min(RACES, key=lambda b: abs(math.log(budget / b)))]


def train_recipe(recipe: str, overrides: dict, out: Path) -> Path:
    """Train ``recipe`` with ``overrides`` into ``out`` (a fresh run, no progress bar); returns ``out``."""
    config, model_config = make_configs({**RECIPES[recipe], **overrides})
    check_new_run(config, model_config)
    (out / "ckpt.pt").unlink(missing_ok=True)  # a fresh run every time: the race never resumes an old one
    train(config, model_config, out, progress=False)
    return out


def same_targets_val(runs: list[Path], max_tokens: int = sys.maxsize) -> list[dict]:
    """Each run's model on the val split, every target with its full context, the same targets for every model.

    A text's eval batches predict every token after the first R of the split; a model with a smaller R
    reads its split from R_max - R on, so every model predicts the tokens after position R_max.
    """
    models = [load_model(run) for run in runs]  # (model in eval mode, checkpoint state)
    R_max = max(model.receptive_field for model, _ in models)
    results = []
    for model, state in models:
        config = state["config"]
        source = load_source(config["data"], state["kind"], seed=config["seed"], vocab=Vocab(state["vocab"]))
        if source.kind == "stream":
            source = copy.copy(source)
            source.ids = {**source.ids, "val": source.ids["val"][R_max - model.receptive_field :]}
            targets = min(len(source.ids["val"]) - model.receptive_field, max_tokens)
        else:
            targets = min(source.n_targets("val"), max_tokens)
        device = resolve_device(config["device"])  # where it trained
        val = evaluate(model.to(device), source, splits=("val",), max_tokens=max_tokens, device=device)["val"]
        results.append({"val": val, "val_targets": targets, "receptive_field": model.receptive_field})
    return results


def run_summary(run: Path) -> dict:
    """From a run's metrics and checkpoint: parameters, steps, training time, median tokens/s, the run's own final losses."""
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


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, torch, threads, the load average when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": load}


def markdown_table(rows: list[dict], budget: float, note: str) -> str:
    lines = [
        f"Race at a {budget:g} s training budget. {note}",
        "",
        "| model | recipe | params | steps | training time | tokens/s (median) | train | val (race: same targets) | val targets | R |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        train_loss = f"{r['train']:.4f}" if r["train"] is not None else "-"
        lines.append(
            f"| {r['model']} | `{r['recipe']}` | {r['params']:,} | {r['steps']:,} | {r['train_seconds']:.1f} s | {rate} | {train_loss} "
            f"| **{r['val']:.4f}** | {r['val_targets']:,} | {r['receptive_field']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        label = f"{r['model']} ({r['recipe']})"
        (line,) = ax.plot([t for t, _ in r["estimates"]], [v for _, v in r["estimates"]], "-", lw=1.2, label=f"{label}: val estimates")
        ax.plot(r["train_seconds"], r["val"], "*", ms=12, color=line.get_color(), label=f"{label}: whole val {r['val']:.4f} at {r['train_seconds']:.0f} s")
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("val loss (nats per character)")
    ax.set_ylim(top=min(ax.get_ylim()[1], max(2.6, max(r["val"] for r in rows) + 0.3)))  # the first estimates (ln 65 = 4.2) would flatten the rest
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.race", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tinyshakespeare", help="the data set both train on (default: tinyshakespeare, the recipes')")
    parser.add_argument("--budget", type=float, help="seconds of training for each model (default 60; 1 with --quick); the recipes are the nearest budget's")
    parser.add_argument("--out", type=Path, default=Path("docs/race"), help="where the table and the plot go (default docs/race)")
    parser.add_argument("--runs", type=Path, help="where the two runs go (default runs/race-{budget}s)")
    parser.add_argument("--device", default=None, help="the device both train on (default: the recipes')")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run whose figures mean nothing")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 1.0 if args.quick else 60.0
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    recipes = nearest_race(args.budget)
    runs_dir = args.runs or Path("runs") / f"race-{args.budget:g}s"
    command = "python -m bench.race " + " ".join(argv if argv is not None else sys.argv[1:])
    started = machine()
    rows = []
    for recipe in recipes:
        model = RECIPES[recipe]["model"]
        overrides = {"data": args.data, "max_seconds": args.budget, **({"device": args.device} if args.device else {})}
        if args.quick:
            overrides.update(QUICK[model], eval_max_tokens=QUICK_EVAL_TOKENS)
        print(f"race: training {recipe} for {args.budget:g} s", file=sys.stderr, flush=True)
        run = train_recipe(recipe, overrides, runs_dir / model)
        rows.append({"recipe": recipe, **run_summary(run)})
    for row, result in zip(rows, same_targets_val([Path(r["run"]) for r in rows], QUICK_EVAL_TOKENS if args.quick else sys.maxsize)):
        row.update(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"race-{args.budget:g}s"
    date = datetime.date.today().isoformat()
    cpu = started["gpu"] or f"{started['cpu']} ({started['cores']} cores)"
    load = started["load_average"]
    note = (
        f"`{command}`, {date}, {cpu}, torch {started['torch']}"
        + (f", load average {load[0]:.1f} at the start" if load else "")
        + (" (--quick: tiny models, figures mean nothing)" if args.quick else "")
        + "."
    )
    table = markdown_table(rows, args.budget, note)
    (args.out / f"{name}.md").write_text(table)
    (args.out / f"{name}.json").write_text(json.dumps({"command": command, "date": date, "machine": started, "budget": args.budget, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out / f"{name}.png", f"{args.data}: val loss against training time, {args.budget:g} s each")
    print(table)
    print(f"wrote {args.out / name}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
