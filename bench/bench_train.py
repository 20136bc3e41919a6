"""Whole training steps (batch, forward, backward, optimiser) in tokens per second.

The trainer's own step, as ``makemore.train.loop`` runs it: the ``lecture`` recipe at block 8
(windows of names, SGD, batch 32), the ``fast`` recipe (AdamW, batch 1024, fused BatchNorm +
tanh), the lecture's widths at block 256 over tinyshakespeare through the convolution
(sequences of 256 targets), the gated residual WaveNet of the ``shakespeare-*`` recipes
(receptive fields 256, 512 and 1024, sequences of 1024 and 2048 targets) and, on CUDA, the
``shakespeare-gpu`` recipe; each in float32 and bfloat16 (autocast), eager and under
torch.compile (compiled once before timing, in the recipe's compile mode), all four interleaved.
``extra_info``: ``tokens``, the targets per step, and ``tokens_per_s``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.bench_wavenet import DTYPES
from bench.timing import OUT_OF_TIME, Deadline, interleaved, record, rounds, skipped
from makemore.data import load_source
from makemore.device import autocast, resolve_dtype
from makemore.models import build_model
from makemore.train import RECIPES, make_configs
from makemore.train.optim import make_optimizer

CASES = {
    "lecture, block 8": dict(RECIPES["lecture"]),
    "fast, block 8": dict(RECIPES["fast"]),
    "conv, block 256, shakespeare": dict(
        data="tinyshakespeare",
        layout="sequences",
        block_size=256,
        seq_len=256,
        batch_size=8,
        optimizer="adamw",
        lr=1e-3,
        fused=True,
    ),
    "gated, R 256, width 64": dict(RECIPES["shakespeare-60s"], n_embd=64, n_hidden=64, n_skip=128, n_levels=8),
    "gated, R 256, shakespeare-15m": dict(RECIPES["shakespeare-15m"]),
    "gated, R 1024, width 64": dict(RECIPES["shakespeare-60s"], n_embd=64, n_hidden=64, n_skip=128, n_levels=10),
    "shakespeare-gpu": dict(RECIPES["shakespeare-gpu"]),
}
CUDA_ONLY = ("shakespeare-gpu",)  # sized for a data-centre GPU: minutes a step on a CPU

# Every case at toy sizes, per model.
QUICK_SIZES = {
    "wavenet": dict(batch_size=4, block_size=8, seq_len=16),
    "gated": dict(batch_size=2, n_levels=2, seq_len=16, n_embd=16, n_hidden=16, n_skip=32),
}


def make_step(case: str, device: torch.device, quick: bool, compiled: bool, dtype: str):
    """(one training step, targets per step) for ``case`` in ``dtype`` (float32, or bfloat16 under autocast)."""
    settings = {**CASES[case], "device": str(device), "compile": False, "compile_mode": "default", "dtype": dtype}
    mode = CASES[case].get("compile_mode", "default")
    if quick:
        settings.update(QUICK_SIZES[settings.get("model", "wavenet")])
    config, model_config = make_configs(settings)
    source = load_source(config.data, config.kind)
    torch.manual_seed(0)
    model = build_model(config.model, replace(model_config, vocab_size=len(source.vocab))).to(device).train()
    optimizer = make_optimizer(config, model)
    precision = resolve_dtype(config.dtype, device)
    generator = torch.Generator().manual_seed(0)
    R = model.receptive_field
    if compiled:
        torch._dynamo.reset()  # a fresh compiler cache per case: earlier compiles count toward its recompile limit
    step_model = torch.compile(model, mode=mode) if compiled else model

    def step():
        batch = source.batch("train", config.batch_size, config.layout, R, generator, config.seq_len).to(device)
        with autocast(device, precision):
            _, loss = step_model(batch.idx, batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    T = 1 if config.layout == "windows" else config.seq_len
    return step, config.batch_size * T


def sweep(device: torch.device, budget_s: float, *, quick: bool = False) -> list[dict]:
    """Each case eager and compiled (not in quick mode: each compiles for tens of seconds), in
    float32 and bfloat16, the paths of a case interleaved."""
    cases = [c for c in CASES if device.type == "cuda" or c not in CUDA_ONLY]
    paths = [(mode, dtype) for mode in (["eager"] if quick else ["eager", "compiled"]) for dtype in DTYPES]
    deadline, records = Deadline(budget_s), []
    for i, case in enumerate(cases):
        names = [f"{mode}, {dtype}" for mode, dtype in paths]
        if deadline.left() <= 0 and not quick:  # quick: every cell once, whatever the budget
            records += [skipped("training step", f"{case}, {n}", OUT_OF_TIME, path=n, case=case) for n in names]
            continue
        fns, tokens = {}, 0
        for (mode, dtype), name in zip(paths, names):
            fns[name], tokens = make_step(case, device, quick, compiled=mode == "compiled", dtype=dtype)
        times = interleaved(fns, device, deadline.share(len(cases) - i), **rounds(quick, 30))
        for name, seconds in times.items():
            extra = dict(path=name, case=case, tokens=tokens, baseline=name == names[0])
            entry = record("training step", f"{case}, {name}", seconds, **extra)
            entry["extra_info"]["tokens_per_s"] = round(tokens / entry["stats"]["median"])
            records.append(entry)
    return records
