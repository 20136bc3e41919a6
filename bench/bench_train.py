"""Whole training steps (batch, forward, backward, optimiser) in tokens per second.

The trainer's own step, as ``makemore.train.loop`` runs it: the ``lecture`` recipe at block 8
(windows of names, SGD, batch 32), the ``fast`` recipe (AdamW, batch 1024, fused BatchNorm +
tanh), the lecture's widths at block 256 over tinyshakespeare through the convolution
(sequences of 256 targets), and the gated residual WaveNet of the ``shakespeare-*`` recipes
(receptive fields 256, 512 and 1024, sequences of 1024 and 2048 targets), each eager and under
torch.compile (compiled once before timing). ``extra_info``: ``tokens``, the targets per step, and
``tokens_per_s``.

    python -m bench --out bench/results -k bench_train [--device cuda]   # this suite and its report
"""

import pytest
import torch

from bench.conftest import QUICK, median_seconds
from makemore.data import load_source
from makemore.models import build_model
from makemore.train import RECIPES, make_configs
from makemore.train.optim import make_optimizer

CASES = {
    "lecture, block 8": dict(RECIPES["lecture"]),
    "fast, block 8": dict(RECIPES["fast"]),
    "conv, block 256, shakespeare": dict(
        data="tinyshakespeare", layout="sequences", block_size=256, seq_len=256, batch_size=8, optimizer="adamw", lr=1e-3, fused=True
    ),
    "gated, R 256, shakespeare-60s": dict(RECIPES["shakespeare-60s"]),
    "gated, R 512, shakespeare-15m": dict(RECIPES["shakespeare-15m"]),
    "gated, R 1024, shakespeare-60s widths": dict(RECIPES["shakespeare-60s"], n_levels=10),
}

# Every case at toy sizes, per model.
QUICK_SIZES = {"wavenet": dict(batch_size=4, block_size=8, seq_len=16), "gated": dict(batch_size=2, n_levels=2, seq_len=16)}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, measure, device, case, compiled):
    if compiled and QUICK:
        pytest.skip("quick mode leaves torch.compile out (each case compiles for tens of seconds)")
    quick = QUICK_SIZES[CASES[case].get("model", "wavenet")] if QUICK else {}
    config, model_config = make_configs({**CASES[case], **quick, "device": str(device)})
    source = load_source(config.data, config.kind)
    torch.manual_seed(0)
    model = build_model(config.model, model_config.__class__(**{**vars(model_config), "vocab_size": len(source.vocab)})).to(device).train()
    optimizer = make_optimizer(config, model)
    generator = torch.Generator().manual_seed(0)
    R = model.receptive_field
    if compiled:
        torch._dynamo.reset()  # a fresh compiler cache per case: earlier suites' compiles count toward its recompile limit
    step_model = torch.compile(model) if compiled else model

    def step():
        batch = source.batch("train", config.batch_size, config.layout, R, generator, config.seq_len).to(device)
        _, loss = step_model(batch.idx, batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up, and torch.compile's build, outside the timing
    benchmark.group = "training step"
    T = 1 if config.layout == "windows" else config.seq_len
    benchmark.extra_info.update(path="compiled" if compiled else "eager", case=case, tokens=config.batch_size * T, receptive_field=R, baseline=not compiled)
    measure(benchmark, step)
    if (seconds := median_seconds(benchmark)) is not None:
        benchmark.extra_info["tokens_per_s"] = round(config.batch_size * T / seconds)
