"""Stop with one line when the training loss diverges: before a logged loss or a checkpoint, never after.

Diverged: a step's loss since the last check is nan or inf, or their mean exceeds FACTOR x
max(the first step's loss, ln V). The first step's loss is where training starts (ln V for a
uniform guess; higher for an over-confident init), and training lowers it; minibatch noise moves
it by tenths, far from 3x (docs/reliability.md has the lecture recipe's figures). A too-high learning
rate sends the loss to tens, thousands or nan within a few steps, so nothing in between needs telling apart.

Before a checkpoint the guard also checks the current weights, the ones a checkpoint would hold:
the losses so far were computed before the last update, which alone can ruin the weights (one
step at --lr 1e4 does). That probe is the loss the next step will compute (``next_step_loss``).
Under torchrun every rank checks the same means, so all stop together. The host reads values here only.
"""

import math

import torch

from . import distributed
from .config import TrainConfig
from .optim import learning_rate
from .run import CHECKPOINT, kept_state

FACTOR = 3.0


class DivergenceGuard:
    def __init__(self, run):
        self.run, self.history, self.config = run, run.history, run.config
        self.out_dir, self.checkpoint = run.out_dir, run.path(CHECKPOINT)
        self.uniform = math.log(run.model_config.vocab_size)
        self.checked = run.history.step  # losses[:checked] passed
        self.saved = run.history.step or None  # the step of the last checkpoint, known good (None: none yet)

    def check(self, probe: bool = False) -> None:
        """Raise FloatingPointError if the losses since the last check
        (and, with ``probe``, the next step's) diverged."""
        h = self.history
        if h.step == 0:
            return
        h.average()
        parts = [h.losses[0]] + ([h.losses[self.checked : h.step].mean()] if h.step > self.checked else [])
        if probe:
            parts.append(distributed.mean_(next_step_loss(self.run)))
        first, *seen = torch.stack(parts).tolist()
        start = max(first, self.uniform) if math.isfinite(first) else self.uniform
        limit = FACTOR * start
        if all(value <= limit for value in seen):  # False for nan
            self.checked = h.step
            return
        if h.step > self.checked and not seen[0] <= limit:
            window = h.losses[self.checked : h.step].cpu()
            bad = (~(window <= limit)).nonzero()
            at = int(bad[0]) if len(bad) else 0
            step, value = self.checked + at + 1, float(window[at])
        else:
            step, value = h.step + 1, seen[-1]  # the probe: the loss of the step after this one
        raise FloatingPointError(self._message(step, value, start, limit))

    def _message(self, step: int, value: float, start: float, limit: float) -> str:
        config = self.config
        lr = _lr_of_step(config, step, self.history.times)
        now = f"now {config.lr:g}" + (f", {lr:g} at that step" if lr != config.lr else "")
        if self.saved:
            after = (
                f"{self.checkpoint} (step {self.saved}) is from before it: "
                f"continue it with `makemore train --out {self.out_dir} --resume --lr {config.lr / 10:g}`"
            )
        else:
            after = "no checkpoint was written: start over with --force and a lower --lr, or with --grad-clip"
        return (
            f"the training loss diverged at step {step} ({value:.4g}, above {limit:.3g} = {FACTOR:g} x {start:.3g}, "
            f"where it started): the learning rate is too high: lower --lr ({now}); {after}"
        )


def _lr_of_step(config: TrainConfig, n: int, times: torch.Tensor) -> float:
    """The learning rate step ``n`` (1-based) trained with,
    as the loop set it: from the steps and the clock before it."""
    before = float(times[min(n - 2, len(times) - 1)]) if n >= 2 else 0.0
    return learning_rate(
        config, max((n - 1) / config.max_steps, before / config.max_seconds if config.max_seconds else 0.0)
    )


@torch.no_grad()
def next_step_loss(run) -> torch.Tensor:
    """The loss the next training step will compute (its batch, the current weights, training mode), leaving no trace.

    The batch comes from a copy of the training generator; BatchNorm's running statistics and the
    global random state that dropout draws from are put back: the run goes on bit for bit as if this
    had not been computed.
    """
    with kept_state(run):
        peek = torch.Generator().set_state(run.generator.get_state())
        batch = run.batch(peek)
        with run.autocast():
            _, loss = run.model(batch.idx, batch.targets)
    return loss.detach().float().reshape(())
