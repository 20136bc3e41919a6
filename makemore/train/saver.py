"""When and what the loop checkpoints: ``ckpt.pt`` every --checkpoint-interval steps, every --checkpoint-seconds
of wall clock (so a crash loses at most that), on a stop signal and at the end, never a diverged state; and
``best.pt`` whenever a val estimate beats the best so far (nanoGPT's protocol: a run is judged by its best
checkpoint, which overfitting cannot take away).

Rank 0 writes, with every rank's generator and random states; the other ranks wait at a barrier.
``best.pt`` holds what sampling and evaluation need (settings, vocabulary, weights), not the optimiser:
a run resumes from ``ckpt.pt``, which records the best so far.
"""

import time
from dataclasses import asdict

from .. import checkpoint
from . import distributed
from .divergence import DivergenceGuard
from .run import BEST, CHECKPOINT, Run, rng_state


class Saver:
    def __init__(self, run: Run, guard: DivergenceGuard):
        self.run, self.guard = run, guard
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """By steps, or by this rank's wall clock since the last save (the loop agrees on it over the ranks)."""
        config = self.run.config
        return step % config.checkpoint_interval == 0 or time.monotonic() - self.last >= config.checkpoint_seconds

    def save(self, *, check: bool = True) -> None:
        """Write ckpt.pt (every rank calls this; rank 0 writes), after checking that the weights have not diverged."""
        run, history = self.run, self.run.history
        if check and history.step > 0:  # (fitted models take no steps)
            self.guard.check(probe=True)
        history.average()
        generators = distributed.gather(run.generator.get_state())
        rng_states = distributed.gather(rng_state(run.device))
        if run.master_process:
            checkpoint.save(
                {
                    **self._settings(),
                    "optimizer": run.optimizer.state_dict() if run.optimizer is not None else {},
                    "generator": run.generator.get_state(),  # rank 0's (the only one in one process)
                    "generators": generators,  # every rank's, in rank order
                    "rng_states": rng_states,  # every rank's global random state (dropout), in rank order
                    "elapsed": history.elapsed,
                    "losses": history.losses[: history.step].cpu().clone(),  # a copy: a view saves the whole buffer
                    "times": history.times[: history.step].clone(),
                    "best": asdict(run.best),
                },
                run.path(CHECKPOINT),
            )
        self.guard.saved = history.step
        self.last = time.monotonic()
        distributed.barrier()

    def offer_best(self, estimate: dict) -> bool:
        """Rank 0, after an estimate: write best.pt if its val beats the best so far; whether the run has run out of
        --patience (that many estimates in a row without a better one)."""
        run, best = self.run, self.run.best
        val = estimate.get("val", float("inf"))
        if val < best.val:  # False for nan
            run.best = best = type(best)(val=val, step=run.history.step, time=run.history.elapsed, estimate=estimate)
            checkpoint.save({**self._settings(), "best": asdict(best)}, run.path(BEST))
        else:
            best.stale += 1
        return bool(run.config.patience) and best.stale >= run.config.patience

    def _settings(self) -> dict:
        """What every checkpoint holds: settings, data, vocabulary, weights, and how and how far the run trained."""
        run = self.run
        return {
            "config": asdict(run.config),
            "model_config": asdict(run.model_config),
            "kind": run.source.kind,
            "max_len": getattr(run.source, "max_len", 0),  # line data: the longest item, to bound sampling
            "vocab": run.source.vocab.chars,
            "model": run.model.state_dict(),
            **run.info,
            "step": run.history.step,
        }
