"""Shared pieces of the benchmark suites: the device, device-aware timing, peak memory, and yardsticks.

    python -m bench [--device cpu|cuda]   # every suite, then docs/benchmarks/results.{json,md} and plots
    python -m bench --quick --out DIR     # CI's smoke run: tiny sizes, one round

A suite's test builds a closure doing one unit of work on ``device`` and hands it to
``measure(benchmark, fn)``: pytest-benchmark times it (synchronising CUDA after each call), then
one more call runs under a memory probe and ``benchmark.extra_info`` gets ``peak_mib``, the
most memory held at once during the call beyond what was held before it, and on CUDA
``cuda_ms``, the GPU time per call from CUDA events. ``median_seconds`` gives a suite the median
just measured, to record rates beside it; ``matmul_peak`` and ``copy_bandwidth`` measure, once per
run, the yardsticks those rates are compared with (compute-bound and memory-bound work).
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

MIB = 2**20
# MAKEMORE_BENCH_QUICK=1: every suite at tiny sizes, so CI runs them all in seconds and none can rot.
QUICK = os.environ.get("MAKEMORE_BENCH_QUICK", "") not in ("", "0")


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device the benchmarks run on (default: cuda if available, else cpu)",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but CUDA is not available")
    return device


def synchronized(fn, device: torch.device):
    """``fn``, followed on CUDA by a synchronize, so a wall-clock timer sees the finished work."""
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def cuda_ms(fn, device: torch.device, repeats: int = 5) -> float:
    """Mean GPU time of one call in milliseconds, from CUDA events (no host overhead in it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def peak_mib(fn, device: torch.device) -> float:
    """Most memory held at once during ``fn()``, above what was held when it started, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    # On CPU PyTorch keeps no allocation statistics, but the profiler logs every allocation and
    # free with the running total; page-level measures (RSS) would miss buffers that malloc reuses.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0.0
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) / MIB - before / MIB


def median_seconds(benchmark) -> float | None:
    """The median time of the benchmark just run, or None under --benchmark-disable."""
    return benchmark.stats.stats.median if getattr(benchmark, "stats", None) else None


@pytest.fixture(scope="session")
def matmul_peak(device) -> float:
    """This machine's fp32 matmul GFLOP/s in this run: the median of square GEMMs large enough to
    reach the BLAS's steady state (2048 on CPU, 8192 on CUDA); the yardstick for model FLOP/s."""
    n = 256 if QUICK else 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / _median_call(synchronized(lambda: torch.mm(a, b), device)) / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """This machine's memory bandwidth in GB/s in this run: bytes read + written by copying a
    256 MiB fp32 tensor (16 MiB in quick mode), median of several; the yardstick for
    memory-bound kernels."""
    n = (4 if QUICK else 64) << 20
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 2 * 4 * n / _median_call(synchronized(lambda: dst.copy_(src), device)) / 1e9


def _median_call(fn) -> float:
    """Median seconds of ``fn()`` over a few calls after a warm-up one."""
    fn()
    times = []
    for _ in range(3 if QUICK else 15):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture
def measure(device):
    """``measure(benchmark, fn)``: time ``fn`` with pytest-benchmark, then record its peak memory."""

    def run(benchmark, fn):
        result = benchmark(synchronized(fn, device))
        benchmark.extra_info["device"] = str(device)
        benchmark.extra_info["peak_mib"] = round(peak_mib(fn, device), 2)
        if device.type == "cuda":
            benchmark.extra_info["cuda_ms"] = round(cuda_ms(fn, device), 4)
        return result

    return run
