"""The results table is generated (bench/results.py): from run records, race and study JSON,
into README and docs/results.md.

Each val says whose weights it is: the best checkpoint's where a race or study run kept one (with its step and time,
the last weights' beside it), else the last weights' (every record written before best checkpoints existed).
"""

import datetime
import json
from pathlib import Path

from bench import results
from makemore.cli import main as makemore

BEGIN, END = results.BEGIN, results.END
DAY = {day: datetime.date(2026, 11, day).isoformat() for day in (23, 26, 27, 28)}  # the records' dates


def repo(tmp_path: Path, records: dict) -> Path:
    """A repository with runs.json ``records``, a 60 s race, a context study,
    a benchmark report and a README to fill."""
    root = tmp_path / "repo"
    (root / "docs/results").mkdir(parents=True)
    (root / "docs/race").mkdir()
    (root / "docs/scaling").mkdir()
    (root / "docs/benchmarks").mkdir()
    (root / results.RUNS_JSON).write_text(json.dumps({"records": records}))
    machine = {"cpu": "Test CPU", "cores": 2, "gpu": None, "load_average": [0.25, 0.5, 1.0]}
    race = {
        "command": "python -m bench.race --data tinyshakespeare --budget 60",
        "date": DAY[27],
        "machine": machine,
        "budget": 60.0,
        "rows": [
            {
                "recipe": "shakespeare-60s",
                "model": "gated",
                "params": 255489,
                "steps": 3079,
                "train_seconds": 60.003,
                "train": 1.30807,
                "own_val": 1.61149,
                "val": 1.61149,
                "val_targets": 111284,
                "device": "cpu",
                "dtype": "bfloat16",
                "best_val": 1.59002,
                "best_step": 2500,
                "best_seconds": 49.7,
                "flops_per_step": 2.5e9,
                "mfu": 0.1234,
            },
            {
                "recipe": "transformer-60s",
                "model": "transformer",
                "params": 795904,
                "steps": 1019,
                "train_seconds": 60.04,
                "train": 1.51167,
                "own_val": 1.70213,
                "val": 1.70241,
                "val_targets": 111284,
            },
        ],
    }
    (root / "docs/race/race-60s.json").write_text(json.dumps(race))
    scaling = {
        "command": "python -m bench.scaling",
        "date": DAY[28],
        "machine": machine,
        "budget": 180.0,
        "loss": [
            {
                "recipe": "shakespeare-3m",
                "model": "gated",
                "R": 1024,
                "params": 600000,
                "steps": 900,
                "train_seconds": 180.0,
                "train": 1.4,
                "val": 1.55561,
                "val_targets": 100000,
            },
        ],
        "speed": [],
    }
    (root / "docs/scaling/scaling.json").write_text(json.dumps(scaling))
    (root / "docs/benchmarks/results.json").write_text(
        json.dumps({"date": f"{DAY[26]}T10:00:00+00:00", "device": "CPU", "command": "python -m bench --budget 480"})
    )
    (root / "README.md").write_text(f"# project\n\nintro\n\n{BEGIN}\n| stale | table |\n{END}\n\n## after\n")
    return root


def block(text: str) -> str:
    return text.split(BEGIN)[1].split(END)[0]


def test_the_table_holds_every_record_race_and_study_row_and_check_catches_a_stale_readme(tmp_path, capsys):
    record = {
        "recipe": "fast",
        "model": "wavenet",
        "params": 76579,
        "steps": 600,
        "train_seconds": 10.0,
        "train": 1.99,
        "val": "2.036–2.064",
        "test": 2.0501,
        "device": "cpu",
        "dtype": "float32",
        "machine": "Test CPU, 2 cores",
        "date": DAY[23],
        "command": "makemore train --recipe fast",
        "source": "recorded before bench.results existed",
        "notes": "6 runs",
    }
    root = repo(tmp_path, {"fast": record})
    assert results.main(["--check", "--root", str(root)]) == 1
    assert "README.md" in capsys.readouterr().err

    assert results.main(["--root", str(root), "--runs", str(tmp_path / "no-runs")]) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("# project\n\nintro\n\n") and readme.endswith(
        f"{END}\n\n## after\n"
    )  # only the block changed
    page = (root / results.RESULTS_MD).read_text()  # the whole table
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `fast` | wavenet | 76,579 | 600 | 10 s | 1.9900 | **2.036–2.064** last | 2.0501 | cpu, float32 "
        f"| Test CPU, 2 cores | {DAY[23]} † | `makemore train --recipe fast` | 6 runs |",
        "| `shakespeare-60s`, race 60 s | gated | 255,489 | 3,079 | 60 s | 1.3081 "
        "| **1.5900** best (step 2,500, 49.7 s); 1.6115 last | — | cpu, bfloat16 "
        f"| Test CPU, 2 cores, load 0.2 at the start | {DAY[27]} | "
        "`python -m bench.race --data tinyshakespeare --budget 60` "
        "| race at 60 s against transformer-60s: val on the same 111,284 targets (the run's own val 1.6115); "
        "2.5 GFLOP a step, MFU 12.3% of the bfloat16 matmul peak measured there |",
        "| `transformer-60s`, race 60 s | transformer | 795,904 | 1,019 | 60 s | 1.5117 | **1.7024** last | — | cpu "
        f"| Test CPU, 2 cores, load 0.2 at the start | {DAY[27]} | "
        "`python -m bench.race --data tinyshakespeare --budget 60` "
        "| race at 60 s against shakespeare-60s: val on the same 111,284 targets (the run's own val 1.7021) |",
        "| `shakespeare-3m` at R 1,024 | gated | 600,000 | 900 | 180 s | 1.4000 | **1.5556** last | — | cpu "
        f"| Test CPU, 2 cores | {DAY[28]} | `python -m bench.scaling` "
        "| context study at 180 s: val on the same 100,000 targets |",
    ]
    # The README's short table: the recipes' runs and the races, fewer columns, a link to the whole table.
    summary = [line for line in block(readme).splitlines() if line.startswith("| `")]
    assert summary == [
        f"| `fast` | 76,579 | 10 s | **2.036–2.064** last | 2.0501 | cpu, float32 | Test CPU, 2 cores | {DAY[23]} † |",
        "| `shakespeare-60s`, race 60 s | 255,489 | 60 s | **1.5900** best (step 2,500, 49.7 s); 1.6115 last | — "
        f"| cpu, bfloat16 | Test CPU, 2 cores, load 0.2 at the start | {DAY[27]} |",
        "| `transformer-60s`, race 60 s | 795,904 | 60 s | **1.7024** last | — | cpu "
        f"| Test CPU, 2 cores, load 0.2 at the start | {DAY[27]} |",
    ]
    assert "[docs/results.md](docs/results.md)" in block(readme)
    for text, docs in ((block(readme), "docs/"), (page, "")):
        assert "`python -m bench --budget 480` on CPU" in text and DAY[26] in text
        assert f"]({docs}benchmarks/results.md)" in text
    assert results.main(["--check", "--root", str(root)]) == 0

    (root / results.RESULTS_MD).write_text("edited by hand\n")
    assert results.main(["--check", "--root", str(root)]) == 1


def test_a_finished_recipe_run_replaces_its_record_and_other_runs_are_skipped(tmp_path, capsys):
    root = repo(tmp_path, {"bigram": {"recipe": "bigram", "val": 9.0, "command": "makemore train --recipe bigram"}})
    runs, other = tmp_path / "runs", tmp_path / "other"
    assert makemore(["train", "--recipe", "bigram", "--out", str(runs / "bigram")]) == 0
    assert (
        makemore(["train", "--recipe", "bigram", "--seed", "3", "--out", str(other / "bigram")]) == 0
    )  # not the recipe's run
    assert makemore(["train", "--recipe", "bigram", "--out", str(other / "mine")]) == 0  # not named after a recipe
    final = json.loads((runs / "bigram/metrics.jsonl").read_text().splitlines()[-1])["final"]
    capsys.readouterr()

    assert results.main(["--root", str(root), "--runs", str(runs), "--runs", str(other)]) == 0
    said = capsys.readouterr().out
    assert "trained with --seed other than the recipe bigram's" in said and "mine: not named after a recipe" in said
    record = json.loads((root / results.RUNS_JSON).read_text())["records"]["bigram"]
    assert record["best_val"] is None  # no --eval-interval: no best checkpoint
    assert (record["val"], record["test"], record["model"], record["steps"]) == (
        final["val"],
        final["test"],
        "ngram",
        0,
    )
    assert record["command"] == f"makemore train --recipe bigram --out {runs / 'bigram'}" and record["device"] == "cpu"
    assert f"| **{final['val']:.4f}** last |" in block((root / "README.md").read_text())


def test_a_readme_without_the_markers_is_one_line_and_exit_2(tmp_path, capsys):
    root = repo(tmp_path, {})
    (root / "README.md").write_text("# no markers\n")
    assert results.main(["--root", str(root), "--runs", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and BEGIN in err


def test_a_run_that_kept_a_best_checkpoint_reports_it_beside_its_last_weights(tmp_path, capsys):
    """The final record's "best" (best.pt's step, time and whole-split losses) goes into the record and the table."""
    root = repo(tmp_path, {})
    run = tmp_path / "runs" / "bigram"
    assert makemore(["train", "--recipe", "bigram", "--quiet", "--samples", "0", "--out", str(run)]) == 0
    with open(run / "metrics.jsonl") as f:  # as a run whose best estimate came before its last step writes it
        records = [json.loads(line) for line in f]
    best = {"step": 20, "time": 0.52, "estimate": {"val": 2.5}, "train": 2.41, "val": 2.4321, "test": 2.4567}
    records[-1]["best"] = best
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert results.main(["--root", str(root), "--runs", str(run.parent)]) == 0, capsys.readouterr().out
    last = records[-1]["final"]
    line = next(line for line in block((root / "README.md").read_text()).splitlines() if line.startswith("| `bigram`"))
    val, test = f"**2.4321** best (step 20, 0.5 s); {last['val']:.4f} last", f"2.4567 best; {last['test']:.4f} last"
    assert f"| {val} | {test} |" in line
