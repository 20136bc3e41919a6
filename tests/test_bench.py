"""The benchmark harness: interleaved timing, its statistics, the report's files, the GPU command's caps; the race.

The benchmarks themselves run in CI through ``python -m bench --quick``, ``python -m bench.race --quick``,
``bash bench/gpu.sh --dry-run`` and ``pytest bench --benchmark-only --quick`` (.ci/run); these check the pieces
whose mistakes would not crash those runs.
"""

import json
import os
import time

import torch

from bench import gpu, race, report, timing
from makemore.cli import main as makemore


def test_interleaved_alternates_the_implementations_and_rotates_the_first():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.interleaved(fns, torch.device("cpu"), budget_s=0.0, min_rounds=4, max_rounds=4)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    timed = calls[3:]  # after one warm-up call each
    rounds = [timed[i : i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each round calls each implementation once
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]  # the first of a round rotates


def test_stats_match_the_definitions():
    s = timing.stats([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 5.0 and s["rounds"] == 5
    assert s["q1"] <= s["median"] <= s["q3"] and s["iqr"] == s["q3"] - s["q1"]
    entry = timing.record("g", "x", [1.0, 1.0, 1.0])
    assert entry["extra_info"]["spread_pct"] == 0.0


def sweep_entries(group: str, paths: list[str], sizes: list[int]) -> list[dict]:
    entries = []
    for p in paths:
        for b in sizes:
            seconds = [0.01 * b, 0.011 * b, 0.012 * b]
            entry = timing.record(group, f"{p} [{b}]", seconds, path=p, block_size=b, baseline=p == paths[0])
            entry["extra_info"]["positions_per_s"] = round(1 / entry["stats"]["median"])
            entries.append(entry)
    return entries


def test_report_writes_at_most_max_pngs_plots_and_lists_what_was_not_measured(tmp_path):
    benchmarks = []
    groups = ["wavenet fwd+bwd, float32", "wavenet fwd, bfloat16", "gated fwd+bwd, float32", "cross-entropy forward"]
    for group in groups + ["x one", "y two", "z three"]:
        benchmarks += sweep_entries(group, ["windows", "conv"], [8, 64])
    benchmarks.append(timing.skipped("wavenet fwd, bfloat16", "conv [4096]", "out of time budget", path="conv"))
    step = dict(path="eager", case="lecture", tokens_per_s=64)
    benchmarks.append(timing.record("training step", "eager", [0.5, 0.6], **step))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks}))
    written = report.write(results, tmp_path)
    assert len(written) <= report.MAX_PNGS + 1  # with results.md
    assert len([p for p in written if p.suffix == ".png"]) <= report.MAX_PNGS
    assert all(p.exists() for p in written)
    md = (tmp_path / "results.md").read_text()
    assert "conv [4096]: out of time budget" in md
    assert "wavenet fwd+bwd, float32" in md and "z three" in md  # every group has its table, plotted or not


def test_a_gpu_step_past_its_cap_is_killed_with_every_process_it_started():
    started = time.perf_counter()
    code, output, _ = gpu.run(["bash", "-c", "sleep 60 & echo $!; wait"], timeout=1)
    assert code == 124 and time.perf_counter() - started < 30
    grandchild = int(output.split()[0])
    for _ in range(100):  # killed, then reaped by init
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the step's own child {grandchild} outlived its cap")


def test_step_flops_count_every_matmul_of_a_steps_forward_and_backward_at_the_runs_batch(tmp_path):
    forward = 2 * 32 * (3 * 10 * 200 + 200 * 27)  # mlp3: 32 windows a micro-batch through (30 -> 200) and (200 -> 27)
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        argv = ["train", "--recipe", "mlp3", "--max-steps", "1", "--grad-accum", str(accum), "--eval-max-tokens", "100"]
        assert makemore([*argv, "--quiet", "--samples", "0", "--out", str(out)]) == 0
        assert race.step_flops(out) == 3 * forward * accum  # backward: the weights' and the inputs' gradients


def test_the_race_runs_the_named_recipes_while_its_time_limit_holds_them(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--quick", "--recipes", "transformer-gpu,shakespeare-gpu-c", "--time-limit", "1"]
    assert race.main([*argv, "--out", str(out), "--runs", str(tmp_path / "runs")]) == 0
    record = json.loads((out / "race-1s.json").read_text())
    (row,) = record["rows"]  # the first recipe always runs; the second would not fit in what is left of 1 s
    assert row["recipe"] == "transformer-gpu" and row["flops_per_step"] > 0 and row["mfu"] > 0
    assert record["peaks"]["bfloat16_gflops"] > 0 and row["val_targets"] == race.QUICK_EVAL_TOKENS
    assert [s["recipe"] for s in record["skipped"]] == ["shakespeare-gpu-c"]
    assert "`shakespeare-gpu-c` not run" in (out / "race-1s.md").read_text() and (out / "race-1s.png").is_file()


def test_the_race_refuses_an_unknown_recipe_in_one_line(capsys):
    try:
        race.main(["--quick", "--recipes", "transformer-gpu,no-such"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert "--recipes: no recipe no-such" in err and "Traceback" not in err
