"""The gated residual WaveNet's orders against each other: training work and generation.

One model (makemore.models.GatedWaveNet, C = G = 64, S = 128, one stack), its orders: "windows"
(every output's window on its own, the last stack as the per-window tree) and "conv" (whole
sequences as one flat buffer, the hand-written layer). Both compute the same N·T outputs per call.
Generation: cached (one node per layer per token) against re-running the model on the last R
tokens per token.

    python -m bench --out bench/results -k bench_gated [--device cuda]   # this suite and its report
"""

import pytest
import torch

from bench.conftest import QUICK, median_seconds
from makemore.models import GatedWaveNet, GatedWaveNetConfig

LEVELS = [2, 3] if QUICK else [8, 10]  # receptive fields 4, 8 (quick) or 256, 1024
N, T = (2, 8) if QUICK else (2, 64)  # sequences x outputs per sequence


def make(n_levels: int, order: str, device) -> GatedWaveNet:
    torch.manual_seed(42)
    return GatedWaveNet(GatedWaveNetConfig(65, n_embd=64, n_hidden=64, n_skip=128, n_levels=n_levels, order=order)).to(device)


@pytest.mark.parametrize("order", ["windows", "conv"])
@pytest.mark.parametrize("n_levels", LEVELS)
def test_train_step(benchmark, measure, device, n_levels, order):
    """Forward, loss and backward over N sequences of T outputs."""
    model = make(n_levels, order, device)
    R = model.receptive_field
    generator = torch.Generator().manual_seed(0)
    S = torch.randint(0, 65, (N, R + T - 1), generator=generator).to(device)
    Y = torch.randint(0, 65, (N, T), generator=generator).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        model(S, Y)[1].backward()

    benchmark.group = f"gated fwd+bwd, {N * T} outputs"
    benchmark.extra_info.update(path=order, block_size=R, outputs=N * T, baseline=order == "windows")  # block_size: R, for the report's sweep
    measure(benchmark, step)
    if (seconds := median_seconds(benchmark)) is not None:
        benchmark.extra_info["positions_per_s"] = round(N * T / seconds)


@pytest.mark.parametrize("mode", ["rerun", "cached"])
@pytest.mark.parametrize("n_levels", LEVELS)
def test_generate(benchmark, measure, device, n_levels, mode):
    """16 samples of 64 tokens from an empty context."""
    model = make(n_levels, "conv", device).eval()
    start = torch.zeros(16, 0, dtype=torch.int64, device=device)
    tokens = 8 if QUICK else 64

    def generate():
        return model.generate(start, tokens, cached=mode == "cached", generator=torch.Generator(device).manual_seed(0))

    benchmark.group = f"gated generation, 16 x {tokens} tokens from an empty context"
    benchmark.extra_info.update(path=mode, block_size=model.receptive_field, tokens=16 * tokens, baseline=mode == "rerun")
    measure(benchmark, generate)
    if (seconds := median_seconds(benchmark)) is not None:
        benchmark.extra_info["tokens_per_s"] = round(16 * tokens / seconds)
