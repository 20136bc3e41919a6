"""The lecture's WaveNet in every evaluation order, against block size: positions per second.

One model (makemore.models.WaveNet, the lecture's widths: n_embd 24, n_hidden 128), its paths:

- ``per position``: the lecture's loop, one window per call (blocks 8 and 64 only, eval mode);
- ``windows``: batched windows through FlattenConsecutive, B - 1 tree nodes per output;
- ``conv1d`` and ``conv``: whole sequences as dilated convolutions (F.conv1d, or one matmul over the
  two shifted views), each node computed once, about log2(B) nodes per output;
- ``conv, fused``: ``conv`` with BatchNorm + tanh as one autograd function (the ``fast`` recipe's);
- ``compiled conv, fused``: torch.compile of the fastest eager path (the full CPU run only, float32
  forward + backward: each block size compiles for tens of seconds, more than a GPU lease's budget holds).

Each (dtype, phase, block size) cell times its paths interleaved (bench/timing.py), in float32
(one math mode for every path: timing.TF32) and in bfloat16 (autocast, float32 master weights).
A path's speed is positions (outputs) per second, so paths may use different batch shapes, each
big enough to keep the device busy: windows paths a batch of windows, convolutional paths
sequences of T = 4·B outputs. Beside each figure: the executed matmul FLOP/s and its share of
the matmul peak of the same dtype measured in the same run, and for the convolutional paths the
node-count ideal (B - 1) / log2(B) over batched windows with the share of it reached.

Generation: tokens per second after a full context, cached (ring buffers) against re-run (the
model on the last B tokens per token), each with and without a CUDA graph on CUDA.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
import torch.nn.functional as F

from bench.timing import Deadline, interleaved, record, skipped
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
    big = device.type == "cuda"  # enough outputs per call to fill a GPU: 2^20 windows' nodes, 2^18 sequence outputs
    if path == "windows":
        return (16, 1) if quick else (max(128, (2**20 if big else 2**17) // block_size), 1)
    return (2, 4 * block_size) if quick else (max(2, (2**18 if big else 2**14) // (4 * block_size)), 4 * block_size)


def nodes_per_level(path: str, block_size: int, rows: int, t: int) -> list[int]:
    """Tree nodes each block computes per call, as WaveNet._walk evaluates them."""
    levels = block_size.bit_length() - 1
    if path in WINDOW_PATHS:
        return [rows * (block_size >> (i + 1)) for i in range(levels)]
    dense = min(levels, t.bit_length() - 1)  # per position below, per window above (as WaveNet.forward)
    length = block_size + t - 1
    return [rows * (length - 2 ** (i + 1) + 1) if i < dense else rows * t * (block_size >> (i + 1)) for i in range(levels)]


def matmul_flops(path: str, block_size: int, rows: int, t: int) -> int:
    """Forward matmul FLOPs per call: each node a (2·C_in) x C_out product, each output the lm_head."""
    widths = [N_EMBD] + [N_HIDDEN] * (block_size.bit_length() - 1)
    tree = sum(n * 2 * (2 * c_in) * c_out for n, c_in, c_out in zip(nodes_per_level(path, block_size, rows, t), widths, widths[1:]))
    return tree + rows * t * 2 * N_HIDDEN * VOCAB


def autocast(device: torch.device, dtype: str):
    """bfloat16: autocast, float32 master weights (as TrainConfig.dtype); float32: nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


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
            with autocast(device, dtype):
                return logits_of()

        return call

    def call():
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(logits_of().float(), Y)
        loss.backward()

    return call


def orders(device: torch.device, budget_s: float, peaks: dict, *, quick: bool = False, compiled: bool = False) -> list[dict]:
    """Every (dtype, phase, block size) cell, its paths interleaved, within ``budget_s`` seconds."""
    cells = [(dtype, phase, b) for dtype in DTYPES for phase in PHASES for b in block_sizes(quick)]
    deadline, records = Deadline(budget_s), []
    for i, (dtype, phase, block_size) in enumerate(cells):
        group = f"wavenet {phase}, {dtype}"
        paths = [p for p in PATHS if measured(p, block_size, quick, compiled and (dtype, phase) == ("float32", "fwd+bwd"))]
        if deadline.left() <= 0 and not quick:  # quick: every cell once, whatever the budget
            records += [skipped(group, f"{p} [{block_size}]", "out of time budget", path=p, block_size=block_size) for p in paths]
            continue
        fns = {p: make_call(p, block_size, phase, dtype, device, quick) for p in paths}
        times = interleaved(fns, device, deadline.share(len(cells) - i), min_rounds=1 if quick else 3, max_rounds=2 if quick else 50)
        del fns
        windows_rate = None
        for p in paths:
            rows, t = shape(p, block_size, device, quick)
            entry = record(group, f"{p} [{block_size}]", times[p], path=p, block_size=block_size, dtype=dtype, outputs=rows * t, baseline=p == "windows")
            seconds = entry["stats"]["median"]
            rate = rows * t / seconds
            passes = 3 if phase == "fwd+bwd" else 1  # backward: two products per forward product
            gflops = passes * matmul_flops(p, block_size, rows, t) / seconds / 1e9
            peak = peaks[f"{dtype}_gflops"]
            entry["extra_info"].update(positions_per_s=round(rate), gflops=round(gflops, 2), pct_of_matmul_peak=round(100 * gflops / peak, 1))
            if p == "windows":
                windows_rate = rate
            elif p not in WINDOW_PATHS:
                ideal = (block_size - 1) / math.log2(block_size)
                entry["extra_info"]["node_ideal"] = round(ideal, 1)
                if windows_rate is not None:
                    speedup = rate / windows_rate
                    entry["extra_info"].update(speedup_vs_windows=round(speedup, 2), pct_of_node_ideal=round(100 * speedup / ideal))
            records.append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def gen_block_sizes(device: torch.device, quick: bool) -> list[int]:
    return [8, 16] if quick else [256, 1024] if device.type == "cuda" else [8, 64, 256, 1024]


def generation(device: torch.device, budget_s: float, *, quick: bool = False) -> list[dict]:
    """Tokens per second of generation after a full context, cached against re-run, each also
    replayed from a CUDA graph on CUDA (where the model's step can be captured). The prefill is
    setup; each timed call generates ``tokens`` more tokens from where the last call stopped."""
    tokens = 4 if quick else 32
    cells = [(b, n) for b in gen_block_sizes(device, quick) for n in (1, 32)]
    deadline, records = Deadline(budget_s), []
    for i, (block_size, sequences) in enumerate(cells):
        group = f"wavenet generation, {sequences} sequence{'s' if sequences > 1 else ''}"
        modes = [f"{m}{g}" for m in ("rerun", "cached") for g in (("", ", CUDA graph") if device.type == "cuda" else ("",))]
        if deadline.left() <= 0 and not quick:  # quick: every cell once, whatever the budget
            records += [skipped(group, f"{m} [{block_size}]", "out of time budget", path=m, block_size=block_size) for m in modes]
            continue
        torch.manual_seed(42)
        model = WaveNet(WaveNetConfig(VOCAB, block_size, N_EMBD, N_HIDDEN)).to(device).eval()
        context = torch.randint(0, VOCAB, (sequences, block_size), generator=torch.Generator().manual_seed(0)).to(device)
        fns = {m: _generator(model, context, m.split(",")[0], tokens, device, graph=m.endswith("CUDA graph")) for m in modes}
        times = interleaved(fns, device, deadline.share(len(cells) - i), min_rounds=1 if quick else 3, max_rounds=2 if quick else 30)
        for mode, seconds in times.items():
            entry = record(group, f"{mode} [{block_size}]", seconds, path=mode, block_size=block_size, sequences=sequences, baseline=mode == "rerun")
            entry["extra_info"]["tokens_per_s"] = round(sequences * tokens / entry["stats"]["median"])
            records.append(entry)
    return records


def _generator(model: LanguageModel, context: torch.Tensor, mode: str, tokens: int, device: torch.device, graph: bool):
    """A call that samples ``tokens`` more tokens per sequence, continuing its own cache, as
    ``LanguageModel.generate`` does (``next_token``; ``graph``: replayed from a CUDA graph, captured
    at the first call, which the warm-up makes)."""
    if mode == "cached":
        prefill, step = model.prefill, model.step
    else:  # the default cache of every LanguageModel: the last B tokens, re-run through forward
        prefill, step = partial(LanguageModel.prefill, model), partial(LanguageModel.step, model)
    generator = torch.Generator(device).manual_seed(0)
    sample = partial(sample_next, generator=generator)
    with torch.no_grad():
        logits, cache = prefill(context)
        token = sample(logits)  # (N,): a static buffer, rewritten in place by every token
    advance = partial(next_token, step, token, cache, sample)
    if graph:
        advance = CUDAGraphed(advance, generator)

    @torch.no_grad()
    def call():
        for _ in range(tokens):  # nothing read back to the host
            advance()

    return call
