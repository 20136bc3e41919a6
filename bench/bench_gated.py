"""The gated residual WaveNet's orders against each other: training work and generation.

One model (makemore.models.GatedWaveNet, C = G = 64, S = 128, one stack), its orders: "windows"
(every output's window on its own, the last stack as the per-window tree) and "conv" (whole
sequences as one flat buffer, the hand-written layer), interleaved (bench/timing.py), in float32
and bfloat16 (autocast). Both compute the same N·T outputs per call. Generation: cached (one node
per layer per token) against re-running the model on the last R tokens per token, 16 samples
from an empty context, without CUDA graphs (bench_wavenet's generation measures them).
"""

from __future__ import annotations

import torch

from bench.bench_wavenet import DTYPES
from bench.timing import OUT_OF_TIME, Deadline, interleaved, record, rounds, skipped
from makemore.device import autocast, resolve_dtype
from makemore.models import GatedWaveNet, GatedWaveNetConfig


def levels(quick: bool) -> list[int]:
    return [2, 3] if quick else [8, 10]  # receptive fields 4, 8 (quick) or 256, 1024


def outputs(device: torch.device, quick: bool) -> tuple[int, int]:
    """(sequences, outputs per sequence) of one training call."""
    return (2, 8) if quick else (4, 512) if device.type == "cuda" else (2, 64)


def make(n_levels: int, order: str, device) -> GatedWaveNet:
    torch.manual_seed(42)
    config = GatedWaveNetConfig(65, n_embd=64, n_hidden=64, n_skip=128, n_levels=n_levels, order=order)
    return GatedWaveNet(config).to(device)


def train_call(n_levels: int, order: str, dtype: str, device: torch.device, quick: bool):
    """Forward, loss and backward over N sequences of T outputs."""
    model = make(n_levels, order, device)
    N, T = outputs(device, quick)
    generator = torch.Generator().manual_seed(0)
    S = torch.randint(0, 65, (N, model.receptive_field + T - 1), generator=generator).to(device)
    Y = torch.randint(0, 65, (N, T), generator=generator).to(device)

    def call():
        model.zero_grad(set_to_none=True)
        with autocast(device, resolve_dtype(dtype, device)):
            loss = model(S, Y)[1]
        loss.backward()

    return call


def sweep(device: torch.device, budget_s: float, *, quick: bool = False) -> list[dict]:
    N, T = outputs(device, quick)
    tokens = 8 if quick else 64
    cells = [("train", dtype, n) for dtype in DTYPES for n in levels(quick)]
    cells += [("generate", "float32", n) for n in levels(quick)]
    deadline, records = Deadline(budget_s), []
    for i, (kind, dtype, n_levels) in enumerate(cells):
        R = 2**n_levels
        if kind == "train":
            group, unit = f"gated fwd+bwd, {N * T} outputs, {dtype}", N * T
            fns = {order: train_call(n_levels, order, dtype, device, quick) for order in ("windows", "conv")}
            base = "windows"
        else:
            group, unit = f"gated generation, 16 x {tokens} tokens from an empty context", 16 * tokens
            model = make(n_levels, "conv", device).eval()
            start = torch.zeros(16, 0, dtype=torch.int64, device=device)

            def gen(cached, model=model, start=start):
                generator = torch.Generator(device).manual_seed(0)
                return model.generate(start, tokens, cached=cached, generator=generator, cuda_graph=False)

            fns = {"rerun": lambda gen=gen: gen(False), "cached": lambda gen=gen: gen(True)}
            base = "rerun"
        if deadline.left() <= 0 and not quick:  # quick: every cell once, whatever the budget
            records += [skipped(group, f"{p} [{R}]", OUT_OF_TIME, path=p, block_size=R) for p in fns]
            continue
        times = interleaved(fns, device, deadline.share(len(cells) - i), **rounds(quick, 30))
        for path, seconds in times.items():
            # block_size: R, the axis of the report's sweep
            entry = record(group, f"{path} [{R}]", seconds, path=path, block_size=R, baseline=path == base)
            rate_key = "positions_per_s" if kind == "train" else "tokens_per_s"
            entry["extra_info"][rate_key] = round(unit / entry["stats"]["median"])
            records.append(entry)
    return records
