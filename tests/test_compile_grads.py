"""Compiled gradients equal eager ones: every model, and the loss alone on every path, under every compile backend.

torch 2.11's dynamo routes the gradient of an autograd.Function output that is the result of an
in-place op or a no-op ``.to()`` to the wrong slot, where it arrives as zeros (docs/models.md,
"Autograd Functions"). The compiled loss stays right, so only gradients show it: each case here
compares every parameter's gradient after one compiled forward and backward with eager's.
Without dropout they agree to rounding; with dropout the two runs draw different masks (inductor
has its own random stream), so there no parameter whose eager gradient is non-zero may come back
zero. CI runs this file under every torch the README names (.ci/run).

Every case runs on the CPU and, with ``pytest --device cuda``, on a GPU; on the CPU the Triton kernel's cases
run in a subprocess with TRITON_INTERPRET=1 (tests/interpreter.py).
"""

import pytest
import torch
from interpreter import rerun_triton_cases

from makemore.kernels import cross_entropy
from makemore.kernels import loss as xent
from makemore.models import (
    MLP,
    GatedWaveNet,
    GatedWaveNetConfig,
    MLPConfig,
    Transformer,
    TransformerConfig,
    WaveNet,
    WaveNetConfig,
)

COMPILERS = ("eager", "aot_eager", "inductor")
V = 65
MODELS = {  # name: (model, whether it draws dropout masks)
    "gated": (lambda: GatedWaveNet(GatedWaveNetConfig(V, 8, 8, 16, n_levels=2)), False),
    "gated-dropout": (lambda: GatedWaveNet(GatedWaveNetConfig(V, 8, 8, 16, n_levels=2, dropout=0.2)), True),
    "wavenet": (lambda: WaveNet(WaveNetConfig(V, 4, 8, 16)), False),
    "wavenet-fused": (lambda: WaveNet(WaveNetConfig(V, 4, 8, 16, fused=True)), False),
    "transformer": (lambda: Transformer(TransformerConfig(V, block_size=4, n_layer=1, n_head=2, n_embd=8)), False),
    "mlp": (lambda: MLP(MLPConfig(V, 3, 8, 16)), False),
}

tk = xent._triton
INTERPRET = tk is not None and tk.INTERPRET
LOSS_PATHS = ["auto", "torch", "triton"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gradients(model, run, idx, targets, seed) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (zeros where none arrives) after one forward and backward through ``run``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, loss = run(idx, targets)
    loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_gradients(eager: dict, compiled: dict, exact: bool) -> None:
    zeroed = [n for n, g in eager.items() if g.count_nonzero() and not compiled[n].count_nonzero()]
    assert not zeroed, f"compiled gradients are zero where eager's are not: {zeroed}"
    if exact:
        for name, g in eager.items():
            torch.testing.assert_close(compiled[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_gradients_equal_eager(device, name, compiler, monkeypatch):
    """One training-mode forward and backward, the loss through an autograd.Function too: the fused fallback on
    the CPU, the Triton kernel on CUDA."""
    monkeypatch.setenv(xent.BACKEND_ENV, "triton" if device == "cuda" else "torch")
    make, dropout = MODELS[name]
    torch.manual_seed(0)
    model = make().train().to(device)
    R = model.receptive_field
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (4, R + 15), generator=generator)
    targets = torch.randint(0, V, (4, 16), generator=generator)
    targets[0, :3] = -100  # padding: ignored targets in the mean
    idx, targets = idx.to(device), targets.to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm's running statistics move
    eager = gradients(model, model, idx, targets, seed=2)
    model.load_state_dict(state)
    compiled = gradients(model, torch.compile(model, backend=compiler), idx, targets, seed=2)
    assert_same_gradients(eager, compiled, exact=not dropout)


@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("path", LOSS_PATHS)
def test_compiled_loss_gradient_equals_eager(device, path, compiler, reduction, inplace_grad):
    """cross_entropy alone, float32 logits (where a trailing ``.to(logits.dtype)`` is a no-op), every path
    ("auto" is F.cross_entropy at this size without inplace_grad, the fallback with it)."""
    if path == "triton" and device == "cpu" and not INTERPRET:
        pytest.skip("runs in test_triton_cases_pass_under_the_interpreter")
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 40, V, generator=generator).to(device)
    target = torch.randint(0, V, (8, 40), generator=generator).to(device)
    target[1, ::3] = -100
    weights = torch.rand(8, 40, generator=generator).to(device)  # an incoming gradient that is not all ones

    def loss(logits):
        out = cross_entropy(logits, target, reduction=reduction, inplace_grad=inplace_grad, backend=path)
        return (out * weights).sum() if reduction == "none" else out * 3.0

    grads = []
    for run in (loss, torch.compile(loss, backend=compiler, fullgraph=True)):
        x = x0.clone().requires_grad_()
        logits = x * 1.0  # not a leaf: inplace_grad writes over it
        run(logits).backward()
        grads.append(x.grad)
    assert grads[1].count_nonzero() > 0, "the compiled loss's gradient is all zeros"
    rtol, atol = (1e-4, 1e-6) if device == "cuda" else (1e-5, 1e-7)  # inductor's CUDA kernels sum in their own order
    torch.testing.assert_close(grads[1], grads[0], rtol=rtol, atol=atol)


@pytest.mark.skipif(tk is None or INTERPRET or torch.cuda.is_available(), reason="this process runs the Triton cases")
def test_triton_cases_pass_under_the_interpreter():
    rerun_triton_cases(__file__, xent.BACKEND_ENV)
