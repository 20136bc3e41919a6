"""Every way of computing the lecture's WaveNet is the tree its equations define.

The reference is makemore.reference.tree: the equations written again node by node in float64,
sharing no code with the model, gradients by autograd. Against it, in float32 and float64, at
block sizes 2 to 1024, with right-padded targets: (a) the lecture's per-position loop (a Python
loop sliding the context, the model's layers in the notebook's Sequential order), (b) batched
windows, as a batch of single windows and over sequences, (c) conv1d, (d) conv and (e) cached
prefill/step give the reference's logits, loss and every parameter's gradient in eval mode; in
training mode (b), (c) and (d) do too, with BatchNorm's statistics over exactly the valid nodes of
each order's population, and leave the reference's running buffers. A hypothesis search covers
block sizes, lengths, padding and the fused BatchNorm. Beside it: a level's two taps, padding that
changes nothing, and the fused BatchNorm + tanh against the lecture's composition.
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from orders import assert_orders_match_reference

from makemore.check import TOLERANCES, compare, prepare, table
from makemore.data import IGNORE_INDEX
from makemore.models import WaveNet, WaveNetConfig
from makemore.nn import BatchNorm1d, batch_norm_tanh

# (block_size, n_embd, n_hidden, sequences, outputs per sequence, fused BatchNorm). T >= block_size
# computes every level as a convolution; T < block_size leaves the upper levels to the per-window
# tree, whose training statistics count a node once per window.
CASES = [
    (2, 6, 10, 3, 5, False),
    (4, 6, 10, 3, 3, False),
    (8, 6, 12, 3, 12, False),
    (8, 6, 12, 3, 6, True),
    (16, 5, 8, 2, 20, False),
    (64, 4, 6, 2, 24, False),
    (256, 3, 4, 2, 6, False),
    (1024, 3, 4, 1, 3, False),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) round to 10 bits; the bounds here are for true float32."""
    cudnn = torch.backends.cudnn
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    # flags(): the only way allowed once torch.testing._internal (the OpInfo test) has frozen cudnn's global flags.
    with cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    ):
        yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"block{c[0]}" + ("-fused" if c[5] else ""))
def test_every_order_is_the_reference_in_eval_and_training_mode(case, dtype, device):
    B, n_embd, n_hidden, N, T, fused = case
    torch.manual_seed(0)
    rows = assert_orders_match_reference(
        WaveNet(WaveNetConfig(11, B, n_embd, n_hidden, fused=fused)), N, T, dtype, device
    )
    assert {(r.order, r.mode) for r in rows} >= {
        ("per position (lecture loop)", "eval"),
        ("cached steps", "eval"),
        ("conv", "train"),
        ("windows", "train"),
    }
    assert all(r.buffers is not None for r in rows if r.mode == "train")


@settings(max_examples=30, deadline=None)
@given(
    log_block=st.integers(1, 5),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_padding_is_the_reference(log_block, lengths, fused, seed):
    """Whole names batched as the data pipeline does: row n has lengths[n] targets, then right padding (any tokens)."""
    B, T, N = 2**log_block, max(lengths), len(lengths)
    assume(sum(lengths) >= 2 and (T > 1 or N > 1))  # one node per level has no unbiased variance
    torch.manual_seed(seed)
    model = WaveNet(WaveNetConfig(11, B, 4, 6, fused=fused)).double()
    gen = torch.Generator().manual_seed(seed)
    S = torch.randint(0, 11, (N, B + T - 1), generator=gen)
    Y = torch.randint(0, 11, (N, T), generator=gen).masked_fill(
        torch.arange(T) >= torch.tensor(lengths)[:, None], IGNORE_INDEX
    )
    prepare(model, S, seed=seed)
    rows = compare(model, S, Y, dtype=torch.float64, tolerance=TOLERANCES["float64"])
    assert all(r.passed for r in rows), "\n" + table(rows)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 3), T=st.integers(2, 20), dilation=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_a_level_fuses_x_t_with_x_t_plus_dilation(N, T, dilation, seed):
    """The Linear weight's rows for [left; right] are the conv's two taps, in both convolution orders."""
    torch.manual_seed(seed)
    model = WaveNet(WaveNetConfig(11, 2, 5, 7)).double()
    block = model.blocks[0]
    x = torch.randn(N, T + dilation, 5, dtype=torch.float64)
    expected = torch.stack([block.linear(torch.cat([x[:, t], x[:, t + dilation]], -1)) for t in range(T)], 1)
    for order in ("conv1d", "conv"):
        model.order = order
        assert (model._dilated_mix(block, x, dilation) - expected).abs().max() <= 1e-12


def test_appending_padding_changes_no_statistics_and_no_valid_output():
    torch.manual_seed(0)
    short, long, unmasked = (WaveNet(WaveNetConfig(27, 8, 12, 20)).double() for _ in range(3))
    long.load_state_dict(short.state_dict())
    unmasked.load_state_dict(short.state_dict())
    S = torch.randint(0, 27, (4, 8 + 10 - 1))
    targets = torch.randint(0, 27, (4, 10)).masked_fill(
        torch.arange(10) >= torch.tensor([[10], [3], [7], [1]]), IGNORE_INDEX
    )
    padded = torch.cat([S, torch.randint(1, 27, (4, 9))], 1)  # garbage on the right: anything but the boundary
    padded_targets = torch.cat([targets, torch.full((4, 9), IGNORE_INDEX)], 1)

    (out_short, loss_short), (out_long, loss_long) = short(S, targets), long(padded, padded_targets)
    valid = targets != IGNORE_INDEX
    assert (out_short[valid] - out_long[:, :10][valid]).abs().max() <= 1e-12
    assert (loss_short - loss_long).abs() <= 1e-12
    for a, b in zip(short.buffers(), long.buffers()):
        assert (a - b).abs().max() <= 1e-12
    # ...while counting the padding would have moved them.
    unmasked(padded, torch.randint(0, 27, padded_targets.shape))
    assert (unmasked.blocks[0].bn.running_mean - short.blocks[0].bn.running_mean).abs().max() > 1e-3


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("shape", [(40, 7), (6, 5, 7)])
def test_fused_batch_norm_tanh_is_the_lectures_composition(shape, masked):
    """Values, running statistics and the gradients of input, gain and shift, in float64."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    mask = torch.rand(shape[:-1]) < 0.6 if masked else None
    upstream = torch.randn(*shape, dtype=torch.float64)
    gain, shift = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    results = []
    for fused in (False, True):
        bn = BatchNorm1d(7).double()
        with torch.no_grad():
            bn.weight.copy_(gain)
            bn.bias.copy_(shift)
        xi = x.clone().requires_grad_()
        out = batch_norm_tanh(xi, bn, mask) if fused else torch.tanh(bn(xi, mask))
        (out * upstream).sum().backward()
        results.append((out, xi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
