"""The gated residual WaveNet (the paper's block): every order gives the paper's function.

The reference is makemore.reference.gated: the paper's equations written again node by node in
float64, sharing no code with the model, its dilations derived from n_levels, gradients by
autograd. Against it, in float32 and float64, at receptive fields 2, 8, 10, 31, 256 and 1024 and
with 1 to 3 stacks, with right-padded targets: the per-window loop, batched windows (as a batch of
single windows and over sequences), the convolution and cached prefill/step give the reference's
logits, loss and every parameter's gradient, in eval mode and in training mode (no dropout); a
hypothesis search covers levels, stacks, lengths and batch sizes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from orders import assert_orders_match_reference

from makemore.models import GatedWaveNet, GatedWaveNetConfig

# (n_levels, stacks, sequences, outputs per sequence): receptive fields 2, 8, 10, 31, 256, 1024.
CASES = [(1, 1, 3, 5), (3, 1, 2, 9), (2, 3, 2, 6), (4, 2, 2, 7), (8, 1, 2, 4), (10, 1, 1, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(n_levels, stacks, seed=0, vocab_size=11, **kw) -> GatedWaveNet:
    torch.manual_seed(seed)
    config = GatedWaveNetConfig(
        vocab_size, **{"n_embd": 6, "n_hidden": 5, "n_skip": 7, **kw}, n_levels=n_levels, stacks=stacks
    )
    model = GatedWaveNet(config)
    with torch.no_grad():  # away from init: non-zero biases everywhere, so that no term can hide
        for p in model.parameters():
            p += 0.1 * torch.randn_like(p)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"levels{c[0]}x{c[1]}")
def test_every_order_is_the_reference(case, dtype, device):
    n_levels, stacks, N, T = case
    width = {"n_embd": 3, "n_hidden": 3, "n_skip": 4} if n_levels >= 8 else {}
    rows = assert_orders_match_reference(make(n_levels, stacks, **width), N, T, dtype, device)
    assert {r.mode for r in rows} == {"eval", "train"} and len(rows) == 9


@settings(max_examples=30, deadline=None)
@given(
    n_levels=st.integers(1, 5),
    stacks=st.integers(1, 3),
    T=st.integers(1, 12),
    N=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_any_shape_is_the_reference(n_levels, stacks, T, N, seed):
    assert_orders_match_reference(make(n_levels, stacks, seed=seed), N, T, torch.float64, "cpu", seed=seed)


def test_receptive_field_and_parameters():
    config = GatedWaveNetConfig(65, n_embd=64, n_hidden=32, n_skip=128, n_levels=8, stacks=3)
    model = GatedWaveNet(config)
    assert model.receptive_field == 3 * 255 + 1 == 766
    L, C, G, S, V = 24, 64, 32, 128, 65
    expected = V * C + L * (2 * C * 2 * G + 2 * G + G * S) + (L - 1) * G * C + S + (S * S + S) + (S * V + V)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_every_parameter_gets_a_gradient():
    """No parameter is left out of the graph (DistributedDataParallel refuses unused ones)."""
    model = make(3, 2)
    idx = torch.randint(0, 11, (2, model.receptive_field + 3))
    model(idx, torch.randint(0, 11, (2, 4)))[1].backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("T0", [0, 3, 40])
def test_cached_and_rerun_generation_give_the_same_tokens(T0):
    model = make(3, 2, n_embd=16, n_hidden=16, n_skip=16).eval()
    with torch.no_grad():
        model.lm_head.weight *= 10  # sharp distributions: sampling is then a strict check
    idx = torch.randint(1, 11, (4, T0))
    outs = [
        model.generate(idx, 50, temperature=0.9, generator=torch.Generator().manual_seed(7), cached=cached)
        for cached in (False, True)
    ]
    assert outs[0].shape == (4, T0 + 50) and torch.equal(outs[0][:, :T0], idx)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_levels=0), "--n-levels must be >= 1"),
        (dict(stacks=0), "--stacks must be >= 1"),
        (dict(n_skip=0), "--n-skip must be >= 1"),
        (dict(n_levels=17), "--n-levels must be <= 16"),
        (dict(dropout=1.0), "--dropout must be in \\[0, 1\\)"),
        (dict(order="conv1d"), "--order must be one of conv, windows for the gated model"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        GatedWaveNetConfig(**kw)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("residual", [True, False])
def test_hand_written_backward_is_the_gradient(p, residual):
    """gradcheck in float64; the dropout mask is drawn from a reseeded generator,
    so every evaluation uses the same one."""
    from makemore.models.gated import _DilatedGated

    gen = torch.Generator().manual_seed(0)
    x, W, b = (
        torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True) for shape in ((13, 4), (8, 6), (6,))
    )
    W_res = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True) if residual else None

    def layer(x, W, b, W_res):
        torch.manual_seed(1)
        z, x_next = _DilatedGated.apply(x, 3, W, b, W_res, p)
        return (z, x_next) if residual else z

    assert torch.autograd.gradcheck(layer, (x, W, b, W_res), eps=1e-6, atol=1e-8)


def test_dropout_only_while_training():
    model = make(3, 2, dropout=0.5)
    reference = make(3, 2)
    idx = torch.randint(0, 11, (2, model.receptive_field + 6))
    assert torch.equal(model.eval()(idx)[0], reference.eval()(idx)[0])
    model.train()
    for order in ("conv", "windows"):
        model.order = order
        assert not torch.allclose(model(idx)[0], reference(idx)[0])
