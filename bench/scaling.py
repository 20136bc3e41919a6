"""How far context helps, and what it costs: val loss and training tokens/s against the receptive field R.

    python -m bench.scaling                      # 3 minutes per run; --budget to change it
    python -m bench.scaling --quick --out /tmp/s  # tiny sizes, seconds: a smoke run (CI)

1. Val loss against R at a fixed training budget: the gated WaveNet (convolution order, one stack,
   R = 2^n_levels) at R 64, 256, 1024, 4096 on the ``shakespeare-3m`` recipe's settings, and the
   Transformer at R 64, 256, 1024 on ``transformer-3m``'s. Each trains ``--budget`` seconds; each
   training row has max(recipe's seq_len, R) targets and the rows per step are cut so a step keeps
   the recipe's targets (at least one row): a long context costs at most twice its targets in
   positions. All runs are evaluated on the same val targets (the tokens after the first R_max =
   4096), every target with its full context, both the last weights and the checkpoint of the best
   val estimate (bench/race.py's protocol).
2. Training tokens/s (targets per second of forward, backward and AdamW step) against R, from 64 to
   4096: the gated WaveNet as a convolution (about log2 R nodes per target), the same model per
   window (R - 1 nodes per target; measured while a step stays under ``--time-cap`` seconds), and the
   Transformer (its attention reads about 1.5 R / n_layer keys per target and layer). Rows of
   ``--speed-targets`` targets, the recipes' widths and dtypes, median of ``--repeats`` steps after
   one warm-up step.

Writes into ``--out`` (default docs/scaling/) scaling.md, scaling.json, scaling_loss.png and
scaling_speed.png (log x), and prints the tables; runs go to ``--runs`` (default runs/scaling/).
"""

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.race import best_cell, judge, machine, run_summary, train_recipe
from makemore.device import resolve_device, resolve_dtype
from makemore.models import build_model
from makemore.train import RECIPES, make_configs
from makemore.train.optim import make_optimizer

LOSS_RECIPES = {"gated": "shakespeare-3m", "transformer": "transformer-3m"}
LOSS_FIELDS = {"gated": (64, 256, 1024, 4096), "transformer": (64, 256, 1024)}
SPEED_FIELDS = (64, 128, 256, 512, 1024, 2048, 4096)
SPEED_MODELS = (("gated", "conv"), ("gated", "windows"), ("transformer", None))
VOCAB = 65  # tinyshakespeare's characters
# --quick: the same code paths at tiny sizes (CI); its figures mean nothing.
QUICK_LOSS_FIELDS = {"gated": (8, 32), "transformer": (8, 32)}
QUICK_SPEED_FIELDS = (8, 16)
QUICK_SIZES = {
    "gated": dict(n_embd=8, n_hidden=8, n_skip=16, seq_len=32, eval_interval=5, eval_iters=2, log_interval=5),
    "transformer": dict(n_embd=16, n_layer=2, n_head=2, seq_len=32, eval_interval=5, eval_iters=2, log_interval=5),
}
QUICK_EVAL_TOKENS = 2048
DEFAULTS = dict(budget=180.0, speed_targets=4096, windows_targets=64, repeats=3)
QUICK_DEFAULTS = dict(budget=0.5, speed_targets=32, windows_targets=8, repeats=1)


def context_settings(model: str, R: int, recipe: str) -> dict:
    """The settings that give ``model`` the receptive field R, with rows of max(seq_len, R) targets and the recipe's
    targets per step."""
    base = RECIPES[recipe]
    field = {"n_levels": R.bit_length() - 1, "stacks": 1} if model == "gated" else {"block_size": R}
    seq_len = max(base["seq_len"], R)
    return {**field, "seq_len": seq_len, "batch_size": max(1, base["batch_size"] * base["seq_len"] // seq_len)}


def loss_study(budget: float, fields: dict, runs: Path, quick: bool) -> list[dict]:
    """Each run's last weights and best checkpoint on the same val targets (bench/race.py's judge)."""
    rows = []
    r_max = max(R for Rs in fields.values() for R in Rs)
    max_tokens = QUICK_EVAL_TOKENS if quick else sys.maxsize
    for model, Rs in fields.items():
        for R in Rs:
            recipe = LOSS_RECIPES[model]
            overrides = {"max_seconds": budget, **context_settings(model, R, recipe)}
            if quick:
                overrides.update(QUICK_SIZES[model], eval_max_tokens=QUICK_EVAL_TOKENS)
            print(f"scaling: training {model} at R {R} for {budget:g} s", file=sys.stderr, flush=True)
            run = train_recipe(recipe, overrides, runs / f"{model}-R{R}")
            rows.append({"recipe": recipe, "R": R, **run_summary(run), **judge(run, r_max, max_tokens)})
    return rows


def step_rate(model_name: str, order: str | None, R: int, targets: int, repeats: int, quick: bool) -> float:
    """Targets per second of one training step (forward, backward, AdamW) on one row of R - 1 + ``targets`` tokens."""
    recipe = LOSS_RECIPES[model_name]
    settings = {**RECIPES[recipe], **context_settings(model_name, R, recipe), **({"order": order} if order else {})}
    if quick:
        settings.update(QUICK_SIZES[model_name])
    config, model_config = make_configs(settings)
    device = resolve_device(config.device)
    torch.manual_seed(0)
    model = build_model(config.model, replace(model_config, vocab_size=VOCAB)).to(device)
    optimizer = make_optimizer(config, model)
    autocast = (
        torch.autocast(device.type, torch.bfloat16)
        if resolve_dtype(config.dtype, device) == torch.bfloat16
        else contextlib.nullcontext()
    )
    idx = torch.randint(0, VOCAB, (1, R - 1 + targets), device=device)
    y = torch.randint(0, VOCAB, (1, targets), device=device)
    times = []
    for _ in range(repeats + 1):  # the first step warms up (allocations, kernels): not counted
        start = time.perf_counter()
        with autocast:
            _, loss = model(idx, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return targets / statistics.median(times[1:])


def speed_study(fields, targets: int, windows_targets: int, repeats: int, time_cap: float, quick: bool) -> list[dict]:
    rows = []
    for model, order in SPEED_MODELS:
        name = f"{model}" + (f" ({order})" if order else "")
        n = (
            windows_targets if order == "windows" else targets
        )  # per window, the cost does not depend on how many share a row
        for R in fields:
            rate = step_rate(model, order, R, n, repeats, quick)
            rows.append({"model": name, "R": R, "targets_per_step": n, "tokens_per_s": rate})
            print(f"scaling: {name} R {R}: {rate:,.0f} tokens/s", file=sys.stderr, flush=True)
            if n / rate > time_cap:  # one step took longer than the cap: the next R would take longer still
                break
    return rows


def loss_markdown(rows: list[dict]) -> str:
    head = (
        "| model | recipe | R | params | steps | tokens/s (median) | train | val: last weights | val: best checkpoint |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(
            f"| {r['model']} | `{r['recipe']}` | {r['R']:,} | {r['params']:,} | {r['steps']:,} | {rate} "
            f"| {r['train']:.4f} | {r['val']:.4f} | {best_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def speed_markdown(rows: list[dict]) -> str:
    Rs = sorted({r["R"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    rate = {(r["model"], r["R"]): r["tokens_per_s"] for r in rows}
    lines = ["| model | " + " | ".join(f"R {R:,}" for R in Rs) + " |", "| --- |" + " --- |" * len(Rs)]
    for name in names:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{rate[name, R]:,.0f}" if (name, R) in rate else "over the cap" for R in Rs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(loss_rows: list[dict], speed_rows: list[dict], out: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for rows, y, ylabel, name, title, logy in (
        (
            loss_rows,
            "val",
            "val loss (nats per character)",
            "scaling_loss.png",
            f"val loss against receptive field, {budget:g} s of training each",
            False,
        ),
        (
            speed_rows,
            "tokens_per_s",
            "training tokens/s",
            "scaling_speed.png",
            "training throughput against receptive field",
            True,
        ),
    ):
        if not rows:  # --only the other study
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in dict.fromkeys(r["model"] for r in rows):
            points = [(r["R"], r[y]) for r in rows if r["model"] == model]
            ax.plot(*zip(*points), "o-", label=model)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("receptive field R (tokens, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, help="seconds of training per run of the loss study (default 180)")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/scaling"), help="where the tables and plots go (default docs/scaling)"
    )
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/scaling"), help="where the loss study's runs go (default runs/scaling)"
    )
    parser.add_argument("--only", choices=("loss", "speed"), help="run one of the two studies")
    parser.add_argument("--speed-targets", type=int, help="targets per training row in the speed study (default 4096)")
    parser.add_argument("--windows-targets", type=int, help="targets per row for the per-window order (default 64)")
    parser.add_argument(
        "--repeats", type=int, help="timed steps per point of the speed study, after one warm-up (default 3)"
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=10.0,
        help="stop a model's speed series after a step that took longer than this many seconds (default 10)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and budgets: a smoke run whose figures mean nothing"
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("budget", "speed_targets", "windows_targets", "repeats", "time_cap"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m bench.scaling", *given])
    started = machine()
    loss_rows = (
        []
        if args.only == "speed"
        else loss_study(args.budget, QUICK_LOSS_FIELDS if args.quick else LOSS_FIELDS, args.runs, args.quick)
    )
    speed_rows = (
        []
        if args.only == "loss"
        else speed_study(
            QUICK_SPEED_FIELDS if args.quick else SPEED_FIELDS,
            args.speed_targets,
            args.windows_targets,
            args.repeats,
            args.time_cap,
            args.quick,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    load = started["load_average"]
    where = started["gpu"] or f"{started['cpu']} ({started['cores']} cores)"
    note = (
        f"`{command}`, {date}, {where}, torch {started['torch']}"
        + (f", load average {load[0]:.1f} at the start" if load else "")
        + (" (--quick: tiny sizes, figures mean nothing)" if args.quick else "")
        + "."
    )
    text = note + "\n"
    if loss_rows:
        text += f"\nVal loss against the receptive field, {args.budget:g} s of training each:\n\n" + loss_markdown(
            loss_rows
        )
    if speed_rows:
        text += (
            f"\nTraining tokens/s against the receptive field (rows of {args.speed_targets:,} targets; "
            f"per window {args.windows_targets:,}):\n\n"
        )
        text += speed_markdown(speed_rows)
    (args.out / "scaling.md").write_text(text)
    record = {
        "command": command,
        "date": date,
        "machine": started,
        "budget": args.budget,
        "loss": loss_rows,
        "speed": speed_rows,
    }
    (args.out / "scaling.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(loss_rows, speed_rows, args.out, args.budget)
    print(text)
    print(f"wrote {args.out}/scaling.md, scaling.json, scaling_loss.png, scaling_speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
