"""Training under torchrun that survives what a cluster does to it (2 CPU ranks, gloo; every wait bounded).

- SIGTERM to torchrun (what SLURM and Kubernetes send): every rank stops at the same step, rank 0
  writes the checkpoint, and resuming it equals the uninterrupted run bit for bit.
- Elastic restarts: with ``--max-restarts 1 ... --resume auto``, a rank SIGKILLed mid-run is
  restarted with the group from the last checkpoint, and the final weights equal an uninterrupted
  run's bit for bit (the resumed run replays each rank's batch stream and random state, and gloo's
  all-reduce of two ranks adds in a fixed order, so nothing is left to rounding).
- Two torchrun agents on 127.0.0.1 (--nnodes 2, c10d rendezvous), run with the README's cluster
  command, train as one process on the concatenated batch.
- A rank stopped with SIGSTOP ends the job within --dist-timeout, with one line naming it.
"""

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import (
    REPORTING,
    STEPS,
    TINY,
    flags,
    single_process_on_the_global_batch,
    torchrun,
    torchrun_command,
    workers,
)

from makemore import checkpoint
from makemore.train import CHECKPOINT, METRICS
from makemore.train.lock import LOCK

README = Path(__file__).parents[1] / "README.md"
TIMEOUT = 300  # a hang guard only


def run(command, env, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def stop(job: subprocess.Popen) -> None:
    """Kill what is left of a job (after a failed assertion), its workers first."""
    if job.poll() is None:
        for pid in workers(job.pid).values():
            os.kill(pid, signal.SIGKILL)
        job.kill()
    job.communicate()


def same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert torch.equal(a["losses"], b["losses"])
    assert all(torch.equal(x, y) for x, y in zip(a["generators"], b["generators"], strict=True))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def logged(out: Path) -> bool:
    return (out / METRICS).exists() and '"loss"' in (out / METRICS).read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-rank runs of TINY, by their number of steps."""
    runs = {}

    def make(steps: int) -> dict:
        if steps not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            result = torchrun(*flags(TINY), "--max-steps", steps, *REPORTING, "--out", out)
            assert result.returncode == 0, result.stderr
            runs[steps] = checkpoint.load(out / CHECKPOINT)
        return runs[steps]

    return make


def torchrun_script(script, source: str, *torchrun_flags: str) -> tuple[list[str], dict]:
    """torchrun running ``source`` (a wrapper around makemore's CLI, written to ``script``) as ``... train``."""
    script.write_text(source)
    command, env = torchrun_command()
    return [*command[: command.index("-m", 3)], *torchrun_flags, str(script), "train"], env


SLOW = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *args: time.sleep(0.1))  # slow steps: the signal lands within the first 20
from makemore.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, reference):
    out = tmp_path / "preempted"
    command, env = torchrun_script(tmp_path / "slow_steps.py", SLOW)
    command += [*map(str, flags(TINY)), "--max-steps", "20"]
    command += ["--checkpoint-interval", str(10**6), *REPORTING, "--out", str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not logged(out):
            assert job.poll() is None and time.monotonic() < deadline, "no logged step"
            time.sleep(0.01)
        job.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank and waits 30 s before SIGKILL
        _, err = job.communicate(timeout=60)
    finally:
        stop(job)
    state = checkpoint.load(out / CHECKPOINT)
    assert (
        0 < state["step"] < 20
        and state["world_size"] == 2
        and len(state["generators"]) == 2
        and not (out / LOCK).exists()
    )
    lines = [line for line in err.splitlines() if "makemore train:" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"makemore train: stopped by SIGTERM at step {state['step']}; checkpoint {out / CHECKPOINT} written; "
        f"continue with: torchrun --standalone --nproc-per-node 2 -m makemore train --out {out} --resume"
    ), err
    result = torchrun("--resume", "--max-steps", 20, *REPORTING, "--out", out)
    assert result.returncode == 0, result.stderr
    same_weights(checkpoint.load(out / CHECKPOINT), reference(20))


KILLER = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = 0
def kill_once(optimizer, args, kwargs):  # rank 1, first attempt only: SIGKILL itself after its optimiser step 13
    global steps
    steps += 1
    if steps == 13 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(kill_once)
from makemore.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_rank_killed_mid_run_is_restarted_from_the_last_checkpoint_and_ends_as_the_uninterrupted_run(
    tmp_path, reference
):
    out = tmp_path / "elastic"
    command, env = torchrun_script(tmp_path / "kill_rank_1_once.py", KILLER, "--max-restarts", "1")
    command += [
        "--resume",
        "auto",
        *map(str, flags(TINY)),
        "--max-steps",
        "20",
        "--checkpoint-interval",
        "5",
        *REPORTING,
        "--out",
        str(out),
    ]
    result = run(command, env)
    assert result.returncode == 0, result.stderr
    # Rank 1 was SIGKILLed; torchrun restarts the group on the first failure its monitor sees: rank 1's SIGKILL,
    # or rank 0's clean exit 2 after its one line ("lost contact"), whichever it polls first.
    assert (
        "failed (exitcode: -9) local_rank: 1" in result.stderr or "failed (exitcode: 2) local_rank: 0" in result.stderr
    ), result.stderr
    records = (out / METRICS).read_text()
    assert records.count('"run"') == 2 and '{"step": 10, "run"' in records  # ... and the restart resumed from step 10
    same_weights(checkpoint.load(out / CHECKPOINT), reference(20))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_cluster_command() -> list[str]:
    """The README's cluster command (section "More than one process"), as a list of arguments."""
    found = re.search(r"^torchrun --nnodes 2 --nproc-per-node 1 .*$", README.read_text(), re.MULTILINE)
    assert found, "the README's section 'More than one process' shows the cluster command"
    return shlex.split(found[0])


def test_two_torchrun_agents_on_one_machine_train_as_one_process_on_the_concatenated_batch(tmp_path):
    """The README's command on two "nodes" (both 127.0.0.1), one process each,
    with TINY's settings instead of the recipe.
    Tolerance as in test_distributed's two-process test (DDP's averaged float32 gradients against one pass)."""
    argv = readme_cluster_command()
    endpoint = argv[argv.index("--rdzv-endpoint") + 1]
    argv[argv.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{free_port()}"
    assert endpoint.startswith("HOST:")
    cut = argv.index("--recipe")
    assert argv[cut:] == ["--recipe", "shakespeare-60s", "--resume", "auto", "--out", "runs/cluster"]
    out = tmp_path / "cluster"
    command = [sys.executable, "-m", "torch.distributed.run", *argv[1:cut], "--resume", "auto", *map(str, flags(TINY))]
    command += ["--max-steps", str(STEPS), *REPORTING, "--out", str(out)]
    _, env = torchrun_command()
    # The second "node" starts once the first one's rendezvous store listens, as nodes of a real cluster come up one
    # after another: two agents that bind the endpoint in the same instant can both lose the race to host it.
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    port = int(command[command.index("--rdzv-endpoint") + 1].rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while agents[0].poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    agents.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        errors = [agent.communicate(timeout=TIMEOUT)[1] for agent in agents]
    finally:
        for agent in agents:
            stop(agent)
    assert [agent.returncode for agent in agents] == [0, 0], errors
    ours = checkpoint.load(out / CHECKPOINT)
    theirs, losses = single_process_on_the_global_batch(TINY, STEPS)
    assert ours["step"] == STEPS and ours["world_size"] == 2
    for name, value in theirs.items():
        torch.testing.assert_close(ours["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ours["losses"], losses, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_stopped_rank_ends_the_job_within_the_timeout_with_one_line_naming_it(tmp_path):
    """SIGSTOP rank 1: rank 0 waits --dist-timeout (3 s) in its next collective, names rank 1 in one line and exits;
    torchrun then stops the job (it gives the stopped rank its 30 s SIGTERM grace, then SIGKILLs it)."""
    out = tmp_path / "stopped"
    command, env = torchrun_command(*flags(TINY), "--max-steps", 10**6, "--dist-timeout", 3, *REPORTING, "--out", out)
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as file:
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=file, text=True, env=env)
    stopped = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (logged(out) and len(workers(job.pid)) == 2):
            assert job.poll() is None and time.monotonic() < deadline, "no logged step"
            time.sleep(0.01)
        ranks = workers(job.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped, paused = ranks[1], time.monotonic()
        while 0 in workers(job.pid):  # rank 0 waits in its next collective, then names rank 1 and exits
            assert time.monotonic() - paused < 60, "rank 0 still waits 60 s after rank 1 stopped"
            time.sleep(0.05)
        ended = time.monotonic() - paused
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)  # (torchrun would, after its 30 s SIGTERM grace: not waited for here)
        stop(job)
    err = stderr.read_text()
    lines = [line for line in err.splitlines() if "makemore train: error:" in line]
    assert len(lines) == 1 and "rank 0: rank 1 did not answer within --dist-timeout 3 s" in lines[0], err
    assert ended < 3 + 3 + 30, (
        err
    )  # the timeout, the 3 s rank 0 waits for other ranks to answer, room for a busy machine
