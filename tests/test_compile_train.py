"""Compiled training learns what eager training learns, and the loop refuses a compiled model that does not.

Compiled training once trained the gated WaveNet to nothing: under torch 2.11 three autograd.Functions
returned tensors whose gradients dynamo routed to the wrong slot (docs/models.md, "Autograd Functions").
Here 40 AdamW steps compiled must track 40 eager ones for each model and cross-entropy path, on the CPU
with the aot_eager backend (the fault shows there too, without inductor's C++ builds) and on CUDA with
inductor; CI runs this file under every torch the README names. Then the start-up check of ``--compile``
(makemore/train/compile.py) against stand-ins that fail in the two ways it looks for.
"""

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from makemore.kernels import loss as xent
from makemore.models import GatedWaveNet, GatedWaveNetConfig, Transformer, TransformerConfig, WaveNet, WaveNetConfig
from makemore.train.compile import mismatch

V = 65
MODELS = {
    "gated": lambda: GatedWaveNet(GatedWaveNetConfig(V, 16, 16, 32, n_levels=3, stacks=2, dropout=0.0)),
    "gated-dropout": lambda: GatedWaveNet(GatedWaveNetConfig(V, 16, 16, 32, n_levels=3, stacks=2, dropout=0.1)),
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for idx, targets in batches(model, device, steps):  # a compiled module reads receptive_field through to the model
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).cpu()


CASES = [
    ("gated", "auto"),
    ("gated", "torch"),
    ("gated", "triton"),
    ("gated-dropout", "torch"),
    ("wavenet", "auto"),
    ("transformer", "auto"),
]


@pytest.mark.parametrize("name, backend", CASES)
def test_compiled_training_follows_eager(device, name, backend, monkeypatch):
    """40 AdamW steps, float32: the compiled run's losses track eager's and fall as far; with dropout (masks drawn
    apart) it learns as eager does. ("auto" at these sizes is F.cross_entropy itself.)"""
    if backend == "triton" and device == "cpu":
        pytest.skip(
            "the Triton kernel's compiled gradients on the CPU: tests/test_compile_grads.py, under the interpreter"
        )
    monkeypatch.setenv(xent.BACKEND_ENV, backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    eager = train(copy.deepcopy(model), device)
    compiled = train(
        torch.compile(copy.deepcopy(model), backend="inductor" if device == "cuda" else "aot_eager"), device
    )
    assert eager[-1] < 0.5 * eager[0], f"eager training did not learn: {eager.tolist()}"
    if name.endswith("dropout"):
        assert compiled[-1] < 0.5 * compiled[0], f"compiled training did not learn: {compiled.tolist()}"
        return
    message = f"compiled {compiled.tolist()}\neager {eager.tolist()}"
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2, msg=lambda m: f"{message}\n{m}")


def stand_in(name):
    """The model (as ``torch.compile`` would wrap it) and a batch of the task above, in training mode."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    run = SimpleNamespace(model=model, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    idx, targets = next(batches(model, "cpu", 1, rows=4, outputs=8))
    return run, SimpleNamespace(idx=idx, targets=targets)


@pytest.mark.parametrize("name", MODELS)
def test_the_startup_check_passes_the_model_itself(name):
    run, batch = stand_in(name)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert mismatch(run, run.model, batch) is None
    assert all(torch.equal(v, weights[k]) for k, v in run.model.state_dict().items())  # the run's weights are put back
    assert math.isclose(run.model(batch.idx, batch.targets)[1].item(), math.log(V), rel_tol=0.2)


@pytest.mark.parametrize("name", MODELS)
def test_the_startup_check_refuses_a_model_whose_gradients_are_zeroed(name):
    """A stand-in compiled model that computes the same loss but passes no gradient to the first layer's weights
    (what torch 2.11 did to the parameters behind an autograd.Function): the check names that parameter."""
    run, batch = stand_in(name)
    first = next(n for n, p in run.model.named_parameters() if p.dim() == 2 and n != "wte.weight")

    def zeroed(idx, targets):
        params = {n: p.detach() if n == first else p for n, p in run.model.named_parameters()}
        return torch.func.functional_call(run.model, params, (idx, targets))

    reason = mismatch(run, zeroed, batch)
    assert reason == f"the compiled model's gradient of {first} is zero where eager's is not"


@pytest.mark.parametrize("name", MODELS)
def test_the_startup_check_refuses_a_model_that_keeps_its_old_weights(name):
    """A stand-in that kept a copy of the weights (what a graph that baked them in computes): its gradients land on the
    copy, so the model's own stay zero; and where gradients are right but the weights baked in (the in-place check,
    with every parameter 0 each model's logits are 0, loss ln V, whatever its dropout draws), it fails that check."""
    run, batch = stand_in(name)
    stale = copy.deepcopy(run.model)
    assert mismatch(run, stale, batch).startswith("the compiled model's gradient of ")

    def baked(idx, targets):  # gradients reach the model, but the forward reads the copy's first values
        params = {n: p + (q - p).detach() for (n, p), q in zip(run.model.named_parameters(), stale.parameters())}
        return torch.func.functional_call(run.model, params, (idx, targets))

    reason = mismatch(run, baked, batch)
    assert reason is not None and "does not follow its parameters" in reason
