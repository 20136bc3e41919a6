"""Every way of computing the WaveNet gives the same outputs.

(a) the lecture's per-position loop, one window at a time; (b) batched windows through
FlattenConsecutive; (c) ConvWaveNet via F.conv1d; (d) ConvWaveNet via shifted-view matmuls;
(e) cached incremental steps. In eval mode all five give the same logits, loss and gradients for
every parameter, at random and at trained weights; hierarchical -> conv -> hierarchical is exact;
and in training mode ConvWaveNet's BatchNorm statistics cover exactly the nodes that feed a valid
output, checked against a brute-force reference.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from makemore.models import ConvWaveNet, FuseBlock, HierarchicalWaveNet, WaveNetConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max abs diff of unit-scale logits
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}  # max abs diff / max abs value, per parameter

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: a second thread only adds overhead, ~20x when other processes share the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) round to 10 bits; the bounds here are for true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def trained_model(config: WaveNetConfig, steps: int, seed: int = 0) -> HierarchicalWaveNet:
    """A hierarchical WaveNet after ``steps`` SGD steps in training mode (so BatchNorm's running statistics move)."""
    torch.manual_seed(seed)
    model = HierarchicalWaveNet(config)
    for _ in range(steps):
        X = torch.randint(0, config.vocab_size, (32, config.block_size))
        Y = (X[:, -1] + X[:, 0]) % config.vocab_size  # something learnable
        loss = F.cross_entropy(model(X), Y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p += -0.1 * p.grad
    return model.eval()


def windows(S: torch.Tensor, block_size: int) -> torch.Tensor:
    return S.unfold(1, block_size, 1).reshape(-1, block_size)  # (N·T, B), row n·T + j = S[n, j : j + B]


def cached_logits(model: ConvWaveNet, S: torch.Tensor) -> torch.Tensor:
    """Path (e): the first window by prefill, then one step per further token: (N, T, V)."""
    B = model.block_size
    logits, cache = model.prefill(S[:, :B])
    steps = [logits] + [model.step(S[:, t], cache) for t in range(B, S.shape[1])]
    return torch.stack(steps, 1)


def loss_and_grads(model, logits_of, Y):
    model.zero_grad(set_to_none=True)
    logits = logits_of().reshape(Y.numel(), -1)  # (N·T, V), in S's row-major order
    loss = F.cross_entropy(logits, Y.reshape(-1))
    loss.backward()
    return logits.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps", [0, 5], ids=["random", "trained"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"block{c[0]}")
def test_every_path_gives_the_same_logits_loss_and_gradients(case, steps, dtype, device):
    B, n_embd, n_hidden, N, T = case
    h = trained_model(WaveNetConfig(27, B, n_embd, n_hidden), steps).to(device, dtype)
    S = torch.randint(0, 27, (N, B + T - 1), generator=torch.Generator().manual_seed(1)).to(device)
    Y = torch.randint(0, 27, (N, T), generator=torch.Generator().manual_seed(2)).to(device)
    X = windows(S, B)
    with torch.no_grad():  # unit-scale logits, so that the absolute bounds mean what they say
        h.lm_head.weight /= h(X).std()
    if steps:
        assert not any(torch.equal(b.bn.running_var, torch.ones_like(b.bn.running_var)) for b in h.blocks)
    conv = ConvWaveNet.from_hierarchical(h, impl="conv1d")
    matmul = ConvWaveNet.from_hierarchical(h, impl="matmul")

    paths = {
        "a: per position": (h, lambda: torch.stack([h(X[[i]])[0] for i in range(len(X))])),
        "b: windows": (h, lambda: h(X)),
        "c: conv1d": (conv, lambda: conv(S)),
        "d: matmul": (matmul, lambda: matmul(S)),
        "e: cached": (matmul, lambda: cached_logits(matmul, S)),
    }
    ref_logits, ref_loss, ref_grads = loss_and_grads(*paths.pop("b: windows"), Y)
    assert 0.5 < ref_logits.std() < 2
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for name, (model, logits_of) in paths.items():
        logits, loss, grads = loss_and_grads(model, logits_of, Y)
        assert (logits - ref_logits).abs().max() <= TOL[dtype], name
        assert (loss - ref_loss).abs() <= TOL[dtype], name
        assert grads.keys() == ref_grads.keys()
        for p, g in grads.items():
            assert (g - ref_grads[p]).abs().max() <= GRAD_RTOL[dtype] * ref_grads[p].abs().max(), (name, p)


@settings(max_examples=40, deadline=None)
@given(
    log_block=st.integers(1, 5),
    T=st.integers(1, 40),
    N=st.integers(1, 3),
    impl=st.sampled_from(["conv1d", "matmul"]),
    seed=st.integers(0, 2**16),
)
def test_conv_output_j_is_the_window_ending_at_j(log_block, T, N, impl, seed):
    """Over the split between convolution levels and per-window levels, which moves with T."""
    B = 2**log_block
    h = trained_model(WaveNetConfig(11, B, 6, 10), steps=1, seed=seed).double()
    S = torch.randint(0, 11, (N, B + T - 1))
    expected = h(windows(S, B)).view(N, T, -1)
    assert (ConvWaveNet.from_hierarchical(h, impl=impl)(S) - expected).abs().max() <= 1e-12


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 3), T=st.integers(2, 20), dilation=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_dilated_fuses_x_t_with_x_t_plus_dilation(N, T, dilation, seed):
    """The Linear weight's rows for [left; right] are the conv's two taps, in both implementations."""
    torch.manual_seed(seed)
    block = FuseBlock(5, 7).double().eval()
    with torch.no_grad():
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(N, T + dilation, 5, dtype=torch.float64)
    expected = torch.stack([block(torch.cat([x[:, t], x[:, t + dilation]], -1)) for t in range(T)], 1)
    for impl in ("conv1d", "matmul"):
        assert (block.dilated(x, dilation, impl=impl) - expected).abs().max() <= 1e-12


def test_round_trip_is_exact():
    h = trained_model(WaveNetConfig(), steps=3)
    conv = ConvWaveNet.from_hierarchical(h)
    back = conv.to_hierarchical()
    for model in (conv, back):
        assert list(model.state_dict()) == list(h.state_dict())
        for key, value in model.state_dict().items():
            assert torch.equal(value, h.state_dict()[key]) and value.data_ptr() != h.state_dict()[key].data_ptr(), key
        assert not model.training
    X = torch.randint(0, 27, (50, 8))
    assert torch.equal(back(X), h(X))


def test_same_seed_same_weights_and_conversion_leaves_the_rng_alone():
    torch.manual_seed(42)
    h = HierarchicalWaveNet(WaveNetConfig())
    torch.manual_seed(42)
    conv = ConvWaveNet(WaveNetConfig())
    assert all(torch.equal(a, b) for a, b in zip(h.parameters(), conv.parameters()))
    state = torch.get_rng_state()
    conv.to_hierarchical(), ConvWaveNet.from_hierarchical(h)
    assert torch.equal(torch.get_rng_state(), state)


# Training mode: BatchNorm statistics over exactly the nodes that feed a valid output.


def brute_force_train_forward(model: ConvWaveNet, S: torch.Tensor, valid: torch.Tensor):
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
    impl=st.sampled_from(["conv1d", "matmul"]),
    seed=st.integers(0, 2**16),
)
def test_training_statistics_cover_exactly_the_nodes_of_valid_outputs(log_block, lengths, impl, seed):
    """Whole names batched as the trainer does: block_size 0s, the name, right padding (any tokens)."""
    B = 2**log_block
    T = max(lengths)
    valid = torch.arange(T) < torch.tensor(lengths)[:, None]  # (N, T): a prefix of each row
    if valid.sum() < 2:
        return  # one node per level has no unbiased variance
    torch.manual_seed(seed)
    model = ConvWaveNet(WaveNetConfig(11, B, 6, 10), impl=impl).double()
    S = torch.randint(0, 11, (len(lengths), B + T - 1))
    S[:, : B - 1] = 0
    for block in model.blocks:
        block.bn.momentum = 1.0  # running statistics := this batch's
    expected, stats = brute_force_train_forward(model, S, valid)
    logits = model(S, valid=valid)
    assert (logits - expected).abs().max() <= 1e-10
    for block, (mean, var) in zip(model.blocks, stats):
        assert (block.bn.running_mean - mean).abs().max() <= 1e-10
        assert (block.bn.running_var - var).abs().max() <= 1e-10


def test_appending_padding_changes_no_statistics_and_no_valid_output():
    torch.manual_seed(0)
    model = ConvWaveNet(WaveNetConfig(27, 8, 12, 20)).double()
    S = torch.randint(0, 27, (4, 8 + 10 - 1))
    valid = torch.arange(10) < torch.tensor([[10], [3], [7], [1]])
    padded = torch.cat([S, torch.randint(1, 27, (4, 9))], 1)  # garbage on the right: anything but the boundary
    padded_valid = torch.cat([valid, torch.zeros(4, 9, dtype=torch.bool)], 1)

    short, long, unmasked = model, *(ConvWaveNet.from_hierarchical(model.to_hierarchical()) for _ in range(2))
    out_short, out_long = short(S, valid=valid), long(padded, valid=padded_valid)
    assert (out_short[valid] - out_long[:, :10][valid]).abs().max() <= 1e-12
    for a, b in zip(short.buffers(), long.buffers()):
        assert (a - b).abs().max() <= 1e-12
    # ...while counting the padding would have moved them.
    unmasked(padded)
    assert (unmasked.blocks[0].bn.running_mean - short.blocks[0].bn.running_mean).abs().max() > 1e-3
