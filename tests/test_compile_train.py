"""Compiled training learns what eager training learns, and the loop refuses a compiled model that does not.

On an H100 (torch 2.11, 2026-11-27, docs/results/gpu) the compiled gated WaveNet trained to nothing
(its loss stayed at the first step's, compiled with inductor in the default mode and in
reduce-overhead, float32 and bfloat16, the loss through the Triton kernel or the fallback) while
eager training and the compiled lecture WaveNet learned. On the CPU compiled training tracks
eager (tests/test_train.py compiles a small recipe with inductor), so the comparison here is
collected for CUDA only: ``pytest --device cuda`` runs it on a lent GPU, one case per model and
cross-entropy path, which says where the fault is.
"""

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from makemore.kernels import loss as xent
from makemore.models import GatedWaveNet, GatedWaveNetConfig, Transformer, TransformerConfig, WaveNet, WaveNetConfig
from makemore.train.loop import _follows_its_parameters

V = 65
MODELS = {
    "gated": lambda: GatedWaveNet(GatedWaveNetConfig(V, 16, 16, 32, n_levels=3, stacks=2, dropout=0.0)),
    "wavenet": lambda: WaveNet(WaveNetConfig(V, 8, 16, 32)),
    "transformer": lambda: Transformer(TransformerConfig(V, block_size=8, n_layer=2, n_head=2, n_embd=16)),
}


def batches(model, device, steps, rows=16, outputs=64):
    """A task every model learns in a few dozen steps: the next token is the current one plus 3."""
    generator = torch.Generator().manual_seed(2)
    R = model.receptive_field
    for _ in range(steps):
        idx = torch.randint(0, V, (rows, outputs + R - 1), generator=generator)
        yield idx.to(device), ((idx[:, R - 1 :] + 3) % V).to(device)


def train(model, device, steps=40):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for idx, targets in batches(model, device, steps):  # a compiled module reads receptive_field through to the model
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).cpu()


@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize(
    "name, backend", [("gated", "auto"), ("gated", "torch"), ("gated", "triton"), ("wavenet", "auto"), ("transformer", "auto")]
)
def test_compiled_training_follows_eager(device, name, backend, monkeypatch):
    """40 AdamW steps, no dropout, float32: the compiled run's losses track eager's and fall as far.
    ("auto" at these sizes is F.cross_entropy itself: 16 x 64 x 65 logits, under CUDA_ATEN_BELOW.)"""
    monkeypatch.setenv(xent.BACKEND_ENV, backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    eager = train(copy.deepcopy(model), device)
    compiled = train(torch.compile(copy.deepcopy(model)), device)
    assert eager[-1] < 0.5 * eager[0], f"eager training did not learn: {eager.tolist()}"
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2, msg=lambda m: f"compiled {compiled.tolist()}\neager {eager.tolist()}\n{m}")


@pytest.mark.parametrize("name", MODELS)
def test_the_loop_refuses_a_compiled_model_that_keeps_its_old_weights(name):
    """_follows_its_parameters: the model itself passes; a stand-in that kept a copy of the weights fails.
    With every parameter 0 each model's logits are 0 (loss ln V) whatever its dropout draws."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    R = model.receptive_field
    idx = torch.randint(0, V, (4, R + 7))
    batch = SimpleNamespace(idx=idx, targets=torch.randint(0, V, (4, 8)))
    assert _follows_its_parameters(model, model, batch, contextlib.nullcontext()) is None
    assert math.isclose(model(idx, batch.targets)[1].item(), math.log(V), abs_tol=1e-5)
    torch.manual_seed(0)
    model = MODELS[name]().train()
    stale = copy.deepcopy(model)  # what a graph that baked in the weights computes
    reason = _follows_its_parameters(model, stale, batch, contextlib.nullcontext())
    assert reason is not None and "does not follow its parameters" in reason
