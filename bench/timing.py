"""How every benchmark is timed: implementations under comparison interleaved, medians and spread.

- ``interleaved({name: fn}, device, budget_s)``: rounds of one call of each implementation in
  turn (A B C A B C ..., the starting one rotating), so that a machine that slows down or speeds
  up mid-run moves every column alike; a column's spread (first to third quartile) says how far
  two columns may differ by noise alone. On CUDA each call is timed with CUDA events after a
  synchronize (the queue is empty, so launch overhead counts as it would for a user) and, with
  ``flush=True``, after zeroing a buffer twice the L2's size (memory-bound work then reads from
  device memory, not from the cache). On CPU, the host clock.
- ``peaks(device)``: the yardsticks, measured once per process so that every share in a run is
  against the same figures: float32 and bfloat16 matmul GFLOP/s (square GEMMs big enough for the
  library's steady state) and a device-to-device copy's GB/s (bytes read + written) over buffers
  of at least 8x the L2.
- ``set_math_mode(device)``: the one math mode of every float32 comparison, set once per run.
- ``record(...)``: one entry in pytest-benchmark's JSON shape, which bench/report.py reads.
- ``peak_mib(fn, device)``: the most memory one call holds at once beyond what was held before it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# Float32 on CUDA is strict IEEE float32 for every order: TF32 is off for matmuls and cuDNN
# convolutions alike (by default PyTorch lets cuDNN use TF32 but not matmuls, so conv1d would race
# the matmul orders with a 10-bit mantissa). bfloat16 is measured separately, under autocast.
TF32 = False


def set_math_mode(device: torch.device) -> str:
    """Set the run's float32 math mode (TF32 above) and say which it is, for the report."""
    torch.backends.cuda.matmul.allow_tf32 = TF32
    torch.backends.cudnn.allow_tf32 = TF32
    torch.set_float32_matmul_precision("high" if TF32 else "highest")
    if device.type != "cuda":
        return "float32 (CPU: no TF32)"
    return "float32 with TF32 on (matmuls and cuDNN)" if TF32 else "strict float32: TF32 off for matmuls and cuDNN"


class Deadline:
    """A time budget shared by the cells of a sweep: each gets an even share of what is left."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def share(self, cells_left: int) -> float:
        return max(0.0, self.left()) / max(1, cells_left)


def l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


_flush_buffers: dict = {}


def _flush(device: torch.device) -> None:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(2 * l2_bytes(device) // 4 + 1, device=device)
    _flush_buffers[device].zero_()


def time_once(fn: Callable, device: torch.device, flush: bool = False) -> float:
    """Seconds of one call of ``fn``."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    if flush:
        _flush(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved(
    fns: dict[str, Callable],
    device: torch.device,
    budget_s: float,
    *,
    min_rounds: int = 3,
    max_rounds: int = 100,
    flush: bool = False,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each ``fn``, in rounds of one call each, as many rounds as ``budget_s`` allows."""
    names = list(fns)
    if warmup:  # first calls (allocations, autotuning, lazy init) stay out of the figures
        for name in names:
            fns[name]()
    first = {name: time_once(fns[name], device, flush) for name in names}
    round_s = sum(first.values())
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(round_s, 1e-9))))
    times = {name: [first[name]] for name in names}
    for r in range(1, rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            times[name].append(time_once(fns[name], device, flush))
    return times


def rounds(quick: bool, most: int) -> dict:
    """interleaved()'s rounds for a sweep: one or two quick (figures that mean nothing), else 3 to ``most``."""
    return dict(min_rounds=1, max_rounds=2) if quick else dict(min_rounds=3, max_rounds=most)


def stats(seconds: list[float]) -> dict:
    """pytest-benchmark's ``stats`` fields that bench/report.py reads."""
    ordered = sorted(seconds)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "stddev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "q1": q[0],
        "q3": q[2],
        "iqr": q[2] - q[0],
        "rounds": len(ordered),
    }


def record(group: str, name: str, seconds: list[float], **extra_info) -> dict:
    """One benchmark entry; ``extra_info['spread_pct']`` is the interquartile range over the median."""
    s = stats(seconds)
    extra_info.setdefault("spread_pct", round(100 * s["iqr"] / s["median"], 1) if s["median"] else 0.0)
    return _entry(group, name, s, extra_info)


OUT_OF_TIME = "out of time budget"  # why a sweep's cell was not measured, where its budget ran out


def skipped(group: str, name: str, reason: str, **extra_info) -> dict:
    """An entry that was not measured, and why (the report lists it; no figure is made up)."""
    return _entry(group, name, None, dict(extra_info, skipped=reason))


def _entry(group: str, name: str, s: dict | None, extra: dict) -> dict:
    return {"group": group, "name": name, "fullname": f"{group}::{name}", "params": {}, "stats": s, "extra_info": extra}


_peaks: dict = {}


def peaks(device: torch.device, quick: bool = False, budget_s: float = 10.0) -> dict:
    """Matmul GFLOP/s in float32 (this run's math mode) and bfloat16, and copy GB/s: measured at the
    first call for ``(device, quick)`` within ``budget_s``, the same figures at every later call."""
    if (device, quick) not in _peaks:
        _peaks[device, quick] = _measure_peaks(device, quick, budget_s)
    return _peaks[device, quick]


def _measure_peaks(device: torch.device, quick: bool, budget_s: float) -> dict:
    n = 256 if quick else 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device).manual_seed(0)
    a32, b32 = (torch.randn(n, n, device=device, generator=gen) for _ in range(2))  # random data: zeros run faster
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    copy_n = (4 << 20) if quick else max(64 << 20, 8 * l2_bytes(device) // 4)  # float32 elements
    src, dst = torch.randn(copy_n, device=device, generator=gen), torch.empty(copy_n, device=device)
    times = interleaved(
        {"float32": lambda: torch.mm(a32, b32), "bfloat16": lambda: torch.mm(a16, b16), "copy": lambda: dst.copy_(src)},
        device,
        0.0 if quick else budget_s,
        min_rounds=1 if quick else 5,
        max_rounds=30,
    )
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "matmul_n": n,
        "float32_gflops": round(2 * n**3 / median["float32"] / 1e9, 1),
        "bfloat16_gflops": round(2 * n**3 / median["bfloat16"] / 1e9, 1),
        "copy_mib": copy_n * 4 >> 20,
        "copy_gbps": round(2 * 4 * copy_n / median["copy"] / 1e9, 1),
    }


def peak_mib(fn: Callable, device: torch.device) -> float:
    """Most memory held at once during ``fn()``, above what was held when it started, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
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
    return (max(e["args"]["Total Allocated"] for e in memory) - before) / 2**20
