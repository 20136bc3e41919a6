import lecture_reference as lecture
import pytest
import torch
import torch.nn.functional as F

from makemore.models import MLP, HierarchicalWaveNet, MLPConfig, NeuralBigram, NGram, WaveNetConfig


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "model, count",
    [
        (lambda: HierarchicalWaveNet(WaveNetConfig(27, 8, 24, 128)), 76_579),  # the lecture's final model
        (lambda: HierarchicalWaveNet(WaveNetConfig(27, 8, 10, 68)), 22_397),  # the 22K hierarchical row
        (lambda: MLP(MLPConfig(27, 3, 10, 200)), 12_097),  # the original 3-character MLP
        (lambda: MLP(MLPConfig(27, 8, 10, 200)), 22_097),  # the flat 8-character MLP
        (lambda: NeuralBigram(27), 729),
    ],
)
def test_parameter_counts(model, count):
    assert n_params(model()) == count


@pytest.mark.parametrize("block_size", [0, 1, 3, 6, 12])
def test_wavenet_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ValueError, match=f"power of two >= 2.*got {block_size}"):
        WaveNetConfig(block_size=block_size)


def test_wavenet_is_the_lectures_model_at_init_and_after_steps():
    X = torch.randint(0, 27, (500, 8))
    Y = torch.randint(0, 27, (500,))
    torch.manual_seed(42)
    ours = HierarchicalWaveNet(WaveNetConfig())
    torch.manual_seed(42)
    theirs = lecture.hierarchical(27)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    for step in range(3):
        ix = slice(step * 32, (step + 1) * 32)
        for model, params in ((ours, list(ours.parameters())), (theirs, theirs.parameters())):
            loss = F.cross_entropy(model(X[ix]), Y[ix])
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p += -0.1 * p.grad
    ours.eval()
    for layer in theirs.layers:
        layer.training = False
    assert torch.equal(ours(X), theirs(X))


def test_wavenet_rejects_wrong_window_shape_and_token_ids():
    model = HierarchicalWaveNet(WaveNetConfig())
    with pytest.raises(ValueError, match=r"windows \(N, 8\), got shape \(2, 7\)"):
        model(torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="token id 27 is out of range for a vocabulary of 27"):
        model(torch.full((2, 8), 27))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model(torch.full((2, 8), -1))


def test_bigram_counts_are_the_lectures():
    X = torch.tensor([[0], [1], [1], [2], [0]])
    Y = torch.tensor([1, 2, 2, 0, 1])
    model = NGram(3, order=2, smoothing=1.0).fit(X, Y)
    expected = torch.tensor([[0.0, 2, 0], [0, 0, 2], [1, 0, 0]]) + 1
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(model(torch.tensor([[0], [1], [2]])).exp(), expected)


def test_trigram_conditions_on_two_characters():
    X = torch.tensor([[1, 2], [2, 1], [1, 2]])
    Y = torch.tensor([0, 0, 1])
    model = NGram(3, order=3, smoothing=0.0).fit(X, Y)
    probs = model(torch.tensor([[1, 2], [2, 1]])).exp()
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))


def test_neural_bigram_learns_the_count_model():
    torch.manual_seed(0)
    X = torch.randint(0, 5, (2000, 1))
    Y = (X[:, 0] * 2 + torch.randint(0, 2, (2000,))) % 5
    counts = NGram(5, order=2, smoothing=0.0).fit(X, Y)
    net = NeuralBigram(5).fit(X, Y, steps=300, lr=10.0, weight_decay=0.0)
    assert F.cross_entropy(net(X), Y) < F.cross_entropy(counts(X), Y) + 0.01


def test_generate_extends_and_is_reproducible():
    torch.manual_seed(0)
    model = HierarchicalWaveNet(WaveNetConfig()).eval()
    start = torch.zeros(4, 0, dtype=torch.int64)
    a = model.generate(start, 12, generator=torch.Generator().manual_seed(7))
    b = model.generate(start, 12, generator=torch.Generator().manual_seed(7))
    assert a.shape == (4, 12) and torch.equal(a, b)


def test_generate_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = MLP(MLPConfig()).eval()
    idx = torch.randint(0, 27, (5, 3))
    out = model.generate(idx, 1, top_k=1)
    assert torch.equal(out[:, -1], model(idx).argmax(-1))


@pytest.mark.parametrize("kwargs, message", [({"temperature": 0.0}, "temperature must be > 0"), ({"top_k": 0}, "top_k must be >= 1")])
def test_generate_rejects_bad_sampling_options(kwargs, message):
    model = MLP(MLPConfig()).eval()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 0, dtype=torch.int64), 1, **kwargs)
