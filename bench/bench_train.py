"""Whole training steps (batch, forward, backward, optimiser) in tokens per second.

The trainer's own step, as ``makemore.train.loop`` runs it: the ``lecture`` recipe at block 8
(windows of names, SGD, batch 32), the ``fast`` recipe (AdamW, batch 1024, fused BatchNorm +
tanh), and the lecture's widths at block 256 over tinyshakespeare through the convolution
(sequences of 256 targets). ``extra_info["tokens"]`` is the targets per step: tokens/s = tokens
/ time.

    python -m pytest bench/bench_train.py --benchmark-json=bench/results/train.json
"""

import pytest
import torch

from bench.conftest import QUICK
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
}


QUICK_SIZES = dict(batch_size=4, block_size=8, seq_len=16)  # every case at toy sizes


@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, measure, device, case):
    config, model_config = make_configs({**CASES[case], **(QUICK_SIZES if QUICK else {}), "device": str(device)})
    source = load_source(config.data, config.kind)
    torch.manual_seed(0)
    model = build_model(config.model, model_config.__class__(**{**vars(model_config), "vocab_size": len(source.vocab)})).to(device).train()
    optimizer = make_optimizer(config, model)
    generator = torch.Generator().manual_seed(0)
    R = model.receptive_field

    def step():
        batch = source.batch("train", config.batch_size, config.layout, R, generator, config.seq_len).to(device)
        _, loss = model(batch.idx, batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.group = "training step"
    T = 1 if config.layout == "windows" else config.seq_len
    benchmark.extra_info.update(tokens=config.batch_size * T, block_size=R)
    measure(benchmark, step)
