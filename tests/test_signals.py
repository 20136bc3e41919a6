"""SIGTERM and SIGINT, end to end through the ``makemore`` command.

- The first signal finishes the step, writes a checkpoint, releases the lock, prints one line with
  the exact resume command and exits 143 (SIGTERM) or 130 (SIGINT); resuming it finishes the run an
  uninterrupted one would have been, bit for bit.
- A second signal exits at once, even in the middle of writing a checkpoint; the last whole
  checkpoint stays and no temporary file is left.

Every wait is bounded (TIMEOUT, a hang guard only); the signal lands mid-run because the runs are
given 10**6 steps and are signalled once they have logged.
"""

import signal
import time

import pytest
from test_crash import REPORTING, TINY, assert_same_run, finish, loads, logged_losses, start, temporaries, wait_for

from makemore import checkpoint
from makemore.cli import main
from makemore.train import CHECKPOINT, METRICS
from makemore.train.lock import LOCK

pytestmark = pytest.mark.usefixtures("one_thread")


def logged(out) -> bool:
    return (out / METRICS).exists() and bool(logged_losses(out))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_the_run_resumes_to_the_uninterrupted_one(tmp_path, signum, code):
    out = tmp_path / "signalled"
    process = start(out, "--max-steps", 10**6)
    wait_for(lambda: logged(out), process, "a logged loss")
    process.send_signal(signum)
    returncode, err = finish(process)
    assert returncode == code, err
    state = checkpoint.load(out / CHECKPOINT)
    stopped = state["step"]
    lines = [line for line in err.splitlines() if line.startswith("makemore train:")]
    assert lines == [
        f"makemore train: stopped by {signal.Signals(signum).name} at step {stopped}; "
        f"checkpoint {out / CHECKPOINT} written; "
        f"continue with: makemore train --out {out} --resume"
    ], err
    assert "Traceback" not in err and not (out / LOCK).exists() and not temporaries(out)
    if signum == signal.SIGINT:
        return  # the same path as SIGTERM from here on: one resume comparison suffices
    steps = stopped + 30  # the resumed run crosses a log line and a checkpoint interval
    assert (
        main(["train", *map(str, REPORTING), "--out", str(out), "--resume", "--max-steps", str(steps)]) == 0
    )  # in this process: faster
    reference = tmp_path / "reference"
    assert main(["train", *map(str, TINY + REPORTING), "--out", str(reference), "--max-steps", str(steps)]) == 0
    assert_same_run(out, reference)


def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint_whole(tmp_path):
    """The second checkpoint's write is held up (a patched torch.save sleeps in it); the first signal waits for it
    to finish, the second ends the process there: the temporary file is removed, the step-20 checkpoint stays."""
    out = tmp_path / "twice"
    prelude = (
        "import pathlib, time, torch\n"
        "save, calls = torch.save, []\n"
        "def slow_save(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        f"        pathlib.Path({str(tmp_path / 'writing')!r}).touch()\n"
        "        time.sleep(600)\n"
        "    return save(*args, **kwargs)\n"
        "torch.save = slow_save\n"
    )
    process = start(out, "--max-steps", 10**6, prelude=prelude)
    wait_for(lambda: (tmp_path / "writing").exists(), process, "the second checkpoint's write")
    assert temporaries(out), "the write in progress has its temporary file"
    process.send_signal(signal.SIGTERM)
    time.sleep(
        1.0
    )  # (signals within signals.BURST = 0.5 s of the first count as one: one Ctrl-C under torchrun arrives twice)
    assert process.poll() is None, "the first signal waits for the step and its checkpoint"
    process.send_signal(signal.SIGTERM)
    returncode, err = finish(process)  # at once: well inside the 600 s sleep
    assert returncode == 143, err
    assert (
        f"stopped at once by a second SIGTERM; {out / CHECKPOINT} keeps the last checkpoint" in err
        and "Traceback" not in err
    )
    assert loads(out / CHECKPOINT) and checkpoint.load(out / CHECKPOINT)["step"] == 20
    assert not temporaries(out) and not (out / LOCK).exists()
