"""kernels' cross_entropy against F.cross_entropy and torch.compile(F.cross_entropy), within a time budget.

    python -m bench --only cross-entropy [--device cuda] [--budget SECONDS]   # this suite and its report
    bash bench/gpu.sh                                                          # on a lent GPU, with the rest

``sweep(device, budget_s, quick=False, peaks=None) -> list[dict]`` is the whole suite: entries in
pytest-benchmark's JSON shape (bench/timing.py's ``record``) that bench/report.py turns into tables.

Cells: V = 27 and 65 (makemore's character vocabularies), 256 (bytes), 32,768 and 131,072
(LLM-sized), each timed forward and forward + backward. The implementations of one cell run
interleaved (A B C A B C ..., bench/timing.py), so a machine that speeds up or slows down moves
every column alike, and each cell reports its spread (interquartile range over the median):
two columns running the same code (on CPU at large V, ``kernels.cross_entropy`` and the forced
fallback) must agree within it. On CUDA each call is timed with CUDA events after an L2 flush,
and the logits rotate through buffers that together hold at least 8x the L2, each call's own at
least 2x, so the figures measure device memory, not the cache; ``gbps_at_floor`` is the bandwidth
the call would use if it moved only the floor's passes over the logits (1 forward, 3 forward +
backward), beside ``pct_of_copy_bandwidth``, its share of a device-to-device copy timed the same
way in the same run (``timing.peaks``). ``peak_mib`` is the most memory one call holds beyond
what was held before it (the gradient included), ``nv_buffers`` the same in (N, V) float32
buffers, both for forward + backward. Cells run largest V first, so a short budget measures the
sizes that matter most for bandwidth.

The crossover (measured first, in a quarter of the budget): forward + backward of the fused path (the Triton kernel on CUDA, the fallback on
CPU) against F.cross_entropy over sizes from 2^12 to 2^24 logits at V = 27 and 65, in cache (as
a training step's logits are). Its ``crossover`` entry is the smallest size from which the fused
path is never slower; ``cuda_aten_below`` (on CUDA) is the value to give
kernels/loss.py's CUDA_ATEN_BELOW, ``aten_below`` on CPU its ATEN_BELOW.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.timing import Deadline, _l2_bytes, interleaved, peak_mib, record, skipped
from makemore.kernels import cross_entropy

VOCABS = [27, 65, 256, 32768, 131072]
QUICK_VOCABS = [27, 256]
PHASES = {"forward": 1, "forward+backward": 3}  # passes over (N, V) the fastest kernels move
CROSSOVER_VOCABS = (27, 65)
CROSSOVER_SIZES = [1 << k for k in range(12, 25)]  # logits per call (2^24 fp32: 64 MiB, past an H100's L2)
COMPILE_BUDGET_S = 20.0  # a cell's torch.compile build is tried only with this much time left


def implementations(device: torch.device) -> dict:
    """name -> loss function (or None: torch.compile(F.cross_entropy), built per cell)."""
    fused = "triton" if device.type == "cuda" else "torch"
    return {
        "kernels.cross_entropy": cross_entropy,  # "auto", as a user calls it
        f"fused ({fused})": partial(cross_entropy, backend=fused),
        f"fused ({fused}), inplace_grad": partial(cross_entropy, backend=fused, inplace_grad=True),
        "F.cross_entropy": F.cross_entropy,
        "torch.compile(F.cross_entropy)": None,
    }


def rows_for(v: int, device: torch.device, quick: bool) -> int:
    """Rows per call: on CUDA at least 2x the L2 of logits (and 4096 rows); on CPU 4096 (1024 at V > 65536)."""
    if quick:
        return 64
    if device.type == "cuda":
        return max(4096, math.ceil(2 * _l2_bytes(device) / (4 * v)))
    return 1024 if v > 65536 else 4096


class Buffers:
    """Logits to rotate through (together at least 8x the L2 on CUDA) and their targets.

    inplace_grad writes each call's gradient over its logits: the next calls read those values as
    logits, which costs the same (they are finite), so no copy is timed with it.
    """

    def __init__(self, n: int, v: int, device: torch.device, quick: bool):
        l2 = _l2_bytes(device)
        count = 1 if quick or not l2 else max(2, math.ceil(8 * l2 / (n * v * 4)))
        gen = torch.Generator(device).manual_seed(0)
        self.logits = [torch.randn(n, v, generator=gen, device=device) for _ in range(count)]
        self.target = torch.randint(0, v, (n,), generator=gen, device=device)
        self.turn = 0

    def next(self) -> torch.Tensor:
        """The next logits, as a leaf wanting a gradient."""
        self.turn = (self.turn + 1) % len(self.logits)
        return self.logits[self.turn].requires_grad_()


def call(loss_fn, buffers: Buffers, phase: str):
    """One unit of work: the loss (and its backward) of the next logits."""

    def run():
        x = buffers.next()
        loss = loss_fn(x, buffers.target)
        if phase == "forward+backward":
            loss.backward()
        x.grad = None

    return run


_compiled_for: dict = {}


def _compiled(v: int, deadline: Deadline):
    """torch.compile(F.cross_entropy) for this V (both phases share it), or the reason it is not measured."""
    if v in _compiled_for:
        return _compiled_for[v], None
    if deadline.left() < COMPILE_BUDGET_S:
        return None, "out of time budget (torch.compile's build)"
    torch._dynamo.reset()  # one build per V, from a fresh cache (its recompile limit is per function)
    _compiled_for.clear()
    _compiled_for[v] = torch.compile(F.cross_entropy, dynamic=False)
    return _compiled_for[v], None


CROSSOVER_SHARE = 0.25  # of the budget, spent first: the crossover sets CUDA_ATEN_BELOW
ROW_TILE_SHARE = 0.1  # then, on CUDA, the Triton kernel's elements per program at small V
ROW_TILES = (1024, 2048, 4096, 8192)
ROW_TILE_VOCABS = (27, 65, 256)


def sweep(device: torch.device, budget_s: float, quick: bool = False, peaks: dict | None = None) -> list[dict]:
    """The whole suite within ``budget_s`` seconds: the crossover, then the cells."""
    started = time.perf_counter()
    records = crossover(device, 0.0 if quick else CROSSOVER_SHARE * budget_s, quick)
    if device.type == "cuda":
        records += row_tiles(device, 0.0 if quick else ROW_TILE_SHARE * budget_s, quick)
    deadline = Deadline(budget_s - (time.perf_counter() - started))
    # Largest V first, forward + backward first: the cells that matter most get measured within a short budget.
    cells = [(v, phase) for v in sorted(QUICK_VOCABS if quick else VOCABS, reverse=True) for phase in reversed(PHASES)]
    copy_gbps = (peaks or {}).get("copy_gbps")
    for i, (v, phase) in enumerate(cells):
        n = rows_for(v, device, quick)
        group = f"cross-entropy {phase}"
        names = implementations(device)
        if deadline.left() <= 0 and not quick:
            records += [skipped(group, f"{name} [{v}]", "out of time budget", path=name, v=v) for name in names]
            continue
        buffers = Buffers(n, v, device, quick)
        overwritten = Buffers(n, v, device, quick)  # for inplace_grad, whose calls overwrite their logits
        fns, first_call_s = {}, None
        for name, fn in names.items():
            mine = overwritten if name.endswith("inplace_grad") else buffers
            if fn is None:
                if quick:
                    records.append(skipped(group, f"{name} [{v}]", "quick mode leaves torch.compile out", path=name, v=v))
                    continue
                fn, reason = _compiled(v, deadline)
                if fn is None:
                    records.append(skipped(group, f"{name} [{v}]", reason, path=name, v=v))
                    continue
                start = time.perf_counter()
                try:
                    call(fn, mine, phase)()  # the build, outside the timed rounds
                except Exception as error:  # noqa: BLE001 - torch.compile's failures vary by platform
                    records.append(skipped(group, f"{name} [{v}]", f"torch.compile failed: {type(error).__name__}", path=name, v=v))
                    continue
                first_call_s = round(time.perf_counter() - start, 1)
            fns[name] = call(fn, mine, phase)
        share = deadline.share(len(cells) - i) if not quick else 0.0
        times = interleaved(fns, device, share, min_rounds=1 if quick else 3, max_rounds=2 if quick else 50, flush=device.type == "cuda")
        for name, seconds in times.items():
            entry = record(group, f"{name} [{v}]", seconds, path=name, v=v, n=n, baseline=name == "F.cross_entropy", device=str(device))
            median = entry["stats"]["median"]
            gbps = PHASES[phase] * n * v * 4 / median / 1e9
            info = entry["extra_info"]
            info.update(logits_per_s=round(n * v / median), gbps_at_floor=round(gbps, 1))
            if copy_gbps:
                info["pct_of_copy_bandwidth"] = round(100 * gbps / copy_gbps, 1)
            if name.startswith("torch.compile") and first_call_s is not None:
                info["first_call_s"] = first_call_s  # the build, for the first phase of a V
            if phase == "forward+backward":  # the phase that holds the most; probing costs a call (and on CPU a profile)
                info["peak_mib"] = round(peak_mib(fns[name], device), 2)
                info["nv_buffers"] = round(info["peak_mib"] / (n * v * 4 / 2**20), 2)
            records.append(entry)
        del buffers, overwritten, fns
    return records


def row_tiles(device: torch.device, budget_s: float, quick: bool = False) -> list[dict]:
    """The Triton path's forward + backward at small V beyond L2, for each ROW_TILE (elements a program holds).

    On the first H100 run (2026-11-27) V = 27, 65 and 256 all moved about 330 GB/s (12% of the copy)
    with 1,024 elements a program, and the time hardly changed with V: too few bytes in flight per SM
    is the suspect, and a larger tile the first thing to try. The row with the best median is the
    value for kernels/_triton.py's ROW_TILE.
    """
    from makemore.kernels import _triton  # launch_config reads ROW_TILE at each call

    deadline, records, default = Deadline(budget_s), [], _triton.ROW_TILE
    for i, v in enumerate(ROW_TILE_VOCABS):
        if deadline.left() <= 0 and not quick:
            break
        n = rows_for(v, device, quick)
        buffers = Buffers(n, v, device, quick)

        step = call(partial(cross_entropy, backend="triton"), buffers, "forward+backward")

        def with_tile(row_tile):
            def run():
                _triton.ROW_TILE = row_tile
                step()

            return run

        fns = {f"ROW_TILE {t}": with_tile(t) for t in ROW_TILES}
        try:
            times = interleaved(fns, device, deadline.share(len(ROW_TILE_VOCABS) - i), min_rounds=1 if quick else 3, max_rounds=2 if quick else 50, flush=True)
        finally:
            _triton.ROW_TILE = default
        for name, seconds in times.items():
            entry = record(f"cross-entropy row tile, V = {v}, forward+backward", name, seconds, path=name, v=v, n=n, device=str(device))
            entry["extra_info"]["gbps_at_floor"] = round(3 * n * v * 4 / entry["stats"]["median"] / 1e9, 1)
            records.append(entry)
        del buffers
    return records


def crossover(device: torch.device, budget_s: float, quick: bool = False) -> list[dict]:
    """Fused path against F.cross_entropy, forward + backward in cache, over sizes; the size from which the fused path wins."""
    fused = "triton" if device.type == "cuda" else "torch"
    sizes = CROSSOVER_SIZES[:3] if quick else CROSSOVER_SIZES
    deadline, records = Deadline(budget_s), []
    cells = [(v, size) for v in CROSSOVER_VOCABS for size in sizes]
    ratios: dict[int, list[float]] = {}
    for i, (v, size) in enumerate(cells):
        n = max(1, size // v)
        group = f"cross-entropy crossover, V = {v}, forward+backward in cache"
        fns_of = {f"fused ({fused})": partial(cross_entropy, backend=fused), "F.cross_entropy": F.cross_entropy}
        if deadline.left() <= 0 and not quick:
            records += [skipped(group, f"{name} [{n * v}]", "out of time budget", path=name, case=n * v) for name in fns_of]
            continue
        buffers = Buffers(n, v, device, quick=True)  # one buffer: a training step's logits are in cache
        fns = {name: call(fn, buffers, "forward+backward") for name, fn in fns_of.items()}
        times = interleaved(fns, device, deadline.share(len(cells) - i), min_rounds=1 if quick else 5, max_rounds=2 if quick else 200)
        medians = {}
        for name, seconds in times.items():
            entry = record(group, f"{name} [{n * v}]", seconds, path=name, case=n * v, baseline=name == "F.cross_entropy", device=str(device))
            entry["extra_info"]["logits_per_s"] = round(n * v / entry["stats"]["median"])
            medians[name] = entry["stats"]["median"]
            records.append(entry)
        ratios.setdefault(size, []).append(medians["F.cross_entropy"] / medians[f"fused ({fused})"])  # by nominal size: n * v rounds per V
    # The smallest size from which the fused path is at least as fast at every V and every larger
    # size; recorded beside every crossover entry (bench/gpu.py prints it).
    measured = sorted((size, min(r)) for size, r in ratios.items() if len(r) == len(CROSSOVER_VOCABS))
    wins = [size for k, (size, _) in enumerate(measured) if all(ratio >= 1.0 for _, ratio in measured[k:])]
    found = wins[0] if wins else None
    summary = {
        "crossover": found if found is not None else f"not reached up to {measured[-1][0]} logits" if measured else "not measured (out of time budget)",
        "cuda_aten_below" if device.type == "cuda" else "aten_below": (1 << math.ceil(math.log2(found))) if found else None,
    }
    for entry in records:
        entry["extra_info"].update(summary)
    return records
