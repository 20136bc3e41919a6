"""The WaveNet's paths against each other: training steps, evaluation, and generation.

One model (makemore.models.WaveNet), its evaluation orders: (a) the lecture's per-position loop
(small sizes only), (b) batched windows through FlattenConsecutive ("windows"), (c) whole
sequences via conv1d ("conv1d"), (d) whole sequences via shifted matmuls ("conv"). At each block
size every path computes the same N·T outputs: N sequences of T outputs for (c) and (d), their
N·T windows for (a) and (b). Generation: cached (one node per level per token) against re-running
the model on the window per token. The lecture's widths throughout (n_embd 24, n_hidden 128).

    python -m pytest bench/bench_wavenet.py --benchmark-json=bench/results/wavenet.json [--device cuda]
"""

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import QUICK
from makemore.models import WaveNet, WaveNetConfig

BLOCK_SIZES = [8, 16] if QUICK else [8, 64, 256]
N, T = (2, 8) if QUICK else (8, 64)  # sequences x outputs per sequence: the same outputs per call at every block size
PATHS = ["b: windows", "c: conv1d", "d: conv"]
ORDER = {"a: per position": "windows", "b: windows": "windows", "c: conv1d": "conv1d", "d: conv": "conv"}


def node_count(path: str, block_size: int, n: int, t: int) -> int:
    """Tree-node evaluations per call: what each path's cost is proportional to."""
    if path in ("a: per position", "b: windows"):
        return n * t * (block_size - 1)
    levels = block_size.bit_length() - 1
    dense = min(levels, t.bit_length() - 1)  # as WaveNet.forward: per position below, per window above
    per_position = sum(block_size + t - 2**i for i in range(1, dense + 1))
    per_window = t * sum(block_size >> i for i in range(dense + 1, levels + 1))
    return n * (per_position + per_window)


def make_path(path: str, block_size: int, n: int, t: int, device):
    """(model, inputs, logits_of) for one path, on ``device``; the same weights for every path."""
    torch.manual_seed(42)
    model = WaveNet(WaveNetConfig(27, block_size, 24, 128, order=ORDER[path])).to(device)
    generator = torch.Generator().manual_seed(0)
    S = torch.randint(0, 27, (n, block_size + t - 1), generator=generator).to(device)
    Y = torch.randint(0, 27, (n * t,), generator=generator).to(device)
    if path == "a: per position":
        X = S.unfold(1, block_size, 1).reshape(-1, block_size)  # (N·T, B)
        return model, Y, lambda: torch.cat([model(X[[i]])[0][:, 0] for i in range(len(X))])
    if path == "b: windows":
        X = S.unfold(1, block_size, 1).reshape(-1, block_size)
        return model, Y, lambda: model(X)[0].reshape(n * t, -1)
    return model, Y, lambda: model(S)[0].reshape(n * t, -1)


def forward_backward(model, logits_of, Y):
    """One unit of training work: zero the gradients, forward, loss, backward."""

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(), Y).backward()

    return step


def describe(benchmark, group: str, path: str, block_size: int, n: int, t: int) -> None:
    benchmark.group = group
    benchmark.extra_info.update(block_size=block_size, outputs=n * t, nodes=node_count(path, block_size, n, t))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_train_step(benchmark, measure, device, block_size, path):
    """Training mode forward + backward, the trainer's step without the optimizer."""
    model, Y, logits_of = make_path(path, block_size, N, T, device)
    describe(benchmark, f"train fwd+bwd, block {block_size}", path, block_size, N, T)
    measure(benchmark, forward_backward(model.train(), logits_of, Y))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_eval_forward(benchmark, measure, device, block_size, path):
    """Eval mode forward without autograd, as evaluation runs."""
    model, Y, logits_of = make_path(path, block_size, N, T, device)
    model.eval()

    @torch.no_grad()
    def forward():
        return F.cross_entropy(logits_of(), Y)

    describe(benchmark, f"eval fwd, block {block_size}", path, block_size, N, T)
    measure(benchmark, forward)


@pytest.mark.parametrize("path", ["a: per position"] + PATHS)
def test_per_position_loop(benchmark, measure, device, path):
    """The lecture's one-window-at-a-time loop, eval mode (one window has no batch statistics), at a small size."""
    block_size, n, t = 8, 2, 16
    model, Y, logits_of = make_path(path, block_size, n, t, device)
    describe(benchmark, f"eval fwd+bwd, block {block_size}, {n * t} outputs", path, block_size, n, t)
    measure(benchmark, forward_backward(model.eval(), logits_of, Y))


@pytest.mark.parametrize("mode", ["rerun", "cached"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_generate(benchmark, measure, device, block_size, mode):
    """16 samples of 64 tokens from an empty context."""
    torch.manual_seed(42)
    model = WaveNet(WaveNetConfig(27, block_size, 24, 128)).to(device).eval()
    start = torch.zeros(16, 0, dtype=torch.int64, device=device)
    tokens = 8 if QUICK else 64

    def generate():
        return model.generate(start, tokens, cached=mode == "cached", generator=torch.Generator(device).manual_seed(0))

    benchmark.group = f"generate 16 x 64 tokens, block {block_size}"
    benchmark.extra_info.update(block_size=block_size, tokens=16 * 64, baseline=mode == "rerun")
    measure(benchmark, generate)
