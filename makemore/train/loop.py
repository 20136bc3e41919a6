"""One training loop for every model.

Read it as nanoGPT's train.py: ``setup`` (run.py) builds the run once; then each step sets the
learning rate, evaluates when due (keeping the best checkpoint), runs forward and backward over the
micro-batches, clips, steps, agrees with the other ranks, logs and checkpoints. What happens
beside the loop is one small object each: Run (run.py), DivergenceGuard (divergence.py), Saver
(ckpt.pt and best.pt, saver.py), Log (metrics.jsonl and the progress bar, log.py) and Signals
(SIGTERM / SIGINT, signals.py). The host reads tensor values only when logging, checkpointing or
evaluating. The training clock (``--max-seconds``, tokens/s, the metrics' time axis) counts the
steps only: evaluation, checkpoints and compilation are outside it.

Under torchrun the loop is nanoGPT's DDP loop: rank 0 (``master_process``) writes and evaluates
while the other ranks wait at a barrier; ``run.model`` stays the unwrapped module and
``step_model`` is what steps (compiled, then wrapped in DistributedDataParallel). Each rank draws
``--batch-size`` rows per micro-batch from its own stream. The ranks meet in DDP's all-reduce, at
logging and checkpoint time, and once per step in one small all-reduce (distributed.agree): the
largest clock, so that all stop a time budget at the same step, and whether any rank got a stop
signal or is due a checkpoint, so that all act at the same step; after an evaluation, whether rank 0 ran
out of --patience. A rank
that does not answer within ``--dist-timeout`` ends the job with one line naming it.

Faults: the run directory is locked for one training at a time (lock.py); a diverging loss stops
training with one line before it is logged or saved (divergence.py), so the last checkpoint is a
good one to resume at a lower ``--lr``; SIGTERM and SIGINT stop after the step with a checkpoint
(signals.py); a process killed at any moment leaves the last checkpoint whole (checkpoint.py).
"""

import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from ..data import IGNORE_INDEX
from . import distributed, lock
from .compile import compiled
from .config import TrainConfig
from .divergence import DivergenceGuard
from .evaluate import estimate_loss, evaluate
from .log import Log
from .optim import learning_rate
from .plots import plot_losses
from .run import BEST, CHECKPOINT, LOSS_PLOT, METRICS, Run, first_line, setup
from .saver import Saver
from .signals import Signals, Stopped

clock = time.perf_counter  # the training clock (a test swaps in a fake one)


def train(config: TrainConfig, model_config, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train into ``out_dir`` (ckpt.pt, best.pt, metrics.jsonl, loss.png); return the last weights' losses per split.

    The final record of metrics.jsonl holds them and, where the run kept a best checkpoint, that one's too
    (``final_record``). Under torchrun rank 0 returns the losses, the other ranks ``{}``. Raises ``Stopped``
    after checkpointing on SIGTERM or SIGINT, ``Interrupted`` on a second one.
    """
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as cleanup:  # undone in reverse on every way out: error, signal, divergence
        if distributed.is_main_process():  # rank 0 alone, before the process group exists (lock.py says why)
            cleanup.enter_context(lock.hold(out_dir))
        cleanup.callback(distributed.teardown)  # the process group, if this run made one
        signals = cleanup.enter_context(Signals())
        try:
            _keep_freed_memory()
            run = setup(config, model_config, out_dir, resume)
            if run.master_process and resume:
                _truncate_metrics(run.path(METRICS), run.history.step)
            log = cleanup.enter_context(Log(run, append=resume, bar=progress))
            if run.master_process and progress:
                processes = f", {run.world_size} processes" if distributed.launched() else ""
                print(f"makemore: training on {run.device} in {run.info['dtype']}{processes}", file=sys.stderr)
            return _train(run, log, signals)
        except RuntimeError as e:
            if distributed.world_size() > 1 and _lost_peer(e):
                raise LostPeerError(_lost_peer_message(e, config, out_dir)) from None
            raise


def _train(run: Run, log: Log, signals: Signals) -> dict:
    config, model, optimizer, history = run.config, run.model, run.optimizer, run.history
    guard = DivergenceGuard(run)
    saver = Saver(run, guard)
    log.record({"step": history.step, "run": run.info})
    if model.fitted:
        model.fit(run.source.eval_batches("train", model.receptive_field, batch_tokens=1 << 20, max_tokens=sys.maxsize))
    else:
        step_model = compiled(run) if config.compile else model
        if distributed.launched():
            step_model = DistributedDataParallel(
                step_model, device_ids=[run.device.index] if run.device.type == "cuda" else None
            )
        model.train()
        tokens = torch.zeros((), dtype=torch.int64, device=run.device)  # targets trained on since the last log
        logged_elapsed = history.elapsed
        while history.step < config.max_steps and not (config.max_seconds and history.elapsed >= config.max_seconds):
            # the learning rate of this step
            lr = learning_rate(config, history.progress(config.max_steps, config.max_seconds))
            for group in optimizer.param_groups:
                group["lr"] = lr

            # evaluate when due, keep the best weights (outside the training clock)
            if config.eval_interval and history.step % config.eval_interval == 0 and _estimate(run, log, saver):
                break  # out of --patience: this step's weights were just estimated

            # forward and backward over the micro-batches, then the update
            start = clock()
            for micro_step in range(config.grad_accum):
                if isinstance(
                    step_model, DistributedDataParallel
                ):  # all-reduce the gradients in the last backward only
                    step_model.require_backward_grad_sync = micro_step == config.grad_accum - 1
                batch = run.batch()
                with run.autocast():
                    _, loss = step_model(batch.idx, batch.targets)
                loss = loss / config.grad_accum
                loss.backward()
                history.losses[history.step] += loss.detach()
                tokens += (batch.targets != IGNORE_INDEX).sum()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # what every rank acts on: the slowest clock (all stop a time budget at the same step), any rank's stop
            # signal, any rank's checkpoint by time
            elapsed, stop, save = distributed.agree(
                history.elapsed + clock() - start, bool(signals.received), saver.due(history.step + 1)
            )
            history.end_step(elapsed)

            # log and checkpoint
            if history.step % config.log_interval == 0 or history.step == config.max_steps:
                guard.check()
                distributed.sum_(tokens)
                rate = tokens.item() / max(elapsed - logged_elapsed, 1e-9)
                mean_loss = history.mean_since((history.step - 1) // config.log_interval * config.log_interval)
                log.record({"step": history.step, "time": elapsed, "loss": mean_loss, "lr": lr, "tokens_per_s": rate})
                log.progress(history.step, elapsed, loss=f"{mean_loss:.4f}", tok_s=f"{rate:,.0f}")
                tokens.zero_()
                logged_elapsed = elapsed
            if save or stop:
                saver.save()
            if stop:
                raise Stopped(signals.received or signal.SIGTERM, history.step)  # (another rank's signal)
        else:
            if config.eval_interval:  # the last weights are a candidate for the best too, as in nanoGPT
                _estimate(run, log, saver)
        log.progress(history.step, history.elapsed)
    saver.save()
    if signals.received:  # during the final checkpoint: it is written; skip the evaluation
        raise Stopped(signals.received, history.step)

    result = _final_evaluation(run, log) if run.master_process else {}
    distributed.barrier()
    return result


def _final_evaluation(run: Run, log: Log) -> dict:
    """Rank 0, after training: the last weights' losses on the whole splits (returned), the best checkpoint's beside
    them in the final record, and loss.png."""
    history = run.history
    result = evaluate(run.model, run.source, max_tokens=run.config.eval_max_tokens, device=run.device)
    record = {"step": history.step, "time": history.elapsed, "final": result}
    if run.best.step:
        record["best"] = _evaluate_best(run, result)
    log.record(record)
    if history.step:
        losses, times = history.losses[: history.step].cpu(), history.times[: history.step]
        plot_losses(losses, times, run.path(METRICS), run.path(LOSS_PLOT))
    return result


def _estimate(run: Run, log: Log, saver: Saver) -> bool:
    """Rank 0 estimates the losses, logs them and offers the weights as the best; whether the run is out of --patience
    (every rank gets rank 0's answer)."""
    out_of_patience = False
    if run.master_process:
        estimate = estimate_loss(run.model, run.source, run.config, run.eval_generator, run.autocast(), run.device)
        log.record({"step": run.history.step, "time": run.history.elapsed, "estimate": estimate})
        out_of_patience = run.history.step > 0 and saver.offer_best(estimate)
    _, out_of_patience = distributed.agree(0.0, out_of_patience)  # (the other ranks wait here)
    return out_of_patience


def _evaluate_best(run: Run, last: dict) -> dict:
    """best.pt's step, time and val estimate, and its losses on the whole splits
    (the last weights' where they are the same)."""
    best = run.best
    losses = last
    if best.step != run.history.step:
        weights = checkpoint.load(run.path(BEST))["model"]
        checkpoint.load_weights(run.model, weights, run.path(BEST))  # the run is over: the model may take them
        losses = evaluate(run.model, run.source, max_tokens=run.config.eval_max_tokens, device=run.device)
    return {"step": best.step, "time": best.time, "estimate": best.estimate, **losses}


def final_record(out_dir: Path) -> dict | None:
    """The final record of a run's metrics.jsonl: {"final": last weights' losses, "best": ...},
    or None if it has none."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((r for r in reversed(records) if "final" in r), None)


class LostPeerError(RuntimeError):
    """Under torchrun, another rank died or stopped answering in a collective; the message is one line."""


def _lost_peer(e: RuntimeError) -> bool:
    """A collective failed because a peer went away or timed out: torch's distributed errors (NCCL), or gloo's
    transport errors (plain RuntimeErrors: "Connection reset by peer", "Connection closed by peer", "Timed out ...")."""
    return isinstance(e, torch.distributed.DistError) or "gloo/transport" in str(e) or "Timed out" in str(e)


def _lost_peer_message(e: RuntimeError, config: TrainConfig, out_dir: Path) -> str:
    if (out_dir / CHECKPOINT).exists():  # (rank 0 writes it whole or not at all: checkpoint.save)
        after = f"{out_dir / CHECKPOINT} keeps the last checkpoint: continue with the same command and --resume"
    else:
        after = "no checkpoint was written yet: run the same command again"
    me = f"rank {distributed.rank()}"
    if "Timed out" in str(e) or "timed out" in str(e):
        who = ", ".join(f"rank {r}" for r in distributed.unanswered_ranks()) or "another rank"
        return (
            f"{me}: {who} did not answer within --dist-timeout {config.dist_timeout:g} s (stopped, hung, or far "
            f"slower than the others): ending the job; {after}"
        )
    cause = first_line(e).split(". ")[0]
    return (
        f"{me}: lost contact with another process of this job ({cause}): "
        f"it failed or was killed (torchrun names it); {after}"
    )


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed activation buffers (up to 32 MiB each) for reuse.

    By default it returns blocks above its mmap threshold to the kernel at every free, so each
    step's activations are mapped and page-faulted in afresh (docs/training.md, "Memory").
    Linux with glibc only; elsewhere nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


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
    kept = [
        r for r in records if r["step"] <= step and "final" not in r and not ("estimate" in r and r["step"] == step)
    ]
    tmp = path.with_name(path.name + ".tmp")  # replaced whole: a kill now leaves the old log or the new one
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
