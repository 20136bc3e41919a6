"""The lecture's WaveNet in every evaluation order, against block size: positions per second.

One model (makemore.models.WaveNet, the lecture's widths: n_embd 24, n_hidden 128), its paths:

- ``per position``: the lecture's loop, one window per call (blocks 8 and 64 only, eval mode);
- ``windows``: batched windows through FlattenConsecutive, B - 1 tree nodes per output;
- ``conv1d`` and ``conv``: whole sequences as dilated convolutions (F.conv1d, or one matmul over the
  two shifted views), each node computed once, about log2(B) nodes per output;
- ``conv, fused``: ``conv`` with BatchNorm + tanh as one autograd function (the ``fast`` recipe's);
- ``compiled conv, fused``: torch.compile of the fastest eager path (measured once at block 256,
  compiling plain ``conv`` instead, Inductor's own fusion, was slower than this).

A path's speed is positions (outputs) per second, so paths may use different batch shapes, each
big enough to keep the machine busy: windows paths a batch of windows, convolutional paths
sequences of T = 4·B outputs (the (B - 1)-position warm-up of each sequence then costs little).
Beside each figure, in ``extra_info``: the executed matmul FLOP/s and its share of this
machine's fp32 matmul peak measured in the same run (``matmul_peak`` in conftest), and for the
convolutional paths the node-count ideal (B - 1) / log2(B) over batched windows with the share of
it reached (the measured speed-up over ``windows`` at the same block size divided by the ideal).

    python -m bench --out bench/results -k bench_wavenet [--device cuda]   # this suite and its report
"""

import math
import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import QUICK, median_seconds, synchronized
from makemore.models import WaveNet, WaveNetConfig
from makemore.models.base import LanguageModel

VOCAB, N_EMBD, N_HIDDEN = 27, 24, 128
BLOCK_SIZES = [8, 16] if QUICK else [8, 64, 256, 1024, 4096]
WINDOWS_UP_TO = 16 if QUICK else 1024  # beyond it, B - 1 nodes per output for a batch of windows take minutes
PER_POSITION_UP_TO = 8 if QUICK else 64
PATHS = {  # name -> WaveNetConfig settings; make_path builds the per-position loop and the compiled model
    "per position": dict(order="windows"),
    "windows": dict(order="windows"),
    "conv1d": dict(order="conv1d"),
    "conv": dict(order="conv"),
    "conv, fused": dict(order="conv", fused=True),
    "compiled conv, fused": dict(order="conv", fused=True),
}
WINDOW_PATHS = ("per position", "windows")
_windows_rate: dict = {}  # (phase, block size) -> the windows path's positions/s, for the speed-ups


def shape(path: str, block_size: int) -> tuple[int, int]:
    """(rows, outputs per row) for one call: windows are rows of one output, sequences rows of T = 4·B."""
    if path == "per position":
        return 32, 1
    if path == "windows":
        return (16, 1) if QUICK else (max(128, 2**17 // block_size), 1)  # 512 windows at B 256, 128 at 1024
    return (2, 4 * block_size) if QUICK else (max(2, 2**14 // (4 * block_size)), 4 * block_size)


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


def make_path(path: str, block_size: int, device):
    """(model, call) for one path on ``device``: ``call()`` returns the logits of all its outputs, (rows·T, V)."""
    torch.manual_seed(42)
    model = WaveNet(WaveNetConfig(VOCAB, block_size, N_EMBD, N_HIDDEN, **PATHS[path])).to(device)
    rows, t = shape(path, block_size)
    generator = torch.Generator().manual_seed(0)
    S = torch.randint(0, VOCAB, (rows, block_size + t - 1), generator=generator).to(device)
    if path.startswith("compiled"):
        torch._dynamo.reset()  # a fresh compiler cache per block size: earlier compiles count toward its recompile limit
    run = torch.compile(model) if path.startswith("compiled") else model
    if path == "per position":
        return model, lambda: torch.cat([model(S[i : i + 1])[0][:, 0] for i in range(rows)])
    return model, lambda: run(S)[0].reshape(rows * t, -1)


def skip_unless_measured(path: str, block_size: int) -> None:
    if path == "per position" and block_size > PER_POSITION_UP_TO:
        pytest.skip(f"the per-position loop is measured up to block {PER_POSITION_UP_TO}")
    if path == "windows" and block_size > WINDOWS_UP_TO:
        pytest.skip(f"batched windows are measured up to block {WINDOWS_UP_TO}")
    if path.startswith("compiled") and QUICK:
        pytest.skip("quick mode leaves torch.compile out (each block size compiles for tens of seconds)")


def describe(benchmark, phase: str, path: str, block_size: int) -> None:
    """The group and the fixed facts of an entry (set before it runs: pytest-benchmark records the group then)."""
    benchmark.group = f"wavenet {phase}"
    benchmark.extra_info.update(path=path, block_size=block_size, outputs=math.prod(shape(path, block_size)), baseline=path == "windows")


def record(benchmark, phase: str, path: str, block_size: int, peak_gflops: float) -> None:
    """positions/s, FLOP/s against the matmul peak, and the node-count ideal, beside the timing."""
    rows, t = shape(path, block_size)
    passes = 3 if phase == "fwd+bwd" else 1  # backward: two products per forward product
    seconds = median_seconds(benchmark)
    if seconds is None:  # --benchmark-disable: nothing was timed
        return
    rate = rows * t / seconds
    gflops = passes * matmul_flops(path, block_size, rows, t) / seconds / 1e9
    benchmark.extra_info.update(positions_per_s=round(rate), gflops=round(gflops, 2), pct_of_matmul_peak=round(100 * gflops / peak_gflops, 1))
    if path == "windows":
        _windows_rate[phase, block_size] = rate
    elif path not in WINDOW_PATHS:
        ideal = (block_size - 1) / math.log2(block_size)
        benchmark.extra_info["node_ideal"] = round(ideal, 1)
        if (phase, block_size) in _windows_rate:
            speedup = rate / _windows_rate[phase, block_size]
            benchmark.extra_info.update(speedup_vs_windows=round(speedup, 2), pct_of_node_ideal=round(100 * speedup / ideal))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_train_forward_backward(benchmark, measure, device, matmul_peak, block_size, path):
    """Training mode: zero the gradients, forward, cross-entropy, backward (the trainer's step
    without the optimiser). The per-position loop runs in eval mode: one window alone has no batch
    statistics (its top BatchNorm would see a single node)."""
    skip_unless_measured(path, block_size)
    model, logits_of = make_path(path, block_size, device)
    model.train(path != "per position")
    Y = torch.randint(0, VOCAB, (math.prod(shape(path, block_size)),), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(), Y).backward()

    step()  # warm-up (and torch.compile's build) outside the timing
    describe(benchmark, "fwd+bwd", path, block_size)
    measure(benchmark, step)
    record(benchmark, "fwd+bwd", path, block_size, matmul_peak)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_eval_forward(benchmark, measure, device, matmul_peak, block_size, path):
    """Eval mode forward without autograd, as evaluation runs."""
    skip_unless_measured(path, block_size)
    model, logits_of = make_path(path, block_size, device)
    model.eval()
    forward = torch.no_grad()(logits_of)
    forward()
    describe(benchmark, "fwd", path, block_size)
    measure(benchmark, forward)
    record(benchmark, "fwd", path, block_size, matmul_peak)


GEN_BLOCK_SIZES = [8, 16] if QUICK else [8, 64, 256, 1024]
GEN_TOKENS = 4 if QUICK else 32


@pytest.mark.parametrize("mode", ["rerun", "cached"])
@pytest.mark.parametrize("sequences", [1, 32])
@pytest.mark.parametrize("block_size", GEN_BLOCK_SIZES)
def test_generate(benchmark, device, block_size, sequences, mode):
    """Tokens per second of generation after a full context: ``cached`` (one node per level per
    token, rings of the last 2^i nodes) against ``rerun`` (the model re-run on the last B tokens
    per token). The timed call samples GEN_TOKENS tokens; the prefill over the first window is
    setup (its one-off time is in ``prefill_ms``)."""
    torch.manual_seed(42)
    model = WaveNet(WaveNetConfig(VOCAB, block_size, N_EMBD, N_HIDDEN)).to(device).eval()
    context = torch.randint(0, VOCAB, (sequences, block_size), generator=torch.Generator().manual_seed(0)).to(device)
    if mode == "cached":
        prefill, step = model.prefill, model.step
    else:  # the default cache of every LanguageModel: the last B tokens, re-run through forward
        prefill, step = partial(LanguageModel.prefill, model), partial(LanguageModel.step, model)
    generator = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def setup():
        return prefill(context), {}

    @torch.no_grad()
    def generate(logits, cache):
        for _ in range(GEN_TOKENS):  # sampling stays on the device: no per-token host read
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            logits, cache = step(token, cache)
        return logits

    benchmark.group = f"wavenet generation, {sequences} sequence{'s' if sequences > 1 else ''}"
    benchmark.extra_info.update(path=mode, block_size=block_size, sequences=sequences, baseline=mode == "rerun")
    benchmark.pedantic(synchronized(generate, device), setup=setup, rounds=1 if QUICK else 5, iterations=1, warmup_rounds=0 if QUICK else 1)
    seconds = median_seconds(benchmark)
    if seconds is not None:
        start = time.perf_counter()
        synchronized(setup, device)()
        benchmark.extra_info.update(tokens_per_s=round(sequences * GEN_TOKENS / seconds), prefill_ms=round(1e3 * (time.perf_counter() - start), 2))
