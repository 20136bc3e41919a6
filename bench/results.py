"""The results table, generated: one row per recipe run, race and context-study point, never copied by hand.

    python -m bench.results [--runs DIR ...]  # update docs/results/runs.json from run directories, then write the table
    python -m bench.results --check           # exit 1 if README.md or docs/results.md differ from what would be written

Reads
- run directories (``--runs``, default ``runs``: each a run directory or a folder of them), named after
  their recipe as ``makemore train --recipe NAME`` names them (runs/NAME): metrics.jsonl's first record
  (device, dtype, processes) and its final losses; ckpt.pt for the parameter count and the flags that
  differ from the recipe. A run's record replaces its recipe's in docs/results/runs.json, which is
  committed (runs/ is not), so the table can be regenerated on any clone;
- docs/race/race-*.json (``python -m bench.race``) and docs/scaling/scaling.json (``python -m bench.scaling``);
- docs/benchmarks/results.json (``python -m bench``): its date, device and command, beside the link.
Writes the table into docs/results.md and into README.md between ``<!-- results:begin -->`` and
``<!-- results:end -->``. Only the standard library at import; torch only to read a checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS_JSON = Path("docs/results/runs.json")
RESULTS_MD = Path("docs/results.md")
README = Path("README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# Settings that change how a run reports or where it runs, not what it trains: a run with other overrides is not its
# recipe's run.
NEUTRAL = {
    "eval_interval",
    "eval_iters",
    "log_interval",
    "checkpoint_interval",
    "checkpoint_seconds",
    "dist_timeout",
    "device",
    "dtype",
    "compile",
    "compile_mode",
}
# The README's short table takes these columns of the whole table (docs/results.md).
SUMMARY = ["recipe", "params", "training time", "val", "test", "device, dtype", "machine", "date"]
COLUMNS = [
    "recipe",
    "model",
    "params",
    "steps",
    "training time",
    "train",
    "val",
    "test",
    "device, dtype",
    "machine",
    "date",
    "command",
    "notes",
]


class ResultsError(Exception):
    """A problem with an input file or the README; the message is one line."""


# ---------------------------------------------------------------- run directories -> runs.json records


def machine_here() -> str:
    import torch

    from makemore.device import describe

    return f"{describe(torch.device('cpu'))}, {os.cpu_count()} cores"


def read_metrics(run: Path) -> tuple[dict, dict]:
    """(the first record's "run": device, dtype, world_size; the final record: step, time, final losses) of ``run``."""
    path = run / "metrics.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not readable as JSON lines ({e})") from None
    info = next((r["run"] for r in records if "run" in r), {})
    final = next((r for r in reversed(records) if "final" in r), None)
    if final is None:
        raise ResultsError(
            f"{path}: no final losses (the run did not finish; resume it with `makemore train --out {run} --resume`)"
        )
    return info, final


def checkpoint_facts(run: Path, recipe: str) -> tuple[str, int, list[str], list[str]]:
    """(model, parameters, the run's flags that differ from the recipe, those among them that change what is trained),
    from ckpt.pt."""
    from makemore.checkpoint import load  # torch: only here
    from makemore.models import MODELS, build_model
    from makemore.train import RECIPES
    from makemore.train.config import flag, make_configs

    state = load(run / "ckpt.pt")
    name, model_config = state["config"]["model"], state["model_config"]
    config, recipe_model_config = make_configs(RECIPES[recipe], vocab_size=model_config["vocab_size"])
    expected = {**vars(config), **vars(recipe_model_config)}
    actual = {**state["config"], **model_config}
    differ = [k for k in actual if k in expected and actual[k] != expected[k]]
    params = sum(p.numel() for p in build_model(name, MODELS[name][1](**model_config)).parameters())
    flags = [
        (flag(k) if actual[k] else "--no-" + flag(k)[2:]) if isinstance(actual[k], bool) else f"{flag(k)} {actual[k]}"
        for k in differ
    ]
    return name, params, flags, [flag(k) for k in differ if k not in NEUTRAL]


def run_record(run: Path, recipe: str) -> dict:
    """The record of ``run``, a finished run of ``recipe`` with at most NEUTRAL settings changed (else ResultsError)."""
    info, final = read_metrics(run)
    model, params, flags, changed = checkpoint_facts(run, recipe)
    if changed:
        raise ResultsError(
            f"{run}: trained with {', '.join(changed)} other than the recipe {recipe}'s: not its recipe's run, skipped"
        )
    losses = final["final"]
    best = final.get("best") or {}  # a run that estimated its val: its best estimate's checkpoint, on the whole split
    mtime = datetime.datetime.fromtimestamp((run / "metrics.jsonl").stat().st_mtime, datetime.timezone.utc)
    return {
        "recipe": recipe,
        "model": model,
        "params": params,
        "steps": final.get("step"),
        "train_seconds": round(final["time"], 1) if final.get("time") is not None else None,
        "train": losses.get("train"),
        "val": losses.get("val"),
        "best_val": best.get("val"),
        "best_step": best.get("step"),
        "best_seconds": round(best["time"], 1) if best.get("time") is not None else None,
        "test": losses.get("test"),
        "best_test": best.get("test"),
        "device": info.get("device"),
        "dtype": info.get("dtype"),
        "world_size": info.get("world_size", 1),
        "machine": machine_here(),
        "date": mtime.date().isoformat(),
        "command": " ".join([f"makemore train --recipe {recipe} --out {run}", *flags]),
        "source": f"read from {run}/metrics.jsonl and ckpt.pt by python -m bench.results",
        "notes": "",
    }


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory (one holding metrics.jsonl) at or one level under each path, in name order."""
    found = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file())
    return found


def update_records(records: dict, runs: list[Path], say=print) -> dict:
    """``records`` with each recipe's record replaced by the run of that recipe found in ``runs``."""
    from makemore.checkpoint import CheckpointError
    from makemore.train import RECIPES

    records = dict(records)
    for run in runs:
        recipe = run.name
        if recipe not in RECIPES:
            say(f"{run}: not named after a recipe (train with --recipe NAME, which writes runs/NAME); skipped")
            continue
        try:
            record = run_record(run, recipe)
        except (ResultsError, CheckpointError) as e:
            say(str(e))
            continue
        except (TypeError, ValueError) as e:  # a checkpoint whose configs this makemore no longer builds
            say(f"{run}: its checkpoint's settings do not fit this makemore's recipe {recipe} ({e}); skipped")
            continue
        old = records.get(recipe, {})
        if all(
            old.get(k) == record[k] for k in ("command", "date", "val")
        ):  # the same run read again: keep what was said of it
            record["notes"] = old.get("notes", "")
        records[recipe] = record
        say(f"{run}: {recipe} val {record['val']:.4f} recorded")
    return records


# ---------------------------------------------------------------- the table


def loss(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def count(value) -> str:
    return "—" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))


def seconds(value) -> str:
    if value is None:
        return "—"
    return f"{value:g} s" if isinstance(value, (int, float)) else str(value)


def row(r: dict) -> list[str]:
    device = ", ".join(x for x in (r.get("device"), r.get("dtype")) if x) or "—"
    if (r.get("world_size") or 1) > 1:
        device += f", {r['world_size']} processes"
    return [
        f"`{r['recipe']}`" if r.get("recipe_is_name", True) else r["recipe"],
        r.get("model") or "—",
        count(r.get("params")),
        count(r.get("steps")),
        seconds(r.get("train_seconds")),
        loss(r.get("train")),
        val_cell(r),
        loss(r.get("test")) if r.get("best_test") is None else f"{loss(r['best_test'])} best; {loss(r['test'])} last",
        device,
        r.get("machine") or "—",
        (r.get("date") or "—") + (" †" if str(r.get("source", "")).startswith("recorded before") else ""),
        f"`{r['command']}`" if r.get("command") else "—",
        r.get("notes") or "",
    ]


def val_cell(r: dict) -> str:
    """The val loss a row is judged by, saying whose weights: the best checkpoint's where the run kept one (with
    its step and training time, and the last weights' beside it), else the last weights'."""
    if r.get("best_val") is None:
        return f"**{loss(r.get('val'))}** last"
    at = f"step {r['best_step']:,}, {seconds(round(r['best_seconds'], 1))}"
    return f"**{loss(r['best_val'])}** best ({at}); {loss(r.get('val'))} last"


def race_rows(path: Path) -> list[dict]:
    data = read_json(path)
    m = data.get("machine", {})
    machine = f"{m.get('gpu') or m.get('cpu', '?')}, {m.get('cores', '?')} cores" + (
        f", load {m['load_average'][0]:.1f} at the start" if m.get("load_average") else ""
    )
    rows = []
    for r in data["rows"]:
        others = [o["recipe"] for o in data["rows"] if o is not r]
        notes = (
            f"race at {data.get('budget', 0):g} s against {', '.join(others)}: "
            f"val on the same {r.get('val_targets', 0):,} targets"
        )
        notes += f" (the run's own val {r['own_val']:.4f})" if r.get("own_val") is not None else ""
        if r.get("mfu") is not None:
            flops = r["flops_per_step"] / 1e9
            notes += f"; {flops:,.1f} GFLOP a step, MFU {r['mfu']:.1%} of the {r['dtype']} matmul peak measured there"
        rows.append(_study_row(r, data, machine, f"`{r['recipe']}`, race {data.get('budget', 0):g} s", notes))
    return rows


def scaling_rows(path: Path) -> list[dict]:
    data = read_json(path)
    m = data.get("machine", {})
    machine = f"{m.get('gpu') or m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    return [
        _study_row(
            r,
            data,
            machine,
            f"`{r['recipe']}` at R {r['R']:,}",
            f"context study at {data.get('budget', 0):g} s: val on the same {r.get('val_targets', 0):,} targets",
        )
        for r in data.get("loss", [])
    ]


def _study_row(r: dict, data: dict, machine: str, recipe: str, notes: str) -> dict:
    """One table row from a race's or the context study's run ``r`` (no test split: both evaluate on val)."""
    return {
        "recipe": recipe,
        "recipe_is_name": False,
        "model": r.get("model"),
        "params": r.get("params"),
        "steps": r.get("steps"),
        "train_seconds": round(r["train_seconds"], 1) if r.get("train_seconds") is not None else None,
        "train": r.get("train"),
        "val": r.get("val"),
        "best_val": r.get("best_val"),
        "best_step": r.get("best_step"),
        "best_seconds": r.get("best_seconds"),
        "test": None,
        "device": r.get("device") or ("cuda" if data.get("machine", {}).get("gpu") else "cpu"),
        "dtype": r.get("dtype"),
        "machine": machine,
        "date": data.get("date"),
        "command": data.get("command"),
        "notes": notes,
    }


def benchmark_line(path: Path, docs: str) -> str:
    data = read_json(path)
    date = (data.get("date") or data.get("datetime") or "?")[:10]
    cpu = data.get("machine_info", {}).get("cpu", {})
    cpu = cpu.get("brand_raw", "?") if isinstance(cpu, dict) else str(cpu)
    device = data.get("device") or "CPU"
    command = data.get("command") or "python -m bench"
    return (
        f"Benchmarks (every evaluation order, generation, the gated block, cross-entropy, training steps): "
        f"[docs/benchmarks/results.md]({docs}benchmarks/results.md), `{command}` on {device} ({cpu}), {date}."
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not readable JSON ({e})") from None


def table(root: Path, docs: str = "docs/", summary: bool = False) -> str:
    """The generated block: the table of every recorded run, race and study point, then the benchmarks' line (links
    relative to ``docs``). ``summary``: the README's short form, the recipes' runs and the races in SUMMARY's
    columns, with a link to the whole table."""
    rows = list(read_json(root / RUNS_JSON)["records"].values()) if (root / RUNS_JSON).is_file() else []
    races = sorted((root / "docs/race").glob("race-*.json"), key=lambda p: (len(p.stem), p.stem))
    for path in races:
        rows += race_rows(path)
    if not summary and (root / "docs/scaling/scaling.json").is_file():
        rows += scaling_rows(root / "docs/scaling/scaling.json")
    columns = SUMMARY if summary else COLUMNS
    keep = [COLUMNS.index(c) for c in columns]
    lines = [
        "<!-- generated by `python -m bench.results` from docs/results/runs.json, docs/race/race-*.json, "
        "docs/scaling/scaling.json and docs/benchmarks/results.json: "
        "edit those (or rerun the runs), not this table -->",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
        *("| " + " | ".join(row(r)[i].replace("|", "\\|") for i in keep) + " |" for r in rows),
    ]
    if any(str(r.get("source", "")).startswith("recorded before") for r in rows):
        lines += [
            "",
            "† recorded before `bench.results` existed: "
            "copied from the README of that date, with the command then run.",
        ]
    if summary:
        lines += [
            "",
            f"Every run with its steps, command and notes, and the context study: "
            f"[{docs}results.md]({docs}results.md).",
        ]
    if (root / "docs/benchmarks/results.json").is_file():
        lines += ["", benchmark_line(root / "docs/benchmarks/results.json", docs)]
    return "\n".join(lines) + "\n"


def results_page(block: str) -> str:
    return (
        "# Results\n\n"
        "Every training result this project reports, one row per run: the recipes' runs (docs/results/runs.json,\n"
        "updated from run directories), the races (docs/race/) and the context study (docs/scaling/). "
        "Val and test are\n"
        'losses on the whole split (nats per character); each val says whose weights: "best", the checkpoint of the\n'
        'run\'s best val estimate (with its step and training time; nanoGPT reports this one), beside "last", the\n'
        "weights when training stopped. Training time is the training clock (steps only). How\n"
        "the runs were measured and the recipes tuned: [recipes.md](recipes.md).\n"
        "Regenerate with `python -m bench.results` after a run; `python -m bench.results --check` (CI) fails when\n"
        "this page or the README's table is stale.\n\n" + block
    )


def with_block(readme: str, block: str, path: Path) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ResultsError(
            f"{path}: needs exactly one {BEGIN} line followed by one {END} line where the results table goes"
        )
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.results", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=Path,
        action="append",
        metavar="DIR",
        help="a run directory, or a folder of them (repeatable; default: runs)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if README.md or docs/results.md differ from the generated table",
    )
    args = parser.parse_args(argv)
    root = args.root
    try:
        if not args.check:
            runs = find_runs(args.runs if args.runs else [Path("runs")])
            if runs:
                stored = read_json(root / RUNS_JSON) if (root / RUNS_JSON).is_file() else {"records": {}}
                stored["records"] = update_records(stored["records"], runs)
                (root / RUNS_JSON).parent.mkdir(parents=True, exist_ok=True)
                (root / RUNS_JSON).write_text(json.dumps(stored, indent=1, ensure_ascii=False) + "\n")
        readme_path = root / README
        readme = readme_path.read_text()
        wanted = {
            readme_path: with_block(readme, table(root, summary=True), readme_path),
            root / RESULTS_MD: results_page(table(root, docs="")),
        }
        if args.check:
            stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
            if stale:
                print(
                    f"{', '.join(str(p) for p in stale)}: results table out of date; "
                    "regenerate it with `python -m bench.results`",
                    file=sys.stderr,
                )
                return 1
            print("results table up to date")
            return 0
        for p, text in wanted.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            print(f"wrote {p}")
    except ResultsError as e:
        print(f"bench.results: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
