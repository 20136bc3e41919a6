"""The model contract, parameter counts, the lecture's model, count models, and generation."""

import contextlib

import lecture_reference as lecture
import pytest
import torch
import torch.nn.functional as F

from makemore.data import IGNORE_INDEX, Batch
from makemore.models import (
    MLP,
    GatedWaveNet,
    GatedWaveNetConfig,
    MLPConfig,
    NeuralBigram,
    NeuralBigramConfig,
    NGram,
    NGramConfig,
    Transformer,
    TransformerConfig,
    WaveNet,
    WaveNetConfig,
)
from makemore.models.base import CUDAGraphed, sample_next


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "model, count",
    [
        (lambda: WaveNet(WaveNetConfig(27, 8, 24, 128)), 76_579),  # the lecture's final model
        (lambda: WaveNet(WaveNetConfig(27, 8, 10, 68)), 22_397),  # the 22K hierarchical row
        (lambda: MLP(MLPConfig(27, 3, 10, 200)), 12_097),  # the original 3-character MLP
        (lambda: MLP(MLPConfig(27, 8, 10, 200)), 22_097),  # the flat 8-character MLP
        (lambda: NeuralBigram(NeuralBigramConfig(27)), 729),
    ],
)
def test_parameter_counts(model, count):
    assert n_params(model()) == count


@pytest.mark.parametrize(
    "make",
    [
        lambda: NGram(NGramConfig(27, n=3)),
        lambda: NeuralBigram(NeuralBigramConfig(27)),
        lambda: MLP(MLPConfig(27, 3, 10, 20)),
        lambda: WaveNet(WaveNetConfig(27, 8, 6, 10)),
        lambda: WaveNet(WaveNetConfig(27, 8, 6, 10, order="windows")),
    ],
    ids=["trigram", "bigram-nn", "mlp", "wavenet", "wavenet-windows"],
)
def test_every_model_keeps_the_contract(make):
    """forward(idx (N, L), targets (N, T)) -> (logits (N, T, V), loss), T = L - R + 1;
    output j is the window ending at j + R - 1."""
    torch.manual_seed(0)
    model = make().eval()
    R = model.receptive_field
    idx = torch.randint(0, 27, (3, R + 9))
    targets = torch.randint(0, 27, (3, 10)).masked_fill(torch.rand(3, 10) < 0.3, IGNORE_INDEX)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 27)
    assert model(idx)[1] is None
    # The loss from its definition in float64, not F.cross_entropy (which "auto" runs at this size).
    x, t = logits.detach().double().flatten(0, 1), targets.flatten()
    nll = torch.logsumexp(x, 1) - x.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(loss.double(), nll[t != IGNORE_INDEX].mean(), rtol=1e-5, atol=1e-6)
    for j in (0, 4, 9):
        torch.testing.assert_close(model(idx[:, j : j + R])[0][:, 0], logits[:, j], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"sees {R} tokens per prediction; got sequences of {R - 1} \\(left-pad"):
        model(idx[:, : R - 1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLP(MLPConfig(27, 3, 10, 20)),
        lambda: WaveNet(WaveNetConfig(27, 8, 6, 10)),
        lambda: WaveNet(WaveNetConfig(27, 8, 6, 10, fused=True)),
        lambda: GatedWaveNet(GatedWaveNetConfig(27, 8, 8, 16, n_levels=3)),
        lambda: Transformer(TransformerConfig(27, block_size=8, n_layer=2, n_head=2, n_embd=8)),
    ],
    ids=["mlp", "wavenet", "wavenet-fused", "gated", "transformer"],
)
def test_the_in_place_loss_gives_every_parameter_the_same_gradient(make):
    """loss_in_place (what the trainer sets on CUDA) writes the loss's gradient over the logits: nothing in any model
    reads them again, so autograd accepts it (it refuses a saved tensor changed in place) and the gradients agree."""
    torch.manual_seed(0)
    model = make().train()
    R = model.receptive_field
    idx = torch.randint(0, 27, (3, R + 9))
    targets = torch.randint(0, 27, (3, 10)).masked_fill(torch.rand(3, 10) < 0.3, IGNORE_INDEX)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for in_place in (False, True):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.loss_in_place = in_place
        loss = model(idx, targets)[1]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [0, 1, 3, 6, 12])
def test_wavenet_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ValueError, match=f"--block-size must be a power of two >= 2.*got {block_size}"):
        WaveNetConfig(block_size=block_size)


def test_wavenet_is_the_lectures_model_at_init_and_after_steps():
    X = torch.randint(0, 27, (500, 8))
    Y = torch.randint(0, 27, (500,))
    torch.manual_seed(42)
    ours = WaveNet(WaveNetConfig())
    torch.manual_seed(42)
    theirs = lecture.hierarchical(27)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    for step in range(3):
        ix = slice(step * 32, (step + 1) * 32)
        for model, params in ((ours, list(ours.parameters())), (theirs, theirs.parameters())):
            logits = model(X[ix], Y[ix, None])[0][:, 0] if model is ours else model(X[ix])
            loss = F.cross_entropy(logits, Y[ix])
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p += -0.1 * p.grad
    ours.eval()
    for layer in theirs.layers:
        layer.training = False
    assert torch.equal(ours(X)[0][:, 0], theirs(X))


def windows_batch(X, Y):
    return [Batch(X, Y[:, None])]


def test_bigram_counts_are_the_lectures():
    X = torch.tensor([[0], [1], [1], [2], [0]])
    Y = torch.tensor([1, 2, 2, 0, 1])
    model = NGram(NGramConfig(3, n=2, smoothing=1.0)).fit(windows_batch(X, Y))
    expected = torch.tensor([[0.0, 2, 0], [0, 0, 2], [1, 0, 0]]) + 1
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(model(torch.tensor([[0], [1], [2]]))[0][:, 0].exp(), expected)


def test_counts_skip_ignored_targets_and_slide_over_sequences():
    idx = torch.tensor([[1, 2, 1, 2]])
    targets = torch.tensor([[2, 1, IGNORE_INDEX]])  # contexts (1,2)->1... order 2: pairs 1->2, 2->1, (1->ignored)
    model = NGram(NGramConfig(3, n=2, smoothing=0.0)).fit([Batch(idx[:, :3], targets)])
    assert model.counts[1, 2] == 1 and model.counts[2, 1] == 1 and model.counts.sum() == 2


def test_trigram_conditions_on_two_characters():
    X = torch.tensor([[1, 2], [2, 1], [1, 2]])
    Y = torch.tensor([0, 0, 1])
    model = NGram(NGramConfig(3, n=3, smoothing=0.0)).fit(windows_batch(X, Y))
    probs = model(torch.tensor([[1, 2], [2, 1]]))[0][:, 0].exp()
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))


def test_neural_bigram_learns_the_count_model():
    torch.manual_seed(0)
    X = torch.randint(0, 5, (2000, 1))
    Y = (X[:, 0] * 2 + torch.randint(0, 2, (2000,))) % 5
    counts = NGram(NGramConfig(5, n=2, smoothing=0.0)).fit(windows_batch(X, Y))
    net = NeuralBigram(NeuralBigramConfig(5)).fit(windows_batch(X, Y), steps=300, lr=10.0, weight_decay=0.0)
    assert net(X, Y[:, None])[1] < counts(X, Y[:, None])[1] + 0.01


def test_generate_extends_and_is_reproducible():
    torch.manual_seed(0)
    model = WaveNet(WaveNetConfig()).eval()
    start = torch.zeros(4, 0, dtype=torch.int64)
    a = model.generate(start, 12, generator=torch.Generator().manual_seed(7))
    b = model.generate(start, 12, generator=torch.Generator().manual_seed(7))
    assert a.shape == (4, 12) and torch.equal(a, b)


@pytest.mark.parametrize("block_size, T0", [(8, 0), (8, 3), (8, 20), (64, 5)])
def test_cached_and_rerun_generation_give_the_same_tokens(device, block_size, T0):
    torch.manual_seed(0)
    model = WaveNet(WaveNetConfig(block_size=block_size)).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight *= 10  # sharper distributions than at init: sampling is then a stricter check
    idx = torch.randint(1, 27, (5, T0), device=device)
    outs = []
    for order, cached in (("windows", False), ("conv", False), ("conv", True)):
        model.order = order
        generator = torch.Generator(device).manual_seed(7)
        outs.append(model.generate(idx, 30, temperature=0.9, top_k=10, generator=generator, cached=cached))
    assert outs[0].shape == (5, T0 + 30) and torch.equal(outs[0][:, :T0], idx)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (1.0, 3), (2.0, 5)])
def test_sampling_draws_from_the_softmax(temperature, top_k):
    """Chi-square goodness of fit of 100,000 draws against softmax(logits / temperature) kept to the
    top k. The bound fails a correct sampler with probability 1e-4 (the seed is fixed here); wrong
    ones give p-values below 1e-200 (measured: a temperature applied twice where it is not 1, the
    race's argmax of p * q instead of p / q, the noise scaled by a half)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf")])  # the last one: probability 0
    n = 100_000
    tokens = sample_next(
        logits.expand(n, -1), temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.shape == (n,) and tokens.dtype == torch.int64
    kept = torch.arange(len(logits)) < (top_k or 6)  # logits are sorted: the top k come first
    expected = n * torch.softmax((logits / temperature).masked_fill(~kept, float("-inf")), -1).double()
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[~kept].sum() == 0
    chi2 = ((counts - expected)[kept] ** 2 / expected[kept]).sum()
    p_value = torch.special.gammaincc(torch.tensor((int(kept.sum()) - 1) / 2, dtype=torch.float64), chi2 / 2)
    assert p_value > 1e-4, (counts, expected)


def test_sampling_is_the_generators():
    logits = torch.randn(64, 27)
    draws = [sample_next(logits, top_k=10, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize(
    "make",
    [
        lambda: WaveNet(WaveNetConfig(27, 8, 6, 10)),
        lambda: GatedWaveNet(GatedWaveNetConfig(27, 6, 5, 7, n_levels=3)),
        lambda: MLP(MLPConfig(27, 3, 10, 20)),
    ],
    ids=["wavenet", "gated", "mlp"],
)
def test_generate_is_the_plain_loop(make):
    """generate's in-place loop over static buffers (what a CUDA graph replays)
    against prefill, sample, step written out."""
    torch.manual_seed(0)
    model = make().eval()
    idx = torch.randint(1, 27, (3, 4))
    out = model.generate(idx, 20, temperature=0.8, top_k=6, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    logits, cache = model.prefill(idx)
    tokens = []
    for _ in range(20):
        tokens.append(sample_next(logits, temperature=0.8, top_k=6, generator=generator))
        logits, cache = model.step(tokens[-1].clone(), cache)
    assert torch.equal(out, torch.cat([idx, torch.stack(tokens, 1)], 1))


@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "rerun"])
def test_cuda_graph_generation_gives_the_loops_tokens(device, cached):
    torch.manual_seed(0)
    model = GatedWaveNet(GatedWaveNetConfig(27, 16, 16, 16, n_levels=4)).to(device).eval()
    idx = torch.randint(1, 27, (5, 3), device=device)
    outs = [
        model.generate(
            idx,
            40,
            temperature=0.9,
            top_k=10,
            generator=torch.Generator(device).manual_seed(7),
            cached=cached,
            cuda_graph=graph,
        )
        for graph in (False, True)
    ]
    assert torch.equal(outs[0], outs[1])


def test_cuda_graphed_runs_once_eagerly_then_captures_then_replays(monkeypatch):
    """CUDAGraphed's protocol, on CPU with stand-ins for torch.cuda's stream and graph: the first call
    runs the function (on a side stream) and captures it with the generator registered; later calls replay."""
    events = []

    class Graph:
        def register_generator_state(self, generator):
            events.append(("register", generator))

        def capture_begin(self):
            events.append("capture")

        def capture_end(self):
            events.append("end")

        def replay(self):
            events.append("replay")

    class Stream:
        def wait_stream(self, other):
            events.append("wait")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext(events.append("on side stream")))
    generator = torch.Generator()
    graphed = CUDAGraphed(lambda: events.append("run"), generator)
    for _ in range(3):
        graphed()
    assert events == [
        "wait",
        "on side stream",
        "run",
        ("register", generator),
        "capture",
        "run",
        "end",
        "wait",
        "replay",
        "replay",
    ]


def test_generate_nothing_returns_the_context():
    model = WaveNet(WaveNetConfig()).eval()
    idx = torch.randint(0, 27, (2, 5))
    assert torch.equal(model.generate(idx, 0), idx)


def test_generate_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = MLP(MLPConfig()).eval()
    idx = torch.randint(0, 27, (5, 3))
    out = model.generate(idx, 1, top_k=1)
    assert torch.equal(out[:, -1], model(idx)[0][:, -1].argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message", [({"temperature": 0.0}, "temperature must be > 0"), ({"top_k": 0}, "top_k must be >= 1")]
)
def test_generate_rejects_bad_sampling_options(kwargs, message):
    model = MLP(MLPConfig()).eval()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 0, dtype=torch.int64), 1, **kwargs)


def test_generation_errors():
    model = WaveNet(WaveNetConfig())
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        model.generate(torch.zeros(1, 0, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="token id 30 is out of range for a vocabulary of 27"):
        model.eval().generate(torch.full((1, 4), 30), 3)
    with pytest.raises(ValueError, match="--order must be one of conv, conv1d, windows, got 'fft'"):
        WaveNetConfig(order="fft")
