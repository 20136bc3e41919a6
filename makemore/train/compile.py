"""``--compile``: torch.compile the model once, outside the training clock, and train it only if it computes what
the eager model computes; otherwise say why in one line and train eagerly.

Two checks, once at start-up, on one training batch (the host reads here are outside the clock):

- Gradients at the run's own initial weights, parameter by parameter. A compiled graph can compute
  the right loss and still route a gradient to the wrong place (docs/models.md, "Autograd
  Functions"): every parameter's compiled gradient must match eager's, in norm within
  GRAD_RTOL; where the model draws dropout masks (which differ between the two runs) a non-zero
  eager gradient must simply not come back zero.
- In-place updates. The optimiser changes the parameters in place; a graph that baked in their
  values would keep training the first weights. With every parameter zeroed in place, every model
  here gives logits 0 whatever its dropout draws: the loss must be exactly ln V and the output
  layer's gradients equal eager's.
"""

import math
import sys

import torch

from .run import Run, kept_state

GRAD_RTOL = 0.05  # bf16 autocast reorders sums between eager and compiled kernels: about 1% apart in norm


def compiled(run: Run):
    """torch.compile(run.model) if it passes both checks, else the eager model (with one line on stderr)."""
    model, config = run.model, run.config
    try:
        candidate = torch.compile(model, mode=None if config.compile_mode == "default" else config.compile_mode)
        reason = mismatch(run, candidate, run.batch(torch.Generator()))
    except Exception as e:  # noqa: BLE001 - any compiler failure: say so and train eagerly
        text = str(e).strip()
        reason = text.splitlines()[0][:200] if text else type(e).__name__
    if reason:
        print(f"makemore: --compile failed ({reason}); training without compilation", file=sys.stderr)
        return model
    return candidate


def mismatch(run: Run, candidate, batch) -> str | None:
    """Why ``candidate`` (the compiled model) must not be trained in place of ``run.model``, or None."""
    model = run.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    dropout = getattr(model.config, "dropout", 0.0) > 0
    try:
        with kept_state(run):
            eager = _gradients(run, model, batch)
            ours = _gradients(run, candidate, batch)
        for name, g in eager.items():
            c = ours[name]
            if g.count_nonzero() and not c.count_nonzero():
                return f"the compiled model's gradient of {name} is zero where eager's is not"
            if not dropout and not (c - g).norm() <= GRAD_RTOL * g.norm() + 1e-12:  # (nan fails)
                return f"the compiled model's gradient of {name} differs from eager's"
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        with kept_state(run):
            eager = _gradients(run, model, batch)
            ours = _gradients(run, candidate, batch, expect_loss=math.log(model.vocab_size))
        if ours is None:
            return "the compiled model does not follow its parameters: with all of them 0 its loss is not ln V"
        if any(not torch.allclose(ours[n], g, rtol=1e-2, atol=1e-4) for n, g in eager.items()):
            return (
                "the compiled model does not follow its parameters: "
                "with all of them 0 its gradient differs from eager's"
            )
        return None
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)


def _gradients(run: Run, step_model, batch, expect_loss: float | None = None) -> dict[str, torch.Tensor] | None:
    """Every parameter's gradient (float32, zeros where none arrives) after one forward and backward through
    ``step_model``; None if ``expect_loss`` is given and the loss is not that."""
    model = run.model
    model.zero_grad(set_to_none=True)
    with run.autocast():
        _, loss = step_model(batch.idx, batch.targets)
    loss.backward()
    if expect_loss is not None and not abs(loss.item() - expect_loss) < 1e-3:
        return None
    return {
        n: torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
        for n, p in model.named_parameters()
    }
