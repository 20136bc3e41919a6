"""The headline cases through pytest-benchmark, to track one machine's speed from commit to commit.

    pytest bench --benchmark-only                                   # every case, on the GPU where there is one
    pytest bench --benchmark-only --benchmark-save=NAME             # keep this run (in .benchmarks/)
    pytest bench --benchmark-only --benchmark-compare               # beside the last run kept
    pytest bench --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%
    pytest bench --benchmark-only --quick                           # tiny sizes, two rounds: a smoke run (CI's)

Cases: the lecture's WaveNet (bench/bench_wavenet.py) trained for one step (forward, loss, backward) in
three evaluation orders, the per-position loop, batched windows and the convolution, at a few block
sizes; generation, cached against re-run, 32 sequences; the cross-entropy paths, forward + backward:
makemore.kernels' cross_entropy as called by default and with ``inplace_grad``, against
F.cross_entropy. Each is timed in pedantic mode, fixed rounds of one call after warm-up rounds; on
CUDA each call ends with torch.cuda.synchronize(), so that a round times the device's work, not the
launches. ``extra_info`` holds the case's path and size and its rate, so that ``python -m bench.report``
reads a ``--benchmark-json`` file as it reads ``python -m bench``'s results.

pytest-benchmark times one case after another: a machine that slows down mid-run moves some cases and
not others. For figures to publish, ``python -m bench`` runs the implementations under comparison
interleaved and reports each figure's spread (docs/benchmarks.md).
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bench import bench_wavenet
from makemore.kernels import cross_entropy

ORDER_BLOCKS, QUICK_ORDER_BLOCKS = (8, 64, 256), (8, 16)
ORDERS = ("per position", "windows", "conv")
PER_POSITION_UP_TO = 64  # the lecture's loop, one window per call: beyond this it takes seconds a call
GENERATION_BLOCKS, QUICK_GENERATION_BLOCKS = (64, 256), (8,)
SEQUENCES = 32
VOCABS = (65, 32768)
LOGITS, CUDA_LOGITS, QUICK_LOGITS = 1 << 22, 1 << 26, 1 << 12  # per cross-entropy call
LOSSES = {
    "ours": cross_entropy,
    "ours, inplace_grad": partial(cross_entropy, inplace_grad=True),
    "F.cross_entropy": F.cross_entropy,
}


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    if "order" in metafunc.fixturenames:
        blocks = QUICK_ORDER_BLOCKS if quick else ORDER_BLOCKS
        cases = [(o, b) for b in blocks for o in ORDERS if o != "per position" or b <= PER_POSITION_UP_TO]
        metafunc.parametrize("order, block_size", cases, ids=[f"{o}-{b}".replace(" ", "-") for o, b in cases])
    if "generation_block" in metafunc.fixturenames:
        metafunc.parametrize("generation_block", QUICK_GENERATION_BLOCKS if quick else GENERATION_BLOCKS)


def run(benchmark, call, device: torch.device, quick: bool, per_call: int = 0, unit: str = "") -> None:
    """Time ``call`` in pedantic mode (synchronised on CUDA); with ``per_call`` units of work a call, record
    ``{unit}_per_s`` from the median."""
    if device.type == "cuda":
        work = call

        def call():
            work()
            torch.cuda.synchronize(device)

    benchmark.pedantic(call, rounds=2 if quick else 20, warmup_rounds=1 if quick else 2)
    if per_call and benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info[f"{unit}_per_s"] = round(per_call / benchmark.stats.stats.median)


def test_orders(benchmark, device, quick, order, block_size):
    """One training step of the lecture's WaveNet in one evaluation order: positions per second."""
    benchmark.group = f"orders fwd+bwd float32, block {block_size}"
    rows, t = bench_wavenet.shape(order, block_size, device, quick)
    benchmark.extra_info.update(path=order, block_size=block_size, baseline=order == "windows")
    call = bench_wavenet.make_call(order, block_size, "fwd+bwd", "float32", device, quick)
    run(benchmark, call, device, quick, rows * t, "positions")


@pytest.mark.parametrize("mode", ["rerun", "cached"])
def test_generation(benchmark, device, quick, generation_block, mode):
    """Tokens after a full context, cached (ring buffers) against re-running the model on the last B tokens."""
    benchmark.group = f"generation, {SEQUENCES} sequences, block {generation_block}"
    tokens = 4 if quick else 32
    benchmark.extra_info.update(path=mode, block_size=generation_block, baseline=mode == "rerun")
    call = bench_wavenet.generation_call(mode, generation_block, SEQUENCES, tokens, device)
    run(benchmark, call, device, quick, SEQUENCES * tokens, "tokens")


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("v", VOCABS)
def test_cross_entropy(benchmark, device, quick, v, loss):
    """Forward + backward of a float32 (N, V) leaf's loss: logits per second."""
    benchmark.group = f"cross-entropy fwd+bwd, V {v}"
    n = max(1, (QUICK_LOGITS if quick else CUDA_LOGITS if device.type == "cuda" else LOGITS) // v)
    benchmark.extra_info.update(path=loss, v=v, baseline=loss == "F.cross_entropy")
    gen = torch.Generator(device).manual_seed(0)
    logits = torch.randn(n, v, generator=gen, device=device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen, device=device)

    def call():  # inplace_grad writes the gradient over the logits: later calls read those values, as costly
        logits.grad = None
        LOSSES[loss](logits, target).backward()

    run(benchmark, call, device, quick, n * v, "logits")
