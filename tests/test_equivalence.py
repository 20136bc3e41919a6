"""Every way of computing the WaveNet gives the same outputs.

One model, one parameter set, several evaluation orders: (a) the lecture's per-position loop, one
window at a time; (b) batched windows through FlattenConsecutive ("windows"), on window batches
and on sequences; (c) whole sequences via F.conv1d ("conv1d"); (d) whole sequences via
shifted-view matmuls ("conv"); (e) cached incremental steps. In eval mode all of them give the same
logits, loss and gradients for every parameter, at random and at trained weights. In training
mode a window batch takes the same code in every order (bit-identical), the convolution's
BatchNorm statistics cover exactly the nodes that feed a valid output (brute force), and the fused
BatchNorm + tanh matches the lecture's composition.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from makemore.data import IGNORE_INDEX
from makemore.models import WaveNet, WaveNetConfig
from makemore.nn import BatchNorm1d, batch_norm_tanh
from orders import assert_paths_agree, cached_logits, in_order



# (block_size, n_embd, n_hidden, sequences, outputs per sequence). T >= block_size computes every
# level as a convolution; T < block_size leaves the upper levels to the per-window tree.
CASES = [
    (2, 24, 128, 3, 5),
    (4, 24, 128, 3, 3),
    (8, 24, 128, 3, 12),
    (16, 24, 64, 2, 20),
    (64, 16, 32, 2, 24),
    (256, 8, 16, 2, 8),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) round to 10 bits; the bounds here are for true float32."""
    cudnn = torch.backends.cudnn
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    # flags(): the only way allowed once torch.testing._internal (the OpInfo test) has frozen cudnn's global flags.
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def trained_model(config: WaveNetConfig, steps: int, seed: int = 0) -> WaveNet:
    """A WaveNet after ``steps`` SGD steps on windows in training mode (so BatchNorm's running statistics move)."""
    torch.manual_seed(seed)
    model = WaveNet(config)
    for _ in range(steps):
        X = torch.randint(0, config.vocab_size, (32, config.block_size))
        Y = (X[:, -1] + X[:, 0]) % config.vocab_size  # something learnable
        _, loss = model(X, Y[:, None])
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p += -0.1 * p.grad
    return model.eval()


def windows(S: torch.Tensor, block_size: int) -> torch.Tensor:
    return S.unfold(1, block_size, 1).reshape(-1, block_size)  # (N·T, B), row n·T + j = S[n, j : j + B]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps", [0, 5], ids=["random", "trained"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"block{c[0]}")
def test_every_order_gives_the_same_logits_loss_and_gradients(case, steps, dtype, device):
    B, n_embd, n_hidden, N, T = case
    h = trained_model(WaveNetConfig(27, B, n_embd, n_hidden), steps).to(device, dtype)
    S = torch.randint(0, 27, (N, B + T - 1), generator=torch.Generator().manual_seed(1)).to(device)
    Y = torch.randint(0, 27, (N, T), generator=torch.Generator().manual_seed(2)).to(device)
    X = windows(S, B)
    with torch.no_grad():  # unit-scale logits, so that the absolute bounds mean what they say
        h.lm_head.weight /= h(X)[0].std()
    if steps:
        assert not any(torch.equal(b.bn.running_var, torch.ones_like(b.bn.running_var)) for b in h.blocks)

    paths = {
        "a: per position": in_order(h, "windows", lambda: torch.cat([h(X[[i]])[0] for i in range(len(X))])),
        "b: windows": in_order(h, "windows", lambda: h(X)[0]),
        "b: windows over sequences": in_order(h, "windows", lambda: h(S)[0]),
        "c: conv1d": in_order(h, "conv1d", lambda: h(S)[0]),
        "d: conv": in_order(h, "conv", lambda: h(S)[0]),
        "e: cached": lambda: cached_logits(h, S),
    }
    assert_paths_agree(h, paths, "b: windows", Y, dtype)


@settings(max_examples=40, deadline=None)
@given(
    log_block=st.integers(1, 5),
    T=st.integers(1, 40),
    N=st.integers(1, 3),
    order=st.sampled_from(["conv1d", "conv"]),
    seed=st.integers(0, 2**16),
)
def test_conv_output_j_is_the_window_ending_at_j(log_block, T, N, order, seed):
    """Over the split between convolution levels and per-window levels, which moves with T."""
    B = 2**log_block
    h = trained_model(WaveNetConfig(11, B, 6, 10, order="windows"), steps=1, seed=seed).double()
    S = torch.randint(0, 11, (N, B + T - 1))
    expected = h(windows(S, B))[0].view(N, T, -1)
    h.order = order
    assert (h(S)[0] - expected).abs().max() <= 1e-12


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


def test_a_window_batch_takes_the_same_code_in_every_order():
    """T = 1: bit-identical logits, loss, gradients and running statistics, in training mode."""
    X, Y = torch.randint(0, 27, (64, 8)), torch.randint(0, 27, (64, 1))
    results = []
    for order in ("windows", "conv", "conv1d"):
        torch.manual_seed(42)
        model = WaveNet(WaveNetConfig(order=order))
        logits, loss = model(X, Y)
        loss.backward()
        results.append((logits, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]))
    for logits, grads, buffers in results[1:]:
        assert torch.equal(logits, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))
        assert all(torch.equal(a, b) for a, b in zip(buffers, results[0][2]))


# Training mode: BatchNorm statistics over exactly the nodes that feed a valid output.


def brute_force_train_forward(model: WaveNet, S: torch.Tensor, valid: torch.Tensor):
    """Every level at every position, with each level's statistics over the nodes listed one by one
    from every valid output's window; returns the logits (N, T, V) and each level's (mean, var)."""
    B = model.block_size
    N, L = S.shape
    x = model.wte.weight[S]  # (N, L, C); index = position in S
    stats = []
    for i, block in enumerate(model.blocks, start=1):
        d = 2 ** (i - 1)
        pre = torch.zeros(N, L, block.linear.weight.shape[1], dtype=x.dtype)
        pre[:, d:] = torch.cat([x[:, :-d], x[:, d:]], -1) @ block.linear.weight  # node p fuses p - d and p
        used = torch.zeros(N, L, dtype=torch.bool)
        for n, j in valid.nonzero().tolist():
            for k in range(B >> i):
                used[n, B - 1 + j - 2**i * k] = True  # output j's tree holds level i at these positions
        mean, var = pre[used].mean(0), pre[used].var(0)
        stats.append((mean, var))
        x = torch.tanh(block.bn.weight * (pre - mean) / torch.sqrt(var + block.bn.eps) + block.bn.bias)
    return model.lm_head(x[:, B - 1 :]), stats


@settings(max_examples=30, deadline=None)
@given(
    log_block=st.integers(1, 4),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    order=st.sampled_from(["conv1d", "conv"]),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_training_statistics_cover_exactly_the_nodes_of_valid_outputs(log_block, lengths, order, fused, seed):
    """Whole names batched as the data pipeline does: block_size 0s, the name, right padding (any tokens)."""
    B = 2**log_block
    T = max(lengths)
    valid = torch.arange(T) < torch.tensor(lengths)[:, None]  # (N, T): a prefix of each row
    if valid.sum() < 2 or T < 2:
        return  # one node per level has no unbiased variance; T = 1 is a window batch, never masked
    torch.manual_seed(seed)
    model = WaveNet(WaveNetConfig(11, B, 6, 10, order=order, fused=fused)).double()
    S = torch.randint(0, 11, (len(lengths), B + T - 1))
    S[:, : B - 1] = 0
    targets = torch.randint(0, 11, (len(lengths), T)).masked_fill(~valid, IGNORE_INDEX)
    for block in model.blocks:
        block.bn.momentum = 1.0  # running statistics := this batch's
    expected, stats = brute_force_train_forward(model, S, valid)
    logits, _ = model(S, targets)
    assert (logits - expected).abs().max() <= 1e-10
    for block, (mean, var) in zip(model.blocks, stats):
        assert (block.bn.running_mean - mean).abs().max() <= 1e-10
        assert (block.bn.running_var - var).abs().max() <= 1e-10


def test_appending_padding_changes_no_statistics_and_no_valid_output():
    torch.manual_seed(0)
    short, long, unmasked = (WaveNet(WaveNetConfig(27, 8, 12, 20)).double() for _ in range(3))
    long.load_state_dict(short.state_dict())
    unmasked.load_state_dict(short.state_dict())
    S = torch.randint(0, 27, (4, 8 + 10 - 1))
    targets = torch.randint(0, 27, (4, 10)).masked_fill(torch.arange(10) >= torch.tensor([[10], [3], [7], [1]]), IGNORE_INDEX)
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
