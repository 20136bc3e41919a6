"""When and what the loop checkpoints: every --checkpoint-interval steps, every --checkpoint-seconds of
wall clock (so a crash loses at most that), on a stop signal, and at the end; never a diverged state.

Rank 0 writes, with every rank's generator and random states; the other ranks wait at a barrier.
"""

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import checkpoint
from . import distributed
from .divergence import DivergenceGuard
from .history import History


class Saver:
    def __init__(self, path: Path, config, model_config, source, model, optimizer, generator: torch.Generator, guard: DivergenceGuard, probe, run_info: dict):
        self.path, self.config, self.model_config, self.source = path, config, model_config, source
        self.model, self.optimizer, self.generator, self.guard, self.probe = model, optimizer, generator, guard, probe
        self.run_info = run_info  # the device, dtype and number of processes this run used
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """By steps, or by this rank's wall clock since the last save (the loop agrees on it over the ranks)."""
        return step % self.config.checkpoint_interval == 0 or time.monotonic() - self.last >= self.config.checkpoint_seconds

    def save(self, history: History, *, check: bool = True) -> None:
        if check and history.step > 0:  # (fitted models take no steps)
            self.guard.check(probe=distributed.mean_(self.probe()))
        history.average()
        generators = distributed.gather(self.generator.get_state())
        rng_states = distributed.gather(rng_state(history.losses.device))
        if distributed.is_main_process():
            checkpoint.save(
                {
                    "config": asdict(self.config),
                    "model_config": asdict(self.model_config),
                    "kind": self.source.kind,
                    "max_len": getattr(self.source, "max_len", 0),  # line data: the longest item, to bound sampling
                    "vocab": self.source.vocab.chars,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
                    "generator": self.generator.get_state(),  # rank 0's (the only one in one process)
                    "generators": generators,  # every rank's, in rank order
                    "rng_states": rng_states,  # every rank's global random state (dropout), in rank order
                    **self.run_info,
                    "step": history.step,
                    "elapsed": history.elapsed,
                    "losses": history.losses[: history.step].cpu().clone(),  # a copy: a view would save the whole max_steps buffer
                    "times": history.times[: history.step].clone(),
                },
                self.path,
            )
        self.guard.saved = history.step
        self.last = time.monotonic()
        distributed.barrier()


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
