"""One training loop for every model.

Read it top to bottom as nanoGPT's train.py: set up (data, model, optimiser, resume), then per
step: learning rate, evaluate when due, forward and backward over the micro-batches, clip, step,
agree with the other ranks, log, checkpoint. What happens beside the loop is one small object
each: History (every step's loss and time, history.py), DivergenceGuard (divergence.py), Saver
(when and what to checkpoint, saver.py), Log (metrics.jsonl and the progress bar, log.py) and
Signals (SIGTERM / SIGINT, signals.py). The host reads tensor values only when logging,
checkpointing or evaluating.

The ``lecture`` recipe is lecture 5's run, step for step: ``torch.manual_seed(42)`` before init,
minibatches from ``torch.randint`` on the same random stream, SGD at lr 0.1 then 0.01 from step
150,000. The batches come from a private generator that starts where the global one stood after
init, so the run draws exactly the lecture's batches without touching global state, and its state
goes into checkpoints for an exact resume. The training clock (``--max-seconds``, tokens/s, the
time axis of the metrics) counts the steps only: evaluation, checkpoints and compilation are
outside it.

Under torchrun the loop is nanoGPT's DDP loop (distributed.py holds the process-group helpers):
``ddp`` says whether it runs, ``master_process`` (rank 0) writes checkpoints, metrics and the plot
and evaluates while the other ranks wait at a barrier, ``model`` stays the unwrapped module
(nanoGPT's ``raw_model``: what is saved, evaluated and clipped) and ``step_model`` is what steps
(compiled, then wrapped in DistributedDataParallel). Each rank draws ``--batch-size`` rows per
micro-batch from its own stream: rank 0 the single-process stream, so one process under torchrun
trains exactly as a plain run; rank r > 0 a stream seeded from (seed, r), which also drives its
dropout. The ranks meet in DDP's gradient all-reduce, at logging and checkpoint time (the mean
loss, the summed tokens, the generators' states) and once per step in one small all-reduce
(distributed.agree): the largest clock, so that all stop a time budget at the same step with the
same learning rate, and whether any rank got a stop signal or is due a checkpoint by time, so that
all stop or save at the same step. A rank that does not answer within ``--dist-timeout`` ends the
job with one line naming it.

Faults: the run directory is locked for one training at a time (lock.py); a loss that diverges
stops training with one line before it is logged or saved (divergence.py), so the last
checkpoint is always a good one to resume, at a lower ``--lr``; SIGTERM and SIGINT stop after the
step with a checkpoint (signals.py); a rank that loses its peers under torchrun says so in one
line; a process killed at any moment leaves the last checkpoint whole (checkpoint.py) and its
half-written temporary file is removed by the next run.
"""

import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..data import IGNORE_INDEX, Vocab, load_source
from ..models import build_model
from . import distributed, lock
from .config import TrainConfig, resolve_dtype
from .divergence import DivergenceGuard
from .evaluate import estimate_loss, evaluate
from .history import History
from .log import Log
from .optim import learning_rate, make_optimizer
from .plots import plot_losses
from .saver import Saver, rng_state, set_rng_state
from .signals import Signals, Stopped

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
clock = time.perf_counter  # the training clock (a test swaps in a fake one)


def train(config: TrainConfig, model_config, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train into ``out_dir`` (checkpoint, metrics.jsonl, loss.png) and return the final losses per split.

    Under torchrun: as one rank of the group; rank 0 returns the losses, the other ranks ``{}``.
    Raises ``Stopped`` after checkpointing on SIGTERM or SIGINT, ``Interrupted`` on a second one.
    """
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as cleanup:  # undone in reverse on every way out: error, signal, divergence
        if distributed.is_main_process():  # rank 0 alone, before the process group exists (lock.py says why)
            cleanup.enter_context(lock.hold(out_dir))
        cleanup.callback(distributed.teardown)  # the process group, if this run made one
        signals = cleanup.enter_context(Signals())
        try:
            return _train(config, model_config, out_dir, resume, progress, cleanup, signals)
        except RuntimeError as e:
            if distributed.world_size() > 1 and _lost_peer(e):
                raise LostPeerError(_lost_peer_message(e, config, out_dir)) from None
            raise


def _train(config, model_config, out_dir: Path, resume: bool, progress: bool, cleanup: contextlib.ExitStack, signals: Signals) -> dict:
    _keep_freed_memory()
    ddp, rank, world_size = distributed.launched(), distributed.rank(), distributed.world_size()
    master_process = rank == 0
    device = distributed.device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if master_process:
        checkpoint.remove_stale_temporaries(out_dir / CHECKPOINT)  # left by a run killed while it wrote
    state = checkpoint.load(out_dir / CHECKPOINT) if resume else None
    if state is not None and state.get("world_size", 1) != world_size:
        raise ValueError(
            f"{out_dir / CHECKPOINT} was trained by {state.get('world_size', 1)} process(es), each with its own batch stream; "
            f"resume it with that many (torchrun --nproc-per-node ...), not {world_size}"
        )
    source = load_source(config.data, config.kind, seed=config.seed, vocab=Vocab(state["vocab"]) if state else None)
    model_config = replace(model_config, vocab_size=len(source.vocab))

    torch.manual_seed(config.seed)
    model = build_model(config.model, model_config)
    if rank > 0:  # a random stream of this rank's own, for its batches and its dropout masks
        torch.manual_seed(distributed.stream_seed(config.seed, rank))
    generator = torch.Generator().set_state(torch.get_rng_state())  # rank 0: the stream the lecture's randint draws from
    eval_generator = torch.Generator().manual_seed(config.seed + 1)  # estimates never move the training stream
    if world_size > 1:
        distributed.check_supported(config.model, model)  # every rank fails alike before joining, so none waits
    if ddp:
        distributed.setup(device, config.dist_timeout)
    model.to(device)
    R = model.receptive_field
    source.check(config.layout, R, config.seq_len)
    optimizer = None if model.fitted else make_optimizer(config, model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    history = History(config.max_steps, device)
    if state is not None:
        _restore(state, out_dir / CHECKPOINT, model, optimizer, generator, rank, device)
        history.restore(state)
        if master_process:
            _truncate_metrics(out_dir / METRICS, history.step)
    run_info = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "world_size": world_size}
    guard = DivergenceGuard(history, config, model_config.vocab_size, out_dir, out_dir / CHECKPOINT)
    probe = partial(_next_step_loss, model, source, config, generator, R, autocast, device)
    saver = Saver(out_dir / CHECKPOINT, config, model_config, source, model, optimizer, generator, guard, probe, run_info)
    if master_process and progress:
        print(f"makemore: training on {device} in {run_info['dtype']}" + (f", {world_size} processes" if ddp else ""), file=sys.stderr)
    log = Log(out_dir / METRICS, config, writer=master_process, append=resume, bar=progress and not model.fitted, step=history.step, elapsed=history.elapsed)
    cleanup.callback(log.close)
    log.record({"step": history.step, "run": run_info})

    if model.fitted:
        model.fit(source.eval_batches("train", R, batch_tokens=1 << 20, max_tokens=sys.maxsize))
    else:
        step_model = _compiled(model, source, config, autocast, device) if config.compile else model
        if ddp:
            step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
        model.train()
        tokens = torch.zeros((), dtype=torch.int64, device=device)  # targets trained on since the last log
        logged_elapsed = history.elapsed
        while history.step < config.max_steps and not (config.max_seconds and history.elapsed >= config.max_seconds):
            lr = learning_rate(config, history.progress(config.max_steps, config.max_seconds))
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.eval_interval and history.step % config.eval_interval == 0:
                if master_process:
                    log.record({"step": history.step, "time": history.elapsed, "estimate": estimate_loss(model, source, config, eval_generator, autocast, device)})
                distributed.barrier()

            start = clock()
            for micro_step in range(config.grad_accum):
                if ddp:  # all-reduce the gradients once per step, in the last micro-batch's backward
                    step_model.require_backward_grad_sync = micro_step == config.grad_accum - 1
                batch = source.batch("train", config.batch_size, config.layout, R, generator, config.seq_len).to(device)
                with autocast:
                    _, loss = step_model(batch.idx, batch.targets)
                loss = loss / config.grad_accum
                loss.backward()
                history.losses[history.step] += loss.detach()
                tokens += (batch.targets != IGNORE_INDEX).sum()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Every rank acts on the same values: the slowest clock (so all stop at the same step), a signal any rank got,
            # a checkpoint any rank's wall clock asks for. One small all-reduce under torchrun; nothing in one process.
            elapsed, stop, save = distributed.agree(history.elapsed + clock() - start, bool(signals.received), saver.due(history.step + 1))
            history.end_step(elapsed)
            step = history.step

            if step % config.log_interval == 0 or step == config.max_steps:
                guard.check()
                distributed.sum_(tokens)
                rate = tokens.item() / max(elapsed - logged_elapsed, 1e-9)
                mean_loss = history.mean_since((step - 1) // config.log_interval * config.log_interval)
                log.record({"step": step, "time": elapsed, "loss": mean_loss, "lr": lr, "tokens_per_s": rate})
                log.progress(step, elapsed, loss=f"{mean_loss:.4f}", tok_s=f"{rate:,.0f}")
                tokens.zero_()
                logged_elapsed = elapsed
            if save or stop:
                saver.save(history)
            if stop:
                raise Stopped(signals.received or signal.SIGTERM, step)  # (another rank's signal)
        log.progress(history.step, history.elapsed)
    saver.save(history)
    if signals.received:  # during the final checkpoint: it is written; skip the evaluation
        raise Stopped(signals.received, history.step)

    result = {}
    if master_process:
        result = evaluate(model, source, max_tokens=config.eval_max_tokens, device=device)
        log.record({"step": history.step, "time": history.elapsed, "final": result})
        if history.step:
            plot_losses(history.losses[: history.step].cpu(), history.times[: history.step], out_dir / METRICS, out_dir / LOSS_PLOT)
    distributed.barrier()
    return result


class LostPeerError(RuntimeError):
    """Under torchrun, another rank died or stopped answering in a collective; the message is one line."""


def _lost_peer(e: RuntimeError) -> bool:
    """A collective failed because a peer went away or timed out: torch's distributed errors (NCCL), or gloo's transport errors
    (plain RuntimeErrors: "Connection reset by peer", "Connection closed by peer", "Timed out waiting ...")."""
    return isinstance(e, torch.distributed.DistError) or "gloo/transport" in str(e) or "Timed out" in str(e)


def _lost_peer_message(e: RuntimeError, config: TrainConfig, out_dir: Path) -> str:
    if (out_dir / CHECKPOINT).exists():  # (rank 0 writes it whole or not at all: checkpoint.save)
        after = f"{out_dir / CHECKPOINT} keeps the last checkpoint: continue with the same command and --resume"
    else:
        after = "no checkpoint was written yet: run the same command again"
    me = f"rank {distributed.rank()}"
    if "Timed out" in str(e) or "timed out" in str(e):
        silent = distributed.unanswered_ranks()
        who = ", ".join(f"rank {r}" for r in silent) or "another rank"
        return (
            f"{me}: {who} did not answer within --dist-timeout {config.dist_timeout:g} s (stopped, hung, or far slower than the others): "
            f"ending the job; {after}"
        )
    return f"{me}: lost contact with another process of this job ({_first_line(e).split('. ')[0]}): it failed or was killed (torchrun names it); {after}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if line.startswith("[") and "] " in line:  # gloo's "[.../pair.cc:537] " source location
        line = line.split("] ", 1)[1]
    return line[:160]


def _restore(state: dict, path: Path, model, optimizer, generator: torch.Generator, rank: int, device: torch.device) -> None:
    """Load the checkpoint's weights, optimiser and random states, or say in one line which does not fit."""
    checkpoint.load_weights(model, state["model"], path)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state.get("generators", [state["generator"]])[rank])
        if "rng_states" in state:  # the global streams dropout draws from, so a resumed run draws the same masks
            set_rng_state(state["rng_states"][rank], device)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: its optimiser or random-number state does not fit this run ({_first_line(e)}); "
            f"the file was edited or comes from another program: restore it or retrain with `makemore train --out {path.parent} --force`"
        ) from None


@torch.no_grad()
def _next_step_loss(model, source, config: TrainConfig, generator: torch.Generator, R: int, autocast, device) -> torch.Tensor:
    """The loss the next training step will compute (its batch, the current weights, training mode), leaving no trace.

    The batch comes from a copy of the training generator, BatchNorm's running statistics are put
    back, and so is the global random state that dropout draws from: the run goes on bit for bit
    as if this had not been computed.
    """
    buffers = [b.clone() for b in model.buffers()]
    rng = rng_state(device)
    peek = torch.Generator().set_state(generator.get_state())
    batch = source.batch("train", config.batch_size, config.layout, R, peek, config.seq_len).to(device)
    with autocast:
        _, loss = model(batch.idx, batch.targets)
    for b, saved in zip(model.buffers(), buffers, strict=True):
        b.copy_(saved)
    set_rng_state(rng, device)
    return loss.detach().float().reshape(())


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed activation buffers (up to 32 MiB each) for reuse.

    By default it hands blocks above its mmap threshold back to the kernel at every free, so
    each step's activations are mapped afresh and page-faulted in: measured on our CPU, 2.1
    million page faults in 1,800 steps of the ``fast`` recipe, against 73 thousand with this, and
    a step 15-30% faster. Linux with glibc only; elsewhere nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _compiled(model, source, config: TrainConfig, autocast, device):
    """torch.compile(model), compiled now on one batch outside the training clock; the eager model where it
    cannot compile, or where the compiled model fails ``_follows_its_parameters``."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the warm-up step moves BatchNorm's running statistics
    try:
        compiled = torch.compile(model, mode=None if config.compile_mode == "default" else config.compile_mode)
        batch = source.batch("train", config.batch_size, config.layout, model.receptive_field, torch.Generator(), config.seq_len).to(device)
        with autocast:
            _, loss = compiled(batch.idx, batch.targets)
        loss.backward()
        reason = _follows_its_parameters(model, compiled, batch, autocast)
    except Exception as e:  # noqa: BLE001 - any compiler failure: say so and train eagerly
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if reason:
        print(f"makemore: --compile failed ({reason}); training without compilation", file=sys.stderr)
        compiled = model
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    return compiled


def _follows_its_parameters(model, compiled, batch, autocast) -> str | None:
    """Why the compiled model cannot be trained, or None: it must see its parameters change in place.

    On an H100 (torch 2.11, 2026-11-27) the compiled gated WaveNet trained to nothing, its loss staying
    at the first step's while eager training learned (docs/results/gpu). With every parameter zeroed in
    place, each model here gives logits 0 whatever its dropout draws: the loss is exactly ln V and the
    output bias's gradient is the same in eager and compiled runs. A compiled graph that kept the old
    weights fails this. (Startup only: the one host read here is outside the training clock.)
    """
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    grads = []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        with autocast:
            logits, loss = run(batch.idx, batch.targets)
        loss.backward()
        grads.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).float().flatten() for p in model.parameters()]))
    uniform = math.log(logits.shape[-1])
    if not abs(loss.item() - uniform) < 1e-3 or not torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-4):
        return f"the compiled model does not follow its parameters: with all of them 0 its loss is {loss.item():.4f}, not ln V = {uniform:.4f}, or its gradient differs from eager"
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` and final results, so a resumed run's log reads as one uninterrupted run."""
    if not path.is_file():
        return
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill (the last one): it was never complete
            continue
    kept = [r for r in records if r["step"] <= step and "final" not in r and not ("estimate" in r and r["step"] == step)]
    tmp = path.with_name(path.name + ".tmp")  # replaced whole: a kill now leaves the old log or the new one
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
