"""One training loop for every model.

Read it top to bottom as nanoGPT's train.py: set up (data, model, optimiser, resume), then per
step: learning rate, evaluate and checkpoint when due, forward and backward over the
micro-batches, clip, step, log. The host reads tensor values only when logging, checkpointing or
evaluating.

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
dropout. The ranks meet only in DDP's gradient all-reduce, at logging and checkpoint time (the
mean loss, the summed tokens, the generators' states) and, with ``--max-seconds``, once per step
on the largest clock, so that all stop at the same step with the same learning rate.

Faults: the run directory is locked for one training at a time (lock.py); a loss that diverges
stops training with one line before it is logged or saved (``check_divergence``), so the last
checkpoint is always a good one to resume, at a lower ``--lr``; a rank that loses its peers under
torchrun says so in one line; a process killed at any moment leaves the last checkpoint whole
(checkpoint.py) and its half-written temporary file is removed by the next run.
"""

import contextlib
import ctypes
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..data import IGNORE_INDEX, Vocab, load_source
from ..models import build_model
from . import distributed, lock
from .config import TrainConfig
from .evaluate import estimate_loss, evaluate
from .optim import learning_rate, make_optimizer
from .plots import plot_losses

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
DIVERGENCE_FACTOR = 3.0  # a loss this many times its start has diverged (check_divergence says why)


def train(config: TrainConfig, model_config, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train into ``out_dir`` (checkpoint, metrics.jsonl, loss.png) and return the final losses per split.

    Under torchrun: as one rank of the group; rank 0 returns the losses, the other ranks ``{}``.
    """
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as cleanup:  # undone in reverse on every way out: error, Ctrl-C, divergence
        if distributed.is_main_process():  # rank 0 alone, before the process group exists (lock.py says why)
            cleanup.enter_context(lock.hold(out_dir))
        cleanup.callback(distributed.teardown)  # the process group, if this run made one
        try:
            return _train(config, model_config, out_dir, resume, progress, cleanup)
        except RuntimeError as e:
            if distributed.world_size() > 1 and _lost_peer(e):
                if (out_dir / CHECKPOINT).exists():  # (rank 0 writes it whole or not at all: checkpoint.save)
                    after = f"{out_dir / CHECKPOINT} keeps the last checkpoint: continue with the same command and --resume"
                else:
                    after = "no checkpoint was written yet: run the same command again"
                raise LostPeerError(
                    f"rank {distributed.rank()}: lost contact with another process of this job ({_first_line(e).split('. ')[0]}): "
                    f"it failed or was killed (torchrun names it); {after}"
                ) from None
            raise


class LostPeerError(RuntimeError):
    """Under torchrun, another rank died or stopped answering in a collective; the message is one line."""


def _lost_peer(e: RuntimeError) -> bool:
    """A collective failed because a peer went away: torch's distributed errors (NCCL), or gloo's transport errors
    (plain RuntimeErrors: "Connection reset by peer", "Connection closed by peer", "Timed out waiting ...")."""
    return isinstance(e, torch.distributed.DistError) or "gloo/transport" in str(e)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if line.startswith("[") and "] " in line:  # gloo's "[.../pair.cc:537] " source location
        line = line.split("] ", 1)[1]
    return line[:160]


def _train(config: TrainConfig, model_config, out_dir: Path, resume: bool, progress: bool, cleanup: contextlib.ExitStack) -> dict:
    _keep_freed_memory()
    ddp = distributed.launched()
    rank, world_size = distributed.rank(), distributed.world_size()
    master_process = rank == 0
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
    device = distributed.device(config.device)

    torch.manual_seed(config.seed)
    model = build_model(config.model, model_config)
    if rank > 0:  # a random stream of this rank's own, for its batches and its dropout masks
        torch.manual_seed(distributed.stream_seed(config.seed, rank))
    generator = torch.Generator().set_state(torch.get_rng_state())  # rank 0: the stream the lecture's randint draws from
    eval_generator = torch.Generator().manual_seed(config.seed + 1)  # estimates never move the training stream
    if world_size > 1:
        distributed.check_supported(config.model, model)  # every rank fails alike before joining, so none waits
    if ddp:
        distributed.setup(device)
    model.to(device)
    R = model.receptive_field
    source.check(config.layout, R, config.seq_len)
    fits = hasattr(model, "fit")  # count models and the lecture's full-batch bigram: no minibatch steps
    optimizer = None if fits else make_optimizer(config, model)
    losses = torch.zeros(config.max_steps, device=device)  # per step, read back only when logging
    times = torch.zeros(config.max_steps, dtype=torch.float64)  # training clock at the end of each step
    step, elapsed = 0, 0.0
    if state is not None:
        _restore(state, out_dir / CHECKPOINT, model, optimizer, generator, rank, device)
        step, elapsed = state["step"], state["elapsed"]
        kept = min(step, config.max_steps)
        losses[:kept], times[:kept] = state["losses"][:kept].to(device), state["times"][:kept]
        if master_process:
            _truncate_metrics(out_dir / METRICS, step)
    averaged = step  # losses[:averaged] are means over the ranks
    checked = step  # losses[:checked] passed the divergence check
    saved = step if state is not None else None  # the step of this run's last checkpoint, known good

    def average_losses() -> None:
        """Under DDP, replace each rank's step losses since the last call by their mean over the ranks (at logging and checkpoints only)."""
        nonlocal averaged
        if ddp and averaged < step:
            distributed.mean_(losses[averaged:step])
        averaged = step

    def check_divergence(probe: bool) -> None:
        """Stop with one line if the training loss diverged: before a logged loss or a checkpoint, never after.

        Diverged: a step's loss since the last check is nan or inf, or their mean exceeds
        DIVERGENCE_FACTOR x max(the first step's loss, ln V). The first step's loss is where training
        starts (ln V for a uniform guess; higher for an over-confident init), and training lowers it;
        minibatch noise moves it by tenths, far from 3x (measured: the lecture recipe's first step is
        3.32 and no batch of 32 in its first 10,000 steps comes above it; the limit is 9.9). A
        too-high learning rate sends the loss to tens, thousands or nan within a few steps, so
        nothing in between needs telling apart.
        With ``probe`` (before a checkpoint) it also checks the current weights, the ones a
        checkpoint would hold: the losses so far were computed before the last update, which alone
        can ruin the weights (one step at --lr 1e4 does). The probe is the loss the next step will
        compute, on its batch, without moving anything (see _next_step_loss). Under torchrun every
        rank checks the same means, so all stop together. The host reads values here only.
        """
        nonlocal checked
        if fits or step == 0 or config.max_steps == 0:
            return
        average_losses()
        parts = [losses[0]] + ([losses[checked:step].mean()] if step > checked else [])
        if probe:
            parts.append(distributed.mean_(_next_step_loss(model, source, config, generator, R, autocast, device)))
        first, *seen = torch.stack(parts).tolist()
        uniform = math.log(model_config.vocab_size)
        start = max(first, uniform) if math.isfinite(first) else uniform
        limit = DIVERGENCE_FACTOR * start
        if all(value <= limit for value in seen):  # False for nan
            checked = step
            return
        if step > checked and not seen[0] <= limit:
            window = losses[checked:step].cpu()
            bad = (~(window <= limit)).nonzero()
            at = int(bad[0]) if len(bad) else 0
            diverged_at, value = checked + at + 1, float(window[at])
        else:
            diverged_at, value = step + 1, seen[-1]  # the probe: the loss of the step after this one
        raise FloatingPointError(_divergence_message(diverged_at, value, start, limit, config, _lr_of_step(config, diverged_at, times), out_dir, saved))

    def save_checkpoint() -> None:
        """Rank 0 writes, with every rank's generator state; the other ranks wait. Never a diverged state."""
        nonlocal saved
        check_divergence(probe=True)
        average_losses()
        generators = distributed.gather(generator.get_state())
        rng_states = distributed.gather(_rng_state(device))
        if master_process:
            checkpoint.save(
                {
                    "config": asdict(config),
                    "model_config": asdict(model_config),
                    "kind": source.kind,
                    "max_len": getattr(source, "max_len", 0),  # line data: the longest item, to bound sampling
                    "vocab": source.vocab.chars,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else {},
                    "generator": generator.get_state(),  # rank 0's (the only one in one process)
                    "generators": generators,  # every rank's, in rank order
                    "rng_states": rng_states,  # every rank's global random state (dropout), in rank order
                    "world_size": world_size,
                    "step": step,
                    "elapsed": elapsed,
                    "losses": losses[:step].cpu().clone(),  # a copy: a view would save the whole max_steps buffer
                    "times": times[:step].clone(),
                },
                out_dir / CHECKPOINT,
            )
        saved = step
        distributed.barrier()

    metrics = cleanup.enter_context(open(out_dir / METRICS, "a" if resume else "w")) if master_process else None  # a fresh run (--force) starts a fresh log

    def log(record: dict) -> None:
        if master_process:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.dtype == "bfloat16" else contextlib.nullcontext()
    if fits:
        model.fit(source.eval_batches("train", R, batch_tokens=1 << 20, max_tokens=sys.maxsize))
    else:
        step_model = _compiled(model, source, config, autocast, device) if config.compile else model
        if ddp:
            step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
        model.train()
        bar = tqdm(total=config.max_steps, initial=step, disable=not (progress and master_process), mininterval=1.0, unit="step", dynamic_ncols=True)
        cleanup.callback(bar.close)
        tokens = torch.zeros((), dtype=torch.int64, device=device)  # targets trained on since the last log
        last_step, last_elapsed = step, elapsed
        while step < config.max_steps and not (config.max_seconds and elapsed >= config.max_seconds):
            progress_fraction = max(step / config.max_steps, elapsed / config.max_seconds if config.max_seconds else 0.0)
            lr = learning_rate(config, progress_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.eval_interval and step % config.eval_interval == 0:
                if master_process:
                    log({"step": step, "time": elapsed, "estimate": estimate_loss(model, source, config, eval_generator, autocast, device)})
                distributed.barrier()

            start = time.perf_counter()
            for micro_step in range(config.grad_accum):
                if ddp:  # all-reduce the gradients once per step, in the last micro-batch's backward
                    step_model.require_backward_grad_sync = micro_step == config.grad_accum - 1
                batch = source.batch("train", config.batch_size, config.layout, R, generator, config.seq_len).to(device)
                with autocast:
                    _, loss = step_model(batch.idx, batch.targets)
                if config.grad_accum > 1:
                    loss = loss / config.grad_accum
                loss.backward()
                losses[step] += loss.detach()
                tokens += (batch.targets != IGNORE_INDEX).sum()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed += time.perf_counter() - start
            if ddp and config.max_seconds:  # one scalar: the slowest rank's clock, so every rank stops at the same step
                elapsed = distributed.maximum(elapsed)
            times[step - 1] = elapsed

            if step % config.log_interval == 0 or step == config.max_steps:
                check_divergence(probe=False)
                distributed.sum_(tokens)
                mean_loss = losses[last_step:step].mean().item()
                rate = tokens.item() / max(elapsed - last_elapsed, 1e-9)
                log({"step": step, "time": elapsed, "loss": mean_loss, "lr": lr, "tokens_per_s": rate})
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
                bar.update(step - last_step)
                tokens.zero_()
                last_step, last_elapsed = step, elapsed
            if step % config.checkpoint_interval == 0:
                save_checkpoint()
        bar.update(step - last_step)
        bar.close()
    save_checkpoint()

    result = {}
    if master_process:
        result = evaluate(model, source, max_tokens=config.eval_max_tokens, device=device)
        log({"step": step, "time": elapsed, "final": result})
        if step:
            plot_losses(losses[:step].cpu(), times[:step], out_dir / METRICS, out_dir / LOSS_PLOT)
    distributed.barrier()
    return result


def _restore(state: dict, path: Path, model, optimizer, generator: torch.Generator, rank: int, device: torch.device) -> None:
    """Load the checkpoint's weights, optimiser and random states, or say in one line which does not fit."""
    checkpoint.load_weights(model, state["model"], path)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state.get("generators", [state["generator"]])[rank])
        if "rng_states" in state:  # the global streams dropout draws from, so a resumed run draws the same masks
            _set_rng_state(state["rng_states"][rank], device)
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
    rng = _rng_state(device)
    peek = torch.Generator().set_state(generator.get_state())
    batch = source.batch("train", config.batch_size, config.layout, R, peek, config.seq_len).to(device)
    with autocast:
        _, loss = model(batch.idx, batch.targets)
    for b, saved in zip(model.buffers(), buffers, strict=True):
        b.copy_(saved)
    _set_rng_state(rng, device)
    return loss.detach().float().reshape(())


def _lr_of_step(config: TrainConfig, n: int, times: torch.Tensor) -> float:
    """The learning rate step ``n`` (1-based) trained with, as the loop set it: from the steps and the clock before it."""
    before = float(times[min(n - 2, len(times) - 1)]) if n >= 2 else 0.0
    return learning_rate(config, max((n - 1) / config.max_steps, before / config.max_seconds if config.max_seconds else 0.0))


def _divergence_message(step: int, value: float, start: float, limit: float, config: TrainConfig, lr: float, out_dir: Path, saved) -> str:
    now = f"now {config.lr:g}" + (f", {lr:g} at that step" if lr != config.lr else "")
    if saved:
        after = f"{out_dir / CHECKPOINT} (step {saved}) is from before it: continue it with `makemore train --out {out_dir} --resume --lr {config.lr / 10:g}`"
    else:
        after = "no checkpoint was written: start over with --force and a lower --lr, or with --grad-clip"
    return (
        f"the training loss diverged at step {step} ({value:.4g}, above {limit:.3g} = {DIVERGENCE_FACTOR:g} x {start:.3g}, where it started): "
        f"the learning rate is too high: lower --lr ({now}); {after}"
    )


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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
    """torch.compile(model), compiled now on one batch outside the training clock; the eager model where it cannot compile."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the warm-up step moves BatchNorm's running statistics
    try:
        compiled = torch.compile(model)
        batch = source.batch("train", config.batch_size, config.layout, model.receptive_field, torch.Generator(), config.seq_len).to(device)
        with autocast:
            _, loss = compiled(batch.idx, batch.targets)
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: say so and train eagerly
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"makemore: --compile failed ({reason[:200]}); training without compilation", file=sys.stderr)
        compiled = model
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    return compiled


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
