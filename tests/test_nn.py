"""The lecture's layers against torch.nn / torch.nn.functional and against the lecture's own code."""

import lecture_reference as lecture
import pytest
import torch
import torch.nn.functional as F

from makemore import nn as mm


def test_linear_is_x_at_weight_plus_bias():
    torch.manual_seed(0)
    layer = mm.Linear(5, 3)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 7, 5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight.T, layer.bias))
    assert mm.Linear(5, 3, bias=False).bias is None


def test_linear_init_is_the_lectures():
    torch.manual_seed(1)
    ours = mm.Linear(48, 128)
    torch.manual_seed(1)
    theirs = lecture.Linear(48, 128)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_embedding_matches_functional():
    torch.manual_seed(0)
    layer = mm.Embedding(27, 10)
    idx = torch.randint(0, 27, (4, 8))
    assert torch.equal(layer(idx), F.embedding(idx, layer.weight))


def test_tanh():
    x = torch.randn(10)
    assert torch.equal(mm.Tanh()(x), torch.tanh(x))


def test_flatten_consecutive_concatenates_oldest_first_and_squeezes():
    x = torch.arange(2 * 4 * 3).view(2, 4, 3)
    out = mm.FlattenConsecutive(2)(x)
    assert out.shape == (2, 2, 6)
    assert torch.equal(out[:, 1], torch.cat([x[:, 2], x[:, 3]], dim=1))
    assert mm.FlattenConsecutive(4)(x).shape == (2, 12)
    with pytest.raises(ValueError, match="divisible by 3"):
        mm.FlattenConsecutive(3)(x)


def to_ncl(x):
    return x.transpose(1, 2) if x.ndim == 3 else x


@pytest.mark.parametrize("shape", [(64, 16), (32, 4, 16)])
def test_batchnorm_eval_is_torch_batchnorm_on_running_stats(shape):
    torch.manual_seed(0)
    ours, ref = mm.BatchNorm1d(16), torch.nn.BatchNorm1d(16)
    with torch.no_grad():
        for t in (ours, ref):
            t.weight.copy_(torch.linspace(0.5, 2, 16))
            t.bias.copy_(torch.linspace(-1, 1, 16))
            t.running_mean.copy_(torch.linspace(-3, 3, 16))
            t.running_var.copy_(torch.linspace(0.1, 4, 16))
    ours.eval(), ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), to_ncl(ref(to_ncl(x))))


@pytest.mark.parametrize("shape", [(64, 16), (32, 4, 16)])
def test_batchnorm_training_uses_the_unbiased_variance_and_updates_like_torch(shape):
    torch.manual_seed(0)
    ours, ref = mm.BatchNorm1d(16), torch.nn.BatchNorm1d(16)
    x = torch.randn(shape) * 3 + 1
    out = ours(x)
    ref(to_ncl(x))
    dims = tuple(range(x.ndim - 1))
    expected = (x - x.mean(dims)) / torch.sqrt(x.var(dims, unbiased=True) + 1e-5)
    torch.testing.assert_close(out, expected)
    # torch.nn also keeps the unbiased variance in its running estimate: the updates agree.
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("shape", [(64, 16), (32, 4, 16)])
def test_batchnorm_matches_the_lectures_class_in_both_modes(shape):
    ours, theirs = mm.BatchNorm1d(16), lecture.BatchNorm1d(16)
    for _ in range(3):
        x = torch.randn(shape)
        assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.running_var, theirs.running_var.flatten())
    ours.eval()
    theirs.training = False
    x = torch.randn(shape)
    assert torch.equal(ours(x), theirs(x))


def test_batchnorm_mask_takes_statistics_from_the_masked_positions_only():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    mask = torch.rand(4, 6) > 0.3
    masked, plain = mm.BatchNorm1d(8), mm.BatchNorm1d(8)
    out = masked(x, mask)
    ref = plain(x[mask])
    torch.testing.assert_close(out[mask], ref)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)
