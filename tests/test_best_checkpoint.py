"""Runs are judged as nanoGPT judges them: best.pt keeps the best val estimate's weights beside ckpt.pt's last ones.

A run that overfits (200 names, a wide model, many steps at a high rate) ends with a worse val than it passed
through; its best checkpoint keeps the better weights, its final record gives both, and ``sample`` / ``eval``
read either with ``--checkpoint``. ``--patience`` stops a run whose estimates stop improving.
"""

import json

import pytest

from makemore import checkpoint, cli
from makemore.train import BEST, CHECKPOINT, METRICS, make_configs, train
from makemore.train.loop import final_record

# A wide model over whole names, trained hard for 150 steps, its val estimated every 10.
WIDE = dict(model="gated", layout="sequences", n_embd=32, n_hidden=32, n_skip=64, n_levels=3)
HARD = dict(batch_size=32, optimizer="adamw", lr=1e-2, schedule="cosine", max_steps=150, dtype="float32")
OVERFIT = dict(WIDE, **HARD, eval_interval=10, eval_iters=4, log_interval=50, checkpoint_interval=10_000)


@pytest.fixture(scope="module")
def overfitted(tmp_path_factory, names):
    """One overfitting run on 200 names (the split: 160 train, 20 val, 20 test), shared by the tests below."""
    root = tmp_path_factory.mktemp("best")
    path = root / "names200.txt"
    path.write_text("".join(line + "\n" for line in names[:200]))
    config, model_config = make_configs({**OVERFIT, "data": str(path)})
    out = root / "run"
    last = train(config, model_config, out, progress=False)
    return out, last


def estimates_of(out) -> list[dict]:
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [r for r in records if "estimate" in r]


def test_an_overfitting_run_keeps_a_best_val_below_its_final_val(overfitted):
    out, last = overfitted
    record = final_record(out)
    best = record["best"]
    assert record["final"] == last
    assert 0 < best["step"] < record["step"] and best["step"] % OVERFIT["eval_interval"] == 0
    assert best["val"] < last["val"] - 0.05, (best, last)  # the whole val split, best weights against last
    assert last["train"] < best["train"]  # the last weights fit the training items better: it overfitted
    estimates = estimates_of(out)
    assert best["estimate"]["val"] == min(r["estimate"]["val"] for r in estimates if r["step"] > 0)
    state = checkpoint.load(out / BEST)
    assert state["step"] == best["step"] and state["best"]["val"] == best["estimate"]["val"]
    assert checkpoint.load(out / CHECKPOINT)["best"]["step"] == best["step"]  # a resume knows the best so far


def test_eval_and_sample_read_either_checkpoint(overfitted, capsys):
    out, last = overfitted
    best = final_record(out)["best"]
    for name, expected in (("last", last), ("best", best)):
        assert cli.main(["eval", "--out", str(out), "--json", "--checkpoint", name]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["val"] == pytest.approx(expected["val"], abs=1e-5)
        assert cli.main(["sample", "--out", str(out), "-n", "3", "--checkpoint", name]) == 0
        assert len(capsys.readouterr().out.split()) == 3


def test_a_run_without_estimates_has_no_best_checkpoint(tmp_path, capsys):
    config, model_config = make_configs({**OVERFIT, "max_steps": 5, "eval_interval": 0})
    train(config, model_config, tmp_path, progress=False)
    assert not (tmp_path / BEST).exists() and "best" not in final_record(tmp_path)
    assert cli.main(["sample", "--out", str(tmp_path), "--checkpoint", "best"]) == 2
    assert "kept no best checkpoint" in capsys.readouterr().err


def test_patience_stops_after_that_many_estimates_without_a_better_one(overfitted, tmp_path):
    out, _ = overfitted
    estimates = estimates_of(out)
    best_step = final_record(out)["best"]["step"]
    data = checkpoint.load(out / CHECKPOINT)["config"]["data"]
    config, model_config = make_configs({**OVERFIT, "data": data, "patience": 2})
    train(config, model_config, tmp_path, progress=False)
    record = final_record(tmp_path)
    # The same run, stopped at the second estimate after its best (assuming that one is the same, as it is here).
    assert record["best"]["step"] == best_step
    expected = best_step + 2 * OVERFIT["eval_interval"]
    assert expected < estimates[-1]["step"]
    assert record["step"] == expected


def test_min_lr_follows_lr_unless_set():
    assert make_configs({"lr": 3e-3})[0].min_lr == pytest.approx(3e-4)
    assert make_configs({})[0].min_lr == 0.01  # the lecture's 0.1 -> 0.01
    assert make_configs({"lr": 3e-3, "min_lr": 1e-5})[0].min_lr == 1e-5
