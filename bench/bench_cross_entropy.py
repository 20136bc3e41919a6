"""kernels.cross_entropy against F.cross_entropy and torch.compile(F.cross_entropy).

Forward, backward and forward + backward are timed separately, with the peak memory of each.
Implementations: ``kernels.cross_entropy`` as a user calls it (backend "auto": the Triton kernel
on CUDA; on CPU the fused fallback, or F.cross_entropy itself below ATEN_BELOW logits), the
fused fallback forced (backend "torch"), the same with ``inplace_grad=True`` (the gradient
written during forward), F.cross_entropy, and torch.compile(F.cross_entropy) (skipped where
torch.compile cannot build it, e.g. without a C++ compiler). N = 4096 rows; V = 27 and 65 are
makemore's character vocabularies, 256 a byte-level one, 32,768 and 131,072 LLM-sized ones (on
CPU V = 131,072 runs with N = 1024 rows: at 4096, F.cross_entropy needs 6 GiB and seconds a call).

    python -m bench --out bench/results -k bench_cross_entropy [--device cuda]   # this suite and its report
    python -m bench --quick --out /tmp/quick -k bench_cross_entropy               # CI's smoke run: tiny sizes, one round

Each round starts from fresh logits with no gradient (setup, not timed): the backward phase times
``loss.backward()`` of a loss computed in setup. ``peak_mib`` is the most memory held at once
during the timed call beyond what was held before it (it counts the gradient that ends in
``logits.grad``); ``nv_buffers`` is the same peak in units of one (N, V) logits-sized buffer;
``gbps_at_floor`` is the bandwidth the call would use if it moved only the floor's passes over the
logits (1 forward, 2 backward, 3 both), and ``pct_of_copy_bandwidth`` its share of a large tensor
copy's bandwidth measured in the same run (``copy_bandwidth`` in conftest).
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import QUICK, cuda_ms, median_seconds, peak_mib, synchronized
from makemore.kernels import cross_entropy

N = 64 if QUICK else 4096
VOCABS = [27, 256] if QUICK else [27, 65, 256, 32768, 131072]
PHASES = ["forward", "backward", "forward+backward"]
FLOOR_PASSES = {"forward": 1, "backward": 2, "forward+backward": 3}  # passes over (N, V) the fastest kernels move
IMPLEMENTATIONS = {
    "kernels.cross_entropy": cross_entropy,
    "fused fallback": partial(cross_entropy, backend="torch"),
    "fused, inplace_grad": partial(cross_entropy, backend="torch", inplace_grad=True),
    "F.cross_entropy": F.cross_entropy,
    "torch.compile(F.cross_entropy)": None,  # built on first use
}
_compiled = {}


def implementation(name: str, device: torch.device, v: int):
    if name != "torch.compile(F.cross_entropy)":
        fn = IMPLEMENTATIONS[name]
        if name == "fused, inplace_grad" and device.type == "cuda":
            fn = partial(cross_entropy, inplace_grad=True)  # the Triton kernel's fused mode
        return fn
    if QUICK:
        pytest.skip("quick mode leaves torch.compile out (its first call compiles for tens of seconds)")
    if v not in _compiled:  # one build per V, from a fresh compiler cache (its recompile limit is per function)
        torch._dynamo.reset()
        _compiled.clear()
        _compiled[v] = torch.compile(F.cross_entropy, dynamic=False)
    return _compiled[v]


def rows_for(v: int, device: torch.device) -> int:
    return 1024 if v > 65536 and device.type != "cuda" else N


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("v", VOCABS)
def test_cross_entropy(benchmark, device, copy_bandwidth, v, phase, impl):
    n = rows_for(v, device)
    generator = torch.Generator(device).manual_seed(0)
    base = torch.randn(n, v, generator=generator, device=device)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    loss_fn = implementation(impl, device, v)
    inplace = impl == "fused, inplace_grad"

    def fresh_logits():
        # inplace_grad overwrites the logits with their gradient: each round gets its own copy.
        return (base.clone() if inplace else base).detach().requires_grad_()

    if phase == "backward":

        def setup():
            return (loss_fn(fresh_logits(), target),), {}

        def step(loss):
            loss.backward()

    else:

        def setup():
            return (fresh_logits(),), {}

        def step(logits):
            loss = loss_fn(logits, target)
            if phase == "forward+backward":
                loss.backward()

    try:
        step(*setup()[0])  # warm-up, and torch.compile's first build
    except Exception as error:  # noqa: BLE001 - torch.compile's failures vary by platform
        if impl.startswith("torch.compile"):
            pytest.skip(f"torch.compile cannot build F.cross_entropy here: {type(error).__name__}: {str(error)[:200]}")
        raise
    rounds = 1 if QUICK else max(3, min(30, int(3e7 // (n * v))))
    benchmark.group = f"cross-entropy {phase}"
    benchmark.extra_info.update(path=impl, v=v, n=n, baseline=impl == "F.cross_entropy", device=str(device))
    benchmark.pedantic(synchronized(step, device), setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)

    args, _ = setup()
    if (seconds := median_seconds(benchmark)) is not None:
        # Bandwidth at the floor's traffic (FLOOR_PASSES over the logits, whatever the implementation
        # moves): how close to the memory system each one gets, against a copy measured in this run.
        gbps = FLOOR_PASSES[phase] * base.numel() * base.element_size() / seconds / 1e9
        benchmark.extra_info.update(logits_per_s=round(n * v / seconds), gbps_at_floor=round(gbps, 1), pct_of_copy_bandwidth=round(100 * gbps / copy_bandwidth, 1))
    benchmark.extra_info["peak_mib"] = round(peak_mib(lambda: step(*args), device), 2)
    benchmark.extra_info["nv_buffers"] = round(benchmark.extra_info["peak_mib"] / (n * v * 4 / 2**20), 2)
    if device.type == "cuda" and phase != "backward" and not inplace:  # setup is free there, so the GPU time is the step's
        benchmark.extra_info["cuda_ms"] = round(cuda_ms(lambda: step(*setup()[0]), device), 4)
