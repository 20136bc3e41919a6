"""A training run's state, built once by ``setup``: what the loop, the saver, the divergence guard and the
compile check share.

``setup`` does nanoGPT's train.py preamble in one place: the device and dtype, the data, the model
(``torch.manual_seed(seed)`` before init, the lecture's initial weights), the optimiser, the random
streams, and the checkpoint to resume from. The batches come from a private generator that starts
where the global one stood after init, so the ``lecture`` recipe draws exactly the notebook's
batches without touching global state, and its state goes into checkpoints for an exact resume.
Under torchrun rank 0 keeps the single-process stream (one process under torchrun trains exactly
as a plain run); rank r > 0 draws from a stream seeded from (seed, r), which also drives its dropout.
"""

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..data import Batch, Vocab, load_source
from ..device import autocast, resolve_device, resolve_dtype
from ..models import LanguageModel, build_model
from . import distributed
from .config import TrainConfig
from .history import History
from .optim import make_optimizer

CHECKPOINT = "ckpt.pt"  # the last weights, with everything a resume needs
BEST = "best.pt"  # the weights of the best val estimate so far (nanoGPT's always_save_checkpoint=False)
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class Best:
    """The best val estimate so far, where and when it was reached, and the estimates since that did not beat it."""

    val: float = float("inf")
    step: int = 0
    time: float = 0.0
    estimate: dict | None = None
    stale: int = 0  # evaluations since the best (--patience counts these)


@dataclass
class Run:
    config: TrainConfig
    model_config: object
    out_dir: Path
    source: object  # a LineSource or StreamSource (makemore.data)
    model: LanguageModel  # the unwrapped module (nanoGPT's raw_model): what is saved, evaluated and clipped
    optimizer: torch.optim.Optimizer | None  # None for fitted models
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator  # this rank's training batches
    eval_generator: torch.Generator  # the estimates' batches: they never move the training stream
    history: History
    best: Best
    rank: int = 0
    world_size: int = 1

    @property
    def master_process(self) -> bool:
        return self.rank == 0

    @property
    def info(self) -> dict:
        """How this run computes: recorded in metrics.jsonl and every checkpoint."""
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "world_size": self.world_size,
        }

    def autocast(self):
        return autocast(self.device, self.dtype)

    def batch(self, generator: torch.Generator | None = None, split: str = "train") -> Batch:
        """A training-layout batch on the run's device, from ``generator`` (default: the training stream)."""
        c = self.config
        R = self.model.receptive_field
        return self.source.batch(split, c.batch_size, c.layout, R, generator or self.generator, c.seq_len).to(
            self.device
        )

    def path(self, name: str) -> Path:
        return self.out_dir / name


def setup(config: TrainConfig, model_config, out_dir: Path, resume: bool) -> Run:
    """The run in ``out_dir``: fresh, or restored from its checkpoint (weights, optimiser, streams, history, best)."""
    rank, world_size = distributed.rank(), distributed.world_size()
    device = resolve_device(config.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        checkpoint.remove_stale_temporaries(out_dir / CHECKPOINT)  # left by a run killed while it wrote
        checkpoint.remove_stale_temporaries(out_dir / BEST)
        if not resume:  # a fresh run's best is its own
            (out_dir / BEST).unlink(missing_ok=True)
    state = checkpoint.load(out_dir / CHECKPOINT) if resume else None
    if state is not None and state.get("world_size", 1) != world_size:
        raise ValueError(
            f"{out_dir / CHECKPOINT} was trained by {state.get('world_size', 1)} process(es), each with its own "
            f"batch stream; resume it with that many (torchrun --nproc-per-node ...), not {world_size}"
        )
    vocab = Vocab(state["vocab"]) if state else None
    source = load_source(config.data, config.kind, seed=config.seed, vocab=vocab)
    model_config = replace(model_config, vocab_size=len(source.vocab))

    torch.manual_seed(config.seed)
    model = build_model(config.model, model_config)
    if rank > 0:  # a random stream of this rank's own, for its batches and its dropout masks
        torch.manual_seed(distributed.stream_seed(config.seed, rank))
    generator = torch.Generator().set_state(
        torch.get_rng_state()
    )  # rank 0: the stream the lecture's randint draws from
    eval_generator = torch.Generator().manual_seed(config.seed + 1)
    if world_size > 1:
        distributed.check_supported(config.model, model)  # every rank fails alike before joining, so none waits
    if distributed.launched():
        distributed.setup(device, config.dist_timeout)
    model.to(device)
    # The training loss in 2 passes over the logits where that is the fastest: on CUDA (the Triton kernel); not with
    # --grad-accum, whose scaled incoming gradient costs the in-place mode a third pass over the gradient.
    model.loss_in_place = device.type == "cuda" and config.grad_accum == 1
    source.check(config.layout, model.receptive_field, config.seq_len)
    run = Run(
        config,
        model_config,
        out_dir,
        source,
        model,
        None if model.fitted else make_optimizer(config, model),
        device,
        resolve_dtype(config.dtype, device),
        generator,
        eval_generator,
        History(config.max_steps, device),
        Best(),
        rank,
        world_size,
    )
    if state is not None:
        _restore(run, state)
    return run


def _restore(run: Run, state: dict) -> None:
    """Load the checkpoint's weights, optimiser, random states, history and best,
    or say in one line which does not fit."""
    path = run.path(CHECKPOINT)
    checkpoint.load_weights(run.model, state["model"], path)
    try:
        if run.optimizer is not None:
            run.optimizer.load_state_dict(state["optimizer"])
        run.generator.set_state(state.get("generators", [state["generator"]])[run.rank])
        if "rng_states" in state:  # the global streams dropout draws from, so a resumed run draws the same masks
            set_rng_state(state["rng_states"][run.rank], run.device)
        run.best = Best(**state["best"]) if "best" in state else Best()
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: its optimiser or random-number state does not fit this run ({first_line(e)}); the file was "
            "edited or comes from another program: "
            f"restore it or retrain with `makemore train --out {path.parent} --force`"
        ) from None
    run.history.restore(state)


def rng_state(device: torch.device) -> dict:
    """The global random streams (CPU, and the device's): what dropout draws from."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def first_line(e: Exception) -> str:
    """An exception's first line, without gloo's "[.../pair.cc:537] " source location, at most 160 characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line[:160]


@contextlib.contextmanager
def kept_state(run: Run):
    """Undo, on exit, what a look at the model changes: BatchNorm's running statistics and the global random streams."""
    buffers = [b.clone() for b in run.model.buffers()]
    rng = rng_state(run.device)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(run.model.buffers(), buffers, strict=True):
                b.copy_(saved)
        set_rng_state(rng, run.device)
