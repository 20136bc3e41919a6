"""``makemore train`` under torchrun: 2 CPU processes (gloo) train as one process on the global batch.

Each test that launches torchrun runs ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m makemore train ...`` as a user would, with OMP_NUM_THREADS=1 so that the two
ranks share a small machine; a launch costs a few seconds, so the file launches seven times.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from makemore import checkpoint
from makemore.cli import load_model, main
from makemore.data import load_source
from makemore.models import build_model
from makemore.train import CHECKPOINT, METRICS, make_configs, train
from makemore.train.distributed import stream_seed
from makemore.train.optim import learning_rate, make_optimizer

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip(
        "torch.distributed with the gloo backend is not available in this build of torch", allow_module_level=True
    )

# A tiny normalisation-free model: DDP's averaged gradient is then the gradient of the global batch.
# Windows layout: one target per row, so the mean loss over the global batch is the mean of the ranks' means.
TINY_MODEL = dict(model="gated", n_embd=8, n_skip=8, n_levels=2, stacks=1)
TINY = dict(TINY_MODEL, batch_size=16, optimizer="adamw", lr=1e-2, decay_at=1.0, dtype="float32")
REPORTING = ["--quiet", "--samples", "0", "--log-interval", "1", "--eval-max-tokens", "1000"]
STEPS = 4


def flags(settings: dict) -> list[str]:
    return [arg for name, value in settings.items() for arg in ("--" + name.replace("_", "-"), str(value))]


def torchrun_command(*argv, nproc: int = 2) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, "-m", "makemore", "train", *map(str, argv)], env


def torchrun(*argv, nproc: int = 2) -> subprocess.CompletedProcess:
    command, env = torchrun_command(*argv, nproc=nproc)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)  # a hang guard only


def single_process_on_the_global_batch(settings: dict, steps: int):
    """The loop's arithmetic in one process, each step on rank 0's batch and rank 1's concatenated,
    drawn from the generators the loop builds: rank 0 the stream after init, rank 1 its own seed."""
    config, model_config = make_configs({**settings, "max_steps": steps})
    source = load_source(config.data, config.kind, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, replace(model_config, vocab_size=len(source.vocab)))
    generators = [
        torch.Generator().set_state(torch.get_rng_state()),
        torch.Generator().manual_seed(stream_seed(config.seed, 1)),
    ]
    optimizer = make_optimizer(config, model)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step / config.max_steps)
        batches = [
            source.batch("train", config.batch_size, config.layout, model.receptive_field, g, config.seq_len)
            for g in generators
        ]
        _, loss = model(torch.cat([b.idx for b in batches]), torch.cat([b.targets for b in batches]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.state_dict(), torch.tensor(losses)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Four steps in 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "straight"
    result = torchrun(*flags(TINY), "--max-steps", STEPS, *REPORTING, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_two_processes_train_as_one_on_the_global_batch(straight):
    """The parameters after 4 AdamW steps match one process on the 32-row global batch.

    Tolerance: DDP averages the two ranks' float32 gradients (gloo's all-reduce, then / 2) where the
    reference reduces the 32 rows in one pass, so the gradients agree only to float32 rounding
    (~1e-7 relative). AdamW divides each update by the gradient's running RMS, so the rounding
    reaches the parameters at about a unit in the last place and does not grow over a few steps
    (measured: 1.2e-7 absolute at most, on weights up to 2.5). rtol 1e-5 with atol 1e-6 covers it
    with room, while one wrong batch (rank 1's stream, or rows out of order) moves parameters by
    ~lr = 1e-2.
    """
    out, result = straight
    ours = checkpoint.load(out / CHECKPOINT)
    theirs, losses = single_process_on_the_global_batch(TINY, STEPS)
    assert ours["step"] == STEPS and ours["world_size"] == 2 and len(ours["generators"]) == 2
    assert set(ours["model"]) == set(theirs)  # the unwrapped module's names: no "module." prefix
    for name, value in theirs.items():
        torch.testing.assert_close(ours["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ours["losses"], losses, rtol=1e-5, atol=1e-6)  # logged: the mean over the ranks
    logged = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, STEPS + 1))  # rank 0 alone writes the log
    assert "final" in logged[-1] and result.stdout.startswith("train ")  # and prints once
    assert result.stdout.count("train ") == 1
    model, _ = load_model(out)  # `makemore sample/eval` load it as any checkpoint
    assert model.receptive_field == 4


def test_resume_under_torchrun_continues_each_ranks_stream(straight, tmp_path):
    """2 steps, then --resume to 4: the same parameters, losses and generator states as 4 steps straight."""
    split = tmp_path / "split"
    result = torchrun(*flags(TINY), "--max-steps", 2, *REPORTING, "--out", split)
    assert result.returncode == 0, result.stderr
    result = torchrun("--resume", "--max-steps", STEPS, *REPORTING, "--out", split)
    assert result.returncode == 0, result.stderr
    a, b = checkpoint.load(straight[0] / CHECKPOINT), checkpoint.load(split / CHECKPOINT)
    assert a["step"] == b["step"] == STEPS
    assert torch.equal(a["losses"], b["losses"])
    assert all(torch.equal(x, y) for x, y in zip(a["generators"], b["generators"], strict=True))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resuming_with_another_number_of_processes_is_one_clear_error(straight, capsys):
    assert main(["train", "--resume", "--out", str(straight[0]), *REPORTING]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained by 2 process(es)" in err


def test_a_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """Each rank's clock differs; the loop stops on the largest, so no rank is left waiting in an all-reduce."""
    out = tmp_path / "timed"
    result = torchrun(*flags(TINY), "--max-steps", 10**6, "--max-seconds", 0.5, *REPORTING, "--out", out)
    assert result.returncode == 0, result.stderr
    state = checkpoint.load(out / CHECKPOINT)
    assert 0 < state["step"] < 10**6 and 0.5 <= state["elapsed"]


def test_a_batchnorm_model_fails_on_every_rank_with_one_line(tmp_path):
    result = torchrun("--model", "wavenet", "--max-steps", 3, "--quiet", "--samples", "0", "--out", tmp_path / "bn")
    assert result.returncode != 0
    line = "makemore train: error: --model wavenet uses BatchNorm"
    assert result.stderr.count(line) == 2 and "--model gated" in result.stderr  # one line per rank
    # The ranks print no traceback; only torchrun reports the failed children, in its own frames.
    frames = [row for row in result.stderr.splitlines() if row.lstrip().startswith('File "')]
    assert not [row for row in frames if "makemore" in row and "torch" not in row], result.stderr
    assert not (tmp_path / "bn" / CHECKPOINT).exists()


def test_a_fitted_model_fails_with_one_line_before_joining(tmp_path, capsys, monkeypatch):
    """Checked before init_process_group: no rendezvous is needed to fail (none is set up here)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--recipe", "bigram", "--out", str(tmp_path / "bigram"), "--quiet", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model ngram is fitted in one pass" in err
    assert not dist.is_initialized()


def test_one_process_under_torchrun_is_a_plain_run(tmp_path, monkeypatch):
    """World size 1 through the DDP path (a gloo group of one, in this process) gives the plain run's bits."""
    config, model_config = make_configs({**TINY, "max_steps": 20, "log_interval": 5, "eval_max_tokens": 1000})
    train(config, model_config, tmp_path / "plain", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    ).items():
        monkeypatch.setenv(name, value)
    train(config, model_config, tmp_path / "ddp", progress=False)
    assert not dist.is_initialized()  # torn down
    a, b = checkpoint.load(tmp_path / "plain" / CHECKPOINT), checkpoint.load(tmp_path / "ddp" / CHECKPOINT)
    assert torch.equal(a["losses"], b["losses"]) and torch.equal(a["generator"], b["generator"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def workers(agent: int) -> dict[int, int]:
    """The ranks torchrun's agent ``agent`` started, and their pids (its children, with RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == agent else []
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
        for variable in environ:
            if variable.startswith(b"RANK="):
                found[int(variable[5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_killed_rank_stops_the_job_and_the_last_checkpoint_resumes(tmp_path):
    """SIGKILL rank 1 mid-run: rank 0 (the writer) loses it in its next collective (gloo sees the connection
    reset at once; no timeout is involved), torchrun stops the job and names the killed rank, and the last
    checkpoint is whole and resumes. Bounded: 120 s from the kill to the end of the job."""
    out = tmp_path / "killed"
    command, env = torchrun_command(
        *flags(TINY), "--max-steps", 10**6, "--checkpoint-interval", 5, *REPORTING, "--out", out
    )
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ((out / CHECKPOINT).exists() and len(workers(job.pid)) == 2):
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint from the 2 ranks"
            time.sleep(0.01)
        os.kill(workers(job.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:  # still running: the assertion below reports it
            for pid in workers(job.pid).values():
                os.kill(pid, signal.SIGKILL)
            job.kill()
            job.communicate()
    assert job.returncode != 0 and time.monotonic() - killed < 120
    # torchrun lists every rank that ended: rank 1 by SIGKILL, and rank 0 (if it noticed first) by its own clean
    # exit 2, never an abort. Which of the two torchrun calls the "root cause" is a race of its monitor, not ours.
    failures = err.split("Failures:")[-1].split("[")[1:]
    reports = {int(f.split("rank      : ")[1].split()[0]): f for f in failures if "rank      : " in f}
    assert 1 in reports and "Signal 9 (SIGKILL)" in reports[1], err
    assert 0 not in reports or "exitcode  : 2" in reports[0], err
    # Rank 0 says so in one line if it notices before torchrun stops it, and never with a traceback.
    for line in err.splitlines():
        if "makemore train: error:" in line:
            assert (
                "lost contact with another process of this job" in line
                and "continue with the same command and --resume" in line
            ), err
    frames = [row for row in err.splitlines() if row.lstrip().startswith('File "') or "Traceback" in row]
    assert not [row for row in frames if "[rank" in row], err

    state = checkpoint.load(out / CHECKPOINT)  # whole, whatever the moment
    assert state["step"] > 0 and state["step"] % 5 == 0 and state["world_size"] == 2
    result = torchrun("--resume", "--max-steps", state["step"] + 3, *REPORTING, "--out", out)
    assert result.returncode == 0, result.stderr
    resumed = checkpoint.load(out / CHECKPOINT)
    assert resumed["step"] == state["step"] + 3 and torch.equal(resumed["losses"][: state["step"]], state["losses"])
    assert not list(out.glob("ckpt.pt.*.tmp")) and not (out / ".lock").exists()
