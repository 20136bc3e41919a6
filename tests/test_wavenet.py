"""ConvWaveNet's API: shapes, parameters, implementation choice, generation, and its errors."""

import pytest
import torch

from makemore.models import ConvWaveNet, HierarchicalWaveNet, WaveNetConfig
from makemore.models.wavenet import AUTO_IMPL

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(saved)


def test_same_parameters_as_the_hierarchical_model():
    conv, h = ConvWaveNet(WaveNetConfig()), HierarchicalWaveNet(WaveNetConfig())
    assert sum(p.numel() for p in conv.parameters()) == 76_579
    assert [(k, v.shape) for k, v in conv.state_dict().items()] == [(k, v.shape) for k, v in h.state_dict().items()]


def test_logits_per_output_position():
    conv = ConvWaveNet(WaveNetConfig(block_size=8)).eval()
    assert conv(torch.zeros(3, 8, dtype=torch.int64)).shape == (3, 1, 27)
    assert conv(torch.zeros(3, 20, dtype=torch.int64)).shape == (3, 13, 27)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_picks_the_measured_implementation_per_device(device):
    conv = ConvWaveNet(WaveNetConfig())
    assert conv.impl == "auto" and conv._resolved_impl(torch.device(device)) == AUTO_IMPL[device]
    assert ConvWaveNet(WaveNetConfig(), impl="conv1d")._resolved_impl(torch.device(device)) == "conv1d"


def test_valid_only_matters_in_training_mode():
    torch.manual_seed(0)
    conv = ConvWaveNet(WaveNetConfig()).eval()
    S = torch.randint(0, 27, (4, 20))
    valid = torch.rand(4, 13) < 0.5
    assert torch.equal(conv(S, valid=valid), conv(S))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size, T0", [(8, 0), (8, 3), (8, 20), (64, 5)])
def test_cached_uncached_and_hierarchical_generation_give_the_same_tokens(device, block_size, T0):
    torch.manual_seed(0)
    h = HierarchicalWaveNet(WaveNetConfig(block_size=block_size)).to(device).eval()
    with torch.no_grad():
        h.lm_head.weight *= 10  # sharper distributions than at init: sampling is then a stricter check
    conv = ConvWaveNet.from_hierarchical(h)
    idx = torch.randint(1, 27, (5, T0), device=device)
    outs = []
    for model, kwargs in ((h, {}), (conv, {}), (conv, {"cached": True})):
        generator = torch.Generator(device).manual_seed(7)
        outs.append(model.generate(idx, 30, temperature=0.9, top_k=10, generator=generator, **kwargs))
    assert outs[0].shape == (5, T0 + 30) and torch.equal(outs[0][:, :T0], idx)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_generate_nothing_returns_the_context():
    conv = ConvWaveNet(WaveNetConfig()).eval()
    idx = torch.randint(0, 27, (2, 5))
    assert torch.equal(conv.generate(idx, 0, cached=True), idx)
    assert torch.equal(conv.generate(idx, 0), idx)


def test_errors():
    with pytest.raises(ValueError, match="block_size must be a power of two >= 2.*got 6"):
        ConvWaveNet(WaveNetConfig(block_size=6))
    conv = ConvWaveNet(WaveNetConfig(block_size=8))
    with pytest.raises(ValueError, match=r"L >= block_size = 8 \(left-pad with token 0\), got shape \(2, 7\)"):
        conv(torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"got shape \(9,\)"):
        conv(torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="token id 27 is out of range for a vocabulary of 27"):
        conv(torch.full((2, 9), 27))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        conv(torch.full((2, 9), -1))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor .* \(2, 2\).*got torch.bool \(2, 9\)"):
        conv(torch.zeros(2, 9, dtype=torch.int64), valid=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got torch.float32 \(2, 2\)"):
        conv(torch.zeros(2, 9, dtype=torch.int64), valid=torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown impl 'fft'; choose one of auto, conv1d, matmul"):
        ConvWaveNet(WaveNetConfig(), impl="fft")
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        conv.generate(torch.zeros(1, 0, dtype=torch.int64), 3, cached=True)
    with pytest.raises(ValueError, match="token id 30 is out of range"):
        conv.eval().prefill(torch.full((1, 4), 30))
