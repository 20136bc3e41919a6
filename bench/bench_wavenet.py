"""The lecture's WaveNet in every evaluation order, against block size: positions per second.

One model (makemore.models.WaveNet, the lecture's widths: n_embd 24, n_hidden 128), its paths:

- ``per position``: the lecture's loop, one window per call (blocks 8 and 64 only, eval mode);
- ``windows``: batched windows through FlattenConsecutive, B - 1 tree nodes per output;
- ``conv1d`` and ``conv``: whole sequences as dilated convolutions (F.conv1d, or one matmul over the
  two shifted views), each node computed once, about log2(B) nodes per output;
- ``conv, fused``: ``conv`` with BatchNorm + tanh as one autograd function (the ``fast`` recipe's);
- ``compiled conv, fused``: torch.compile of the fastest eager path (the full CPU run only, float32
  forward + backward: each block size compiles for tens of seconds, more than the GPU step's cap).

Each (dtype, phase, block size) cell times its paths interleaved (bench/timing.py), in float32
(one math mode for every path: timing.TF32) and in bfloat16 (autocast, float32 master weights).
A path's speed is positions (outputs) per second, so paths may use different batch shapes, each
big enough to keep the device busy: windows paths a batch of windows, convolutional paths
sequences of T = 4·B outputs. Beside each figure: the executed matmul FLOP/s and its share of
the matmul peak of the same dtype measured in the same run, and for the convolutional paths the
node-count ideal (B - 1) / log2(B) over batched windows with the share of it reached.

Generation: tokens per second after a full context, cached (ring buffers) against re-run (the
model on the last B tokens per token), each with and without a CUDA graph on CUDA.

``make_call`` and ``generation_call`` build one unit of work each; bench/test_regression.py times
them through pytest-benchmark.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from bench import timing
from bench.timing import OUT_OF_TIME, Deadline, interleaved, record, rounds, skipped
from makemore.device import autocast, resolve_dtype
from makemore.models import WaveNet, WaveNetConfig
from makemore.models.base import CUDAGraphed, LanguageModel, next_token, sample_next

VOCAB, N_EMBD, N_HIDDEN = 27, 24, 128
PATHS = {  # name -> WaveNetConfig settings
    "per position": dict(order="windows"),
    "windows": dict(order="windows"),
    "conv1d": dict(order="conv1d"),
    "conv": dict(order="conv"),
    "conv, fused": dict(order="conv", fused=True),
    "compiled conv, fused": dict(order="conv", fused=True),
}
WINDOW_PATHS = ("per position", "windows")
PHASES = ("fwd+bwd", "fwd")
DTYPES = ("float32", "bfloat16")


def block_sizes(quick: bool) -> list[int]:
    return [8, 16] if quick else [8, 64, 256, 1024, 4096]


def measured(path: str, block_size: int, quick: bool, compiled: bool) -> bool:
    """Whether a path runs at this block size: the per-position loop up to 64 (8 quick), windows up to 1024."""
    if path == "per position":
        return block_size <= (8 if quick else 64)
    if path == "windows":  # beyond 1024, B - 1 nodes per output take minutes
        return block_size <= 1024
    return compiled or not path.startswith("compiled")


def shape(path: str, block_size: int, device: torch.device, quick: bool) -> tuple[int, int]:
    """(rows, outputs per row) for one call: windows are rows of one output, sequences rows of T = 4·B."""
    if path == "per position":
        return (4 if quick else 32), 1
    if quick:
        return (16, 1) if path == "windows" else (2, 4 * block_size)
    big = device.type == "cuda"  # enough outputs per call to fill a GPU: 2^20 windows' nodes, 2^18 sequence outputs
    if path == "windows":
        return max(128, (2**20 if big else 2**17) // block_size), 1
    return max(2, (2**18 if big else 2**14) // (4 * block_size)), 4 * block_size


def nodes_per_level(path: str, block_size: int, rows: int, t: int) -> list[int]:
    """Tree nodes each block computes per call, as WaveNet._walk evaluates them."""
    levels = block_size.bit_length() - 1
    if path in WINDOW_PATHS:
        return [rows * (block_size >> (i + 1)) for i in range(levels)]
    dense = min(levels, t.bit_length() - 1)  # per position below, per window above (as WaveNet.forward)
    length = block_size + t - 1
    return [
        rows * (length - 2 ** (i + 1) + 1) if i < dense else rows * t * (block_size >> (i + 1)) for i in range(levels)
    ]


def matmul_flops(path: str, block_size: int, rows: int, t: int) -> int:
    """Forward matmul FLOPs per call: each node a (2·C_in) x C_out product, each output the lm_head."""
    widths = [N_EMBD] + [N_HIDDEN] * (block_size.bit_length() - 1)
    nodes = nodes_per_level(path, block_size, rows, t)
    tree = sum(n * 2 * (2 * c_in) * c_out for n, c_in, c_out in zip(nodes, widths, widths[1:]))
    return tree + rows * t * 2 * N_HIDDEN * VOCAB


def make_call(path: str, block_size: int, phase: str, dtype: str, device: torch.device, quick: bool):
    """One unit of work of ``path``: ``fwd+bwd`` zeroes the gradients, runs forward, cross-entropy and
    backward in training mode (the per-position loop in eval mode: one window alone has no batch
    statistics); ``fwd`` runs the eval-mode forward without autograd."""
    torch.manual_seed(42)
    model = WaveNet(WaveNetConfig(VOCAB, block_size, N_EMBD, N_HIDDEN, **PATHS[path])).to(device)
    model.train(phase == "fwd+bwd" and path != "per position")
    rows, t = shape(path, block_size, device, quick)
    generator = torch.Generator().manual_seed(0)
    S = torch.randint(0, VOCAB, (rows, block_size + t - 1), generator=generator).to(device)
    Y = torch.randint(0, VOCAB, (rows * t,), generator=generator).to(device)
    if path.startswith("compiled"):
        torch._dynamo.reset()  # a fresh compiler cache per cell: earlier compiles count toward its recompile limit
    run = torch.compile(model) if path.startswith("compiled") else model
    if path == "per position":
        logits_of = lambda: torch.cat([model(S[i : i + 1])[0][:, 0] for i in range(rows)])  # noqa: E731
    else:
        logits_of = lambda: run(S)[0].reshape(rows * t, -1)  # noqa: E731

    if phase == "fwd":

        @torch.no_grad()
        def call():
            with autocast(device, resolve_dtype(dtype, device)):
                return logits_of()

        return call

    def call():
        model.zero_grad(set_to_none=True)
        with autocast(device, resolve_dtype(dtype, device)):
            loss = F.cross_entropy(logits_of().float(), Y)
        loss.backward()

    return call


def orders(device: torch.device, budget_s: float, *, quick: bool = False) -> list[dict]:
    """Every (dtype, phase, block size) cell, its paths interleaved, within ``budget_s`` seconds;
    ``compiled conv, fused`` in the full CPU run only."""
    peaks = timing.peaks(device, quick)
    compiled = not quick and device.type == "cpu"
    cells = [(dtype, phase, b) for dtype in DTYPES for phase in PHASES for b in block_sizes(quick)]
    deadline, records = Deadline(budget_s), []
    for i, (dtype, phase, block_size) in enumerate(cells):
        group = f"wavenet {phase}, {dtype}"
        compiles = compiled and (dtype, phase) == ("float32", "fwd+bwd")
        paths = [p for p in PATHS if measured(p, block_size, quick, compiles)]
        if deadline.left() <= 0 and not quick:  # quick: every cell once, whatever the budget
            records += [
                skipped(group, f"{p} [{block_size}]", OUT_OF_TIME, path=p, block_size=block_size) for p in paths
            ]
            continue
        fns = {p: make_call(p, block_size, phase, dtype, device, quick) for p in paths}
        times = interleaved(fns, device, deadline.share(len(cells) - i), **rounds(quick, 50))
        del fns
        windows_rate = None
        for p in paths:
            rows, t = shape(p, block_size, device, quick)
            extra = dict(path=p, block_size=block_size, dtype=dtype, outputs=rows * t, baseline=p == "windows")
            entry = record(group, f"{p} [{block_size}]", times[p], **extra)
            seconds = entry["stats"]["median"]
            rate = rows * t / seconds
            passes = 3 if phase == "fwd+bwd" else 1  # backward: two products per forward product
            gflops = passes * matmul_flops(p, block_size, rows, t) / seconds / 1e9
            share = round(100 * gflops / peaks[f"{dtype}_gflops"], 1)
            entry["extra_info"].update(positions_per_s=round(rate), gflops=round(gflops, 2), pct_of_matmul_peak=share)
            if p == "windows":
                windows_rate = rate
            elif p not in WINDOW_PATHS:
                ideal = (block_size - 1) / math.log2(block_size)
                entry["extra_info"]["node_ideal"] = round(ideal, 1)
                if windows_rate is not None:
                    speedup = rate / windows_rate
                    entry["extra_info"].update(
                        speedup_vs_windows=round(speedup, 2), pct_of_node_ideal=round(100 * speedup / ideal)
                    )
            records.append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def gen_block_sizes(device: torch.device, quick: bool) -> list[int]:
    return [8, 16] if quick else [256, 1024] if device.type == "cuda" else [8, 64, 256, 1024]


def generation_modes(device: torch.device) -> list[str]:
    """Re-run and cached, each also replayed from a CUDA graph on CUDA."""
    return [f"{m}{g}" for m in ("rerun", "cached") for g in (("", ", CUDA graph") if device.type == "cuda" else ("",))]


def generation(device: torch.device, budget_s: float, *, quick: bool = False) -> list[dict]:
    """Tokens per second of generation after a full context, cached against re-run, each also
    replayed from a CUDA graph on CUDA (where the model's step can be captured). The prefill is
    setup; each timed call generates ``tokens`` more tokens from where the last call stopped."""
    tokens = 4 if quick else 32
    cells = [(b, n) for b in gen_block_sizes(device, quick) for n in (1, 32)]
    deadline, records = Deadline(budget_s), []
    for i, (block_size, sequences) in enumerate(cells):
        group = f"wavenet generation, {sequences} sequence{'s' if sequences > 1 else ''}"
        modes = generation_modes(device)
        if deadline.left() <= 0 and not quick:  # quick: every cell once, whatever the budget
            records += [
                skipped(group, f"{m} [{block_size}]", OUT_OF_TIME, path=m, block_size=block_size) for m in modes
            ]
            continue
        fns = {m: generation_call(m, block_size, sequences, tokens, device) for m in modes}
        times = interleaved(fns, device, deadline.share(len(cells) - i), **rounds(quick, 30))
        for mode, seconds in times.items():
            extra = dict(path=mode, block_size=block_size, sequences=sequences, baseline=mode == "rerun")
            entry = record(group, f"{mode} [{block_size}]", seconds, **extra)
            entry["extra_info"]["tokens_per_s"] = round(sequences * tokens / entry["stats"]["median"])
            records.append(entry)
    return records


def generation_call(mode: str, block_size: int, sequences: int, tokens: int, device: torch.device):
    """A call that samples ``tokens`` more tokens per sequence after a full context, continuing its
    own cache, as ``LanguageModel.generate`` does (``next_token``). ``mode``: ``cached`` (the model's
    ring buffers) or ``rerun`` (the default cache of every LanguageModel: the last B tokens, re-run
    through forward), with ``, CUDA graph``: replayed from a CUDA graph, captured at the first call."""
    torch.manual_seed(42)
    model = WaveNet(WaveNetConfig(VOCAB, block_size, N_EMBD, N_HIDDEN)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, VOCAB, (sequences, block_size), generator=generator).to(device)
    if mode.startswith("cached"):
        prefill, step = model.prefill, model.step
    else:
        prefill, step = partial(LanguageModel.prefill, model), partial(LanguageModel.step, model)
    generator = torch.Generator(device).manual_seed(0)
    sample = partial(sample_next, generator=generator)
    with torch.no_grad():
        logits, cache = prefill(context)
        token = sample(logits)  # (N,): a static buffer, rewritten in place by every token
    advance = partial(next_token, step, token, cache, sample)
    if mode.endswith("CUDA graph"):
        advance = CUDAGraphed(advance, generator)

    @torch.no_grad()
    def call():
        for _ in range(tokens):  # nothing read back to the host
            advance()

    return call
