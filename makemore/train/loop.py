"""One training loop for every model.

Read it top to bottom as nanoGPT's train.py: set up (data, model, optimiser, resume), then per
step: learning rate, evaluate and checkpoint when due, forward and backward over the
micro-batches, clip, step, log. The host reads tensor values only when logging or evaluating.

The ``lecture`` recipe is lecture 5's run, step for step: ``torch.manual_seed(42)`` before init,
minibatches from ``torch.randint`` on the same random stream, SGD at lr 0.1 then 0.01 from step
150,000. The batches come from a private generator that starts where the global one stood after
init, so the run draws exactly the lecture's batches without touching global state, and its state
goes into checkpoints for an exact resume. The training clock (``--max-seconds``, tokens/s, the
time axis of the metrics) counts the steps only: evaluation, checkpoints and compilation are
outside it.
"""

import contextlib
import ctypes
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .. import checkpoint
from ..data import IGNORE_INDEX, Vocab, load_source
from ..models import build_model
from .config import TrainConfig
from .evaluate import estimate_loss, evaluate
from .optim import learning_rate, make_optimizer
from .plots import plot_losses

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def train(config: TrainConfig, model_config, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train into ``out_dir`` (checkpoint, metrics.jsonl, loss.png) and return the final losses per split."""
    _keep_freed_memory()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint.load(out_dir / CHECKPOINT) if resume else None
    source = load_source(config.data, config.kind, seed=config.seed, vocab=Vocab(state["vocab"]) if state else None)
    model_config = replace(model_config, vocab_size=len(source.vocab))
    device = torch.device(config.device)

    torch.manual_seed(config.seed)
    model = build_model(config.model, model_config)
    generator = torch.Generator().set_state(torch.get_rng_state())  # the stream the lecture's randint draws from
    eval_generator = torch.Generator().manual_seed(config.seed + 1)  # estimates never move the training stream
    model.to(device)
    R = model.receptive_field
    source.check(config.layout, R, config.seq_len)
    fits = hasattr(model, "fit")  # count models and the lecture's full-batch bigram: no minibatch steps
    optimizer = None if fits else make_optimizer(config, model)
    losses = torch.zeros(config.max_steps, device=device)  # per step, read back only when logging
    times = torch.zeros(config.max_steps, dtype=torch.float64)  # training clock at the end of each step
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed = state["step"], state["elapsed"]
        kept = min(step, config.max_steps)
        losses[:kept], times[:kept] = state["losses"][:kept].to(device), state["times"][:kept]
        _truncate_metrics(out_dir / METRICS, step)

    def save_checkpoint() -> None:
        checkpoint.save(
            {
                "config": asdict(config),
                "model_config": asdict(model_config),
                "kind": source.kind,
                "max_len": getattr(source, "max_len", 0),  # line data: the longest item, to bound sampling
                "vocab": source.vocab.chars,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "generator": generator.get_state(),
                "step": step,
                "elapsed": elapsed,
                "losses": losses[:step].cpu(),
                "times": times[:step].clone(),
            },
            out_dir / CHECKPOINT,
        )

    metrics = open(out_dir / METRICS, "a" if resume else "w")  # a fresh run (--force) starts a fresh log

    def log(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.dtype == "bfloat16" else contextlib.nullcontext()
    if fits:
        model.fit(source.eval_batches("train", R, batch_tokens=1 << 20, max_tokens=sys.maxsize))
    else:
        step_model = _compiled(model, source, config, autocast) if config.compile else model
        model.train()
        bar = tqdm(total=config.max_steps, initial=step, disable=not progress, mininterval=1.0, unit="step", dynamic_ncols=True)
        tokens = torch.zeros((), dtype=torch.int64, device=device)  # targets trained on since the last log
        last_step, last_elapsed = step, elapsed
        while step < config.max_steps and not (config.max_seconds and elapsed >= config.max_seconds):
            progress_fraction = max(step / config.max_steps, elapsed / config.max_seconds if config.max_seconds else 0.0)
            lr = learning_rate(config, progress_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.eval_interval and step % config.eval_interval == 0:
                log({"step": step, "time": elapsed, "estimate": estimate_loss(model, source, config, eval_generator, autocast)})

            start = time.perf_counter()
            for _ in range(config.grad_accum):
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
            times[step - 1] = elapsed

            if step % config.log_interval == 0 or step == config.max_steps:
                mean_loss = losses[last_step:step].mean().item()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"step {step}: the training loss is {mean_loss}; lower --lr (now {config.lr}) or clip with --grad-clip")
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

    result = evaluate(model, source, max_tokens=config.eval_max_tokens, device=device)
    log({"step": step, "time": elapsed, "final": result})
    metrics.close()
    if step:
        plot_losses(losses[:step].cpu(), times[:step], out_dir / METRICS, out_dir / LOSS_PLOT)
    return result


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


def _compiled(model, source, config: TrainConfig, autocast):
    """torch.compile(model), compiled now on one batch outside the training clock; the eager model where it cannot compile."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the warm-up step moves BatchNorm's running statistics
    try:
        compiled = torch.compile(model)
        batch = source.batch("train", config.batch_size, config.layout, model.receptive_field, torch.Generator(), config.seq_len).to(config.device)
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
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] <= step and "final" not in r and not ("estimate" in r and r["step"] == step)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
