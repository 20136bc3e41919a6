"""Crashes and faults, end to end through the ``makemore`` command.

- A training killed with SIGKILL at any moment, also while it writes its checkpoint, loses at most
  the steps since its last checkpoint, and ``--resume`` then finishes the run an uninterrupted one
  would have been, bit for bit.
- One training per run directory: a second is refused while the first runs; a lock left by a killed
  training is taken over.
- A diverging loss stops training with one line before anything diverged is logged or saved; the
  last good checkpoint resumes, at a lower learning rate.

Subprocesses run ``python -m makemore train`` (or ``python -c`` with a patch applied first, for a
kill that must land inside a write) on one thread each, every wait bounded in time.
"""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from makemore import checkpoint
from makemore.cli import main
from makemore.train import CHECKPOINT, METRICS, make_configs, train
from makemore.train.lock import LOCK

INTERVAL = 20  # steps between checkpoints, and between log lines
# A tiny WaveNet at a constant learning rate (decay_at 1.0): the schedule then does not depend on
# --max-steps, so a run started towards 10**6 steps and killed can be continued to any step.
TINY = "--data names --n-embd 8 --n-hidden 16 --batch-size 32 --decay-at 1.0".split()
TINY += ["--log-interval", INTERVAL, "--checkpoint-interval", INTERVAL, "--dtype", "float32"]
REPORTING = ["--eval-max-tokens", 1000, "--quiet", "--samples", 0]  # what a resumed run is given again
STEPS = 160  # where the resumed runs and the uninterrupted reference stop
TIMEOUT = 300  # seconds: a hang guard only; the machine may be shared and paused
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")  # the runs in this process too


def start(out, *argv, prelude: str = "") -> subprocess.Popen:
    """``python -m makemore train TINY... --out OUT ...`` in the background (with --resume: without TINY, which it
    may not change); with ``prelude``, that code runs first (``python -c``)."""
    settings = [] if "--resume" in argv else TINY
    args = ["train", *map(str, settings + REPORTING), "--out", str(out), *map(str, argv)]
    if prelude:
        command = [
            sys.executable,
            "-c",
            prelude + "\nimport sys\nfrom makemore.cli import main\nraise SystemExit(main(sys.argv[1:]))",
            *args,
        ]
    else:
        command = [sys.executable, "-m", "makemore", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"makemore train still ran after {TIMEOUT} s: {err}")
    return process.returncode, err


def makemore_train(out, *argv) -> None:
    process = start(out, *argv)
    code, err = finish(process)
    assert code == 0, err


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"makemore train exited ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {TIMEOUT} s")
        time.sleep(0.005)


def kill(process: subprocess.Popen) -> None:
    assert process.poll() is None, "the training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL


def loads(path) -> bool:
    try:
        checkpoint.load(path)
        return True
    except checkpoint.CheckpointError:
        return False


def temporaries(out) -> list[str]:
    return sorted(p.name for p in out.glob(f"{CHECKPOINT}.*.tmp"))


def logged_losses(out) -> dict[int, float]:
    records = []
    for line in (out / METRICS).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line, if a kill cut it short
            continue
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of TINY, by their number of steps (made once each)."""
    runs = {}

    def run(steps: int):
        if steps not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            makemore_train(out, "--max-steps", steps)
            runs[steps] = out
        return runs[steps]

    return run


def assert_same_run(out, reference_out) -> None:
    """The same per-step losses, weights, optimiser state and batch stream; the same logged losses."""
    a, b = checkpoint.load(out / CHECKPOINT), checkpoint.load(reference_out / CHECKPOINT)
    assert a["step"] == b["step"]
    assert torch.equal(a["losses"], b["losses"])
    assert torch.equal(a["generator"], b["generator"])
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in b["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(a["optimizer"]["state"][index][name]), torch.as_tensor(value)), (
                index,
                name,
            )
    assert logged_losses(out) == logged_losses(reference_out)


def test_a_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    process = start(out, "--max-steps", 10**6)
    wait_for(lambda: (out / CHECKPOINT).exists(), process, "first checkpoint")
    time.sleep(random.uniform(0.0, 0.2))  # a step, a log line, a checkpoint write: wherever it lands
    kill(process)

    assert loads(out / CHECKPOINT)  # whatever the moment: the old checkpoint or the new one, whole
    saved = checkpoint.load(out / CHECKPOINT)["step"]
    last_logged = max(logged_losses(out))
    # Each step is logged, then saved: the kill lost at most the steps since the last checkpoint
    # (or since the one it interrupted the writing of).
    assert saved % INTERVAL == 0 and last_logged - INTERVAL <= saved <= last_logged
    assert (out / LOCK).exists()  # SIGKILL leaves the lock: the resumed run takes it over

    steps = max(STEPS, saved + 2 * INTERVAL)  # (on a paused machine the kill may land late)
    makemore_train(out, "--resume", "--max-steps", steps)
    assert_same_run(out, reference(steps))
    assert not (out / LOCK).exists() and temporaries(out) == []


# Run first in the killed process: torch.save writes the third checkpoint's first half, syncs it,
# says so, then hangs, so that the kill lands inside the write.
HALF_A_WRITE = """
import io, os, pathlib, time, torch
_save, _saves = torch.save, []
def save(obj, f):
    _saves.append(1)
    if len(_saves) < 3:
        return _save(obj, f)
    buffer = io.BytesIO()
    _save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    pathlib.Path({marker!r}).touch()
    time.sleep(600)
torch.save = save
"""


def test_a_run_killed_while_writing_its_checkpoint_keeps_the_last_one_and_resumes(tmp_path, reference, capsys):
    out, marker = tmp_path / "run", tmp_path / "writing"
    process = start(out, "--max-steps", 10**6, prelude=HALF_A_WRITE.format(marker=str(marker)))
    wait_for(marker.exists, process, "the third checkpoint's write")
    kill(process)

    assert checkpoint.load(out / CHECKPOINT)["step"] == 2 * INTERVAL  # the second, whole
    [leftover] = temporaries(out)  # the third, half written
    assert "truncated" in str(pytest.raises(checkpoint.CheckpointError, checkpoint.load, out / leftover).value)
    assert main(["sample", "--out", str(out), "-n", "3"]) == 0  # the leftover is ignored
    assert len(capsys.readouterr().out.splitlines()) == 3

    makemore_train(out, "--resume", "--max-steps", STEPS)  # the leftover is removed
    assert_same_run(out, reference(STEPS))
    assert temporaries(out) == [] and not (out / LOCK).exists()


# One training per run directory.


def test_a_second_training_into_a_busy_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "new"
    first = start(out, "--max-steps", 10**6, "--max-seconds", 3)
    wait_for(lambda: (out / LOCK).exists(), first, "the lock")
    # The second: `makemore train` in this process, into the same directory, even with --force.
    assert (
        main(
            ["train", "--data", "names", "--max-steps", "5", "--out", str(out), "--force", "--quiet", "--samples", "0"]
        )
        == 2
    )
    assert first.poll() is None  # refused while the first was running
    err = capsys.readouterr().err
    assert (
        err == f"makemore train: error: {out} is in use by a running training (pid {first.pid}); "
        "wait for it or choose another --out\n"
    )
    code, first_err = finish(first)
    assert code == 0, first_err  # the first was not disturbed
    assert checkpoint.load(out / CHECKPOINT)["step"] > 0 and not (out / LOCK).exists()


# A whole run, quickly: five steps on names, nothing printed but the losses.
FIVE_STEPS = "train --data names --max-steps 5 --quiet --samples 0 --eval-max-tokens 1000".split()


def test_a_stale_lock_is_taken_over(tmp_path, dead_pid):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{dead_pid} {socket.gethostname()}\n")  # its training was killed
    assert main([*FIVE_STEPS, "--out", str(out)]) == 0
    assert checkpoint.load(out / CHECKPOINT)["step"] == 5 and not (out / LOCK).exists()


@pytest.mark.parametrize(
    "owner, message",
    [
        (
            lambda: f"{os.getppid()} {socket.gethostname()}",
            "is in use by a running training (pid {pid}); wait for it or choose another --out",
        ),
        (
            lambda: "4242 another-host",
            "is in use by a training on host another-host (pid 4242); "
            "wait for it or choose another --out (if no training runs there, delete",
        ),
        (lambda: "", "which names no process; if no training runs there, delete it"),
    ],
    ids=["live", "other-host", "empty"],
)
def test_a_lock_that_may_be_live_is_refused(tmp_path, capsys, owner, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(owner())
    assert main(["train", "--data", "names", "--max-steps", "5", "--out", str(out), "--quiet", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(pid=os.getppid()) in err, err
    assert (out / LOCK).read_text() == owner() and not (out / CHECKPOINT).exists()  # left as it was


@pytest.mark.parametrize(
    "error, code", [(KeyboardInterrupt, 130), (RuntimeError("a bug"), None)], ids=["ctrl-c", "bug"]
)
def test_the_lock_is_released_on_every_way_out(tmp_path, monkeypatch, error, code):
    """(Divergence: the tests below; SIGKILL cannot run any code: the next run takes the stale lock over, above.)"""

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("makemore.train.loop.plot_losses", fail)  # the last thing training does
    argv = [*FIVE_STEPS, "--out", str(tmp_path)]
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            main(argv)
    else:
        assert main(argv) == code
    assert (tmp_path / CHECKPOINT).exists() and not (tmp_path / LOCK).exists()


# Numerical faults.

DIVERGE = "--data names --n-embd 8 --n-hidden 16 --max-steps 100 --quiet --samples 0 --eval-max-tokens 1000".split()


def diverges(capsys, *argv) -> str:
    assert main(["train", *DIVERGE, *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and err.startswith("makemore train: error: the training loss diverged at step ")
        and "Traceback" not in err
    ), err
    return err


def test_a_huge_learning_rate_stops_at_once_and_writes_no_checkpoint(tmp_path, capsys):
    """Step 1's loss is fine; its update at lr 1e4 ruins the weights, and the checkpoint at step 1 would hold them:
    the check before every checkpoint computes the next step's loss on them, and refuses."""
    out = tmp_path / "run"
    err = diverges(capsys, "--lr", "1e4", "--checkpoint-interval", 1, "--log-interval", 1000, "--out", out)
    assert (
        "diverged at step 2 (" in err
        and "lower --lr (now 10000); no checkpoint was written: start over with --force and a lower --lr" in err
    )
    assert not (out / CHECKPOINT).exists() and not (out / LOCK).exists()
    assert logged_losses(out) == {}


def test_a_diverging_run_keeps_its_last_good_checkpoint_which_resumes_at_a_lower_rate(tmp_path, capsys):
    """The rate warms up over the whole run to a peak of 15 (SGD): the loss falls, then diverges."""
    out = tmp_path / "run"
    schedule = "--schedule cosine --warmup 1.0 --lr 15 --min-lr 15 --log-interval 10".split()
    err = diverges(capsys, *schedule, "--checkpoint-interval", INTERVAL, "--out", out)
    diverged = int(err.split("diverged at step ")[1].split(" ")[0])
    state = checkpoint.load(out / CHECKPOINT)
    # The last checkpoint whose weights were checked (by the loss of the step after it) is kept;
    # none after it was written.
    assert state["step"] == (diverged - 2) // INTERVAL * INTERVAL > 0
    assert (
        f"{out / CHECKPOINT} (step {state['step']}) is from before it: "
        f"continue it with `makemore train --out {out} --resume --lr 1.5`" in err
    )
    assert "the learning rate is too high: lower --lr (now 15, " in err
    assert bool(torch.isfinite(state["losses"]).all()) and float(state["losses"].max()) < 3 * math.log(27)
    assert max(logged_losses(out)) < diverged  # nothing diverged was logged either
    assert not (out / LOCK).exists()

    resume = "--resume --lr 1.5 --quiet --samples 0 --eval-max-tokens 1000".split()
    assert main(["train", "--out", str(out), *resume]) == 0
    resumed = checkpoint.load(out / CHECKPOINT)
    assert resumed["step"] == 100 and resumed["config"]["lr"] == 1.5
    assert torch.equal(resumed["losses"][: state["step"]], state["losses"])
    assert float(resumed["losses"][-INTERVAL:].mean()) < 3.0


def test_resuming_at_a_higher_rate_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *DIVERGE, "--max-steps", "5", "--out", str(out)]) == 0
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.2"]) == 2
    assert "--lr cannot change when resuming; only --max-steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(model="gated", n_levels=2, n_embd=8, n_hidden=8, n_skip=8, dropout=0.3, optimizer="adamw", lr=1e-2)],
    ids=["batchnorm", "dropout"],
)
def test_the_check_before_each_checkpoint_changes_nothing(tmp_path, settings):
    """It runs the next step's forward pass, which moves BatchNorm's running statistics and draws dropout masks:
    both are put back, so a checkpoint every step gives the bits of a run without checkpoints."""
    common = {
        "data": "names",
        "n_embd": 8,
        "n_hidden": 16,
        "max_steps": 30,
        "log_interval": 10,
        "eval_max_tokens": 1000,
        **settings,
    }
    for name, interval in (("every", 1), ("none", 1000)):
        config, model_config = make_configs({**common, "checkpoint_interval": interval})
        train(config, model_config, tmp_path / name, progress=False)
    a, b = checkpoint.load(tmp_path / "every" / CHECKPOINT), checkpoint.load(tmp_path / "none" / CHECKPOINT)
    assert torch.equal(a["losses"], b["losses"]) and torch.equal(a["generator"], b["generator"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _race_for_the_lock(out, barrier, wins, done) -> None:
    """One contender: wait for the other, take the lock, report, hold it until both have tried.

    Reading the lock is slowed (as on a slow network filesystem), so that both contenders see the stale
    lock before either replaces it: the window in which a check-then-replace takeover lets both win.
    """
    from makemore.train import lock

    read = lock._read

    def slow_read(path):
        text = read(path)
        time.sleep(0.02)
        return text

    lock._read = slow_read  # (in this forked child only)
    barrier.wait()
    try:
        lock.acquire(out)
        wins.put(os.getpid())
    except lock.InUseError:
        pass
    done.wait()  # the winner holds the lock (stays alive) until both have tried


def test_processes_racing_for_one_stale_lock_leave_exactly_one_winner(tmp_path, dead_pid):
    """20 times: a stale lock (its pid dead), two processes released at once to take it over; exactly one wins.
    (Without the directory's flock, the check-then-replace takeover let both win at the first attempt.)"""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(20):
        out = tmp_path / f"race{attempt}"
        out.mkdir()
        (out / LOCK).write_text(f"{dead_pid} {socket.gethostname()}\n")
        barrier, done, wins = context.Barrier(2), context.Barrier(3), context.Queue()
        racers = [context.Process(target=_race_for_the_lock, args=(out, barrier, wins, done)) for _ in range(2)]
        for racer in racers:
            racer.start()
        done.wait(timeout=TIMEOUT)
        for racer in racers:
            racer.join(timeout=TIMEOUT)
        winners = []
        while not wins.empty():
            winners.append(wins.get())
        assert len(winners) == 1, f"attempt {attempt}: {len(winners)} processes hold the lock"
