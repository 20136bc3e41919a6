"""The cross-entropy kernels timed as the device runs them, beside F.cross_entropy, torch.compile and a training step.

    python -m bench --only cross-entropy [--device cuda] [--budget SECONDS]   # this suite and its report
    bash bench/gpu.sh --steps env,cross-entropy OUT                            # the GPU step

``sweep(device, budget_s, quick=False) -> list[dict]`` is the whole suite: entries in
pytest-benchmark's JSON shape (bench/timing.py's ``record``) that bench/report.py turns into tables.

Paths (forward + backward, a leaf's gradient each call): ``ours`` (kernels' cross_entropy, the
fused path forced: the Triton kernels on CUDA, the fallback elsewhere), ``ours, inplace_grad``,
``F.cross_entropy`` and ``torch.compile(F.cross_entropy)`` (one build per V and dtype, the rows
dynamic); and a compiled training step, the final Linear + the loss + backward under torch.compile
in bfloat16 autocast at shakespeare-gpu's batch, with ours (a custom op in the graph) against
inductor's own loss.

Two times per cell, reported apart:
- kernel time: on CUDA, CALLS calls captured in one CUDA graph and replayed (no host in the
  timed region), the paths of a cell replayed in turn, round after round (bench/timing.py's
  interleaving); where capture fails, CALLS back-to-back calls between two events (``method``
  says which). On CPU, the host clock. Cells "beyond L2" hold at least 8x the L2 of logits, so
  every call streams from device memory; cells "in cache" reuse one buffer, as a training step does.
- host time: one eager call's Python and launches, CALLS calls issued back to back after a
  synchronize, without waiting for the device.

``gbps_at_floor`` is the bandwidth a call would use if it moved only its path's floor of passes
over the logits (2 with inplace_grad, 3 otherwise); ``pct_of_copy_bandwidth`` divides it by a
device-to-device copy timed the same way in the same sweep.

The crossover (``crossover`` entries, V = 27 and 65, 2^12 logits to beyond 8x L2): the smallest
size from which ours is never slower than F.cross_entropy in kernel time (``cuda_aten_below`` on
CUDA, ``aten_below`` on CPU: the value for kernels/loss.py's CUDA_ATEN_BELOW or ATEN_BELOW; 0 where
ours is never slower), and the same in eager time per call (``eager_crossover``). Cells run in
order of what they decide: the crossover first, the training step at V = 65, every V beyond L2,
the step at V = 27, then torch.compile's builds and bfloat16; a cell the budget does not reach is
listed as not measured.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.timing import Deadline, l2_bytes, record, skipped
from makemore.kernels import cross_entropy

VOCABS = [27, 65, 256, 1024, 4096, 32768, 131072, 262144]
QUICK_VOCABS = [27, 65]
CROSSOVER_VOCABS = (27, 65)
IN_CACHE = [1 << k for k in range(12, 23, 2)]  # logits per call: 2^12 to 2^22
QUICK_SIZES = [1 << 12, 1 << 14]
BEYOND_L2 = 8  # a beyond-L2 cell holds at least this many L2s of logits (float32)
CPU_BEYOND = 1 << 24  # its size on CPU, which has no L2 figure here
FLOOR = {"ours": 3, "ours, inplace_grad": 2, "F.cross_entropy": 3, "torch.compile(F.cross_entropy)": 3}
TRAIN_ROWS, TRAIN_WIDTH = 64 * 1024, 512  # shakespeare-gpu: 64 x 1024 targets a step, lm_head 512 -> V
CALLS = 16  # calls per timed graph (or per event pair) in cache
ROUNDS = 7
COMPILE_RESERVE_S = 25.0  # a torch.compile build is started only with this much budget left


# --- what is timed ----------------------------------------------------------------------------------


def loss_paths(device: torch.device) -> dict:
    """name -> loss function of (logits, target); torch.compile's is built per V (None here)."""
    fused = "triton" if device.type == "cuda" else "torch"
    return {
        "ours": partial(cross_entropy, backend=fused),
        "ours, inplace_grad": partial(cross_entropy, backend=fused, inplace_grad=True),
        "F.cross_entropy": F.cross_entropy,
        "torch.compile(F.cross_entropy)": None,
    }


class Cell:
    """Logits (N, V) wanting a gradient, and targets. inplace_grad writes each call's gradient over
    the logits; later calls read those values as logits, which costs the same (they are finite)."""

    def __init__(self, n: int, v: int, dtype: torch.dtype, device: torch.device):
        gen = torch.Generator(device).manual_seed(0)
        self.logits = torch.randn(n, v, generator=gen, device=device).to(dtype).requires_grad_()
        self.target = torch.randint(0, v, (n,), generator=gen, device=device)
        self.n, self.v, self.dtype = n, v, dtype

    def step(self, loss_fn):
        """One forward + backward of ``loss_fn``, as a closure."""

        def run():
            self.logits.grad = None
            loss_fn(self.logits, self.target).backward()

        return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """The kernel time of a closure: ``CALLS`` calls in a CUDA graph, replayed (CUDA), or the host clock."""

    def __init__(self, fn, device: torch.device, calls: int):
        self.fn, self.device, self.calls, self.graph = fn, device, calls, None
        self.method = "host clock" if device.type != "cuda" else "cuda graph replay"
        if device.type != "cuda":
            fn()  # first-call work (allocations, the fallback's caches) stays out
            return
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):  # warm-up on the capture stream: builds, workspaces, allocator pools
                fn()
                fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(calls):
                    fn()
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - capture refusals vary by path and torch version
            torch.cuda.synchronize(device)
            self.method = f"events over back-to-back calls (capture failed: {type(error).__name__})"
        _sync(device)

    def seconds(self) -> float:
        """Seconds per call, one round."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            for _ in range(self.calls):
                self.fn()
            return (time.perf_counter() - start) / self.calls
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.calls):
                self.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.calls


def host_seconds(fn, device: torch.device, calls: int) -> float:
    """Seconds of Python and launches per eager call: ``calls`` calls issued after a synchronize, not waited for."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _sync(device)
    return elapsed / calls


def eager_seconds(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of ``calls`` eager calls back to back, host and device together (what a loop sees)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def timed(fns: dict, device: torch.device, calls: int, rounds: int) -> dict:
    """name -> (kernel seconds per round, host seconds, eager seconds, method); kernel rounds interleaved."""
    timers = {name: Timer(fn, device, calls) for name, fn in fns.items()}
    kernel = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            kernel[name].append(timers[name].seconds())
    out = {}
    for name, fn in fns.items():
        host = [host_seconds(fn, device, calls) for _ in range(max(1, rounds // 2))]
        out[name] = (kernel[name], host, eager_seconds(fn, device, calls), timers[name].method)
    del timers
    _sync(device)
    return out


# --- the cells ---------------------------------------------------------------------------------------


_compiled: dict = {}


def compiled_loss(v: int, dtype: torch.dtype, quick: bool):
    """torch.compile(F.cross_entropy) for this V and dtype, rows dynamic: one build serves every N."""
    key = (v, dtype)
    if key not in _compiled:
        _compiled.clear()
        torch._dynamo.reset()  # one code object, a build per V: stay under dynamo's recompile limit
        compiled = torch.compile(F.cross_entropy, backend="eager" if quick else "inductor")

        def loss_fn(logits, target):
            torch._dynamo.maybe_mark_dynamic(logits, 0)
            torch._dynamo.maybe_mark_dynamic(target, 0)
            return compiled(logits, target)

        _compiled[key] = loss_fn
    return _compiled[key]


def beyond_l2_logits(device: torch.device, quick: bool) -> int:
    """Logits per call of a beyond-L2 cell: at least BEYOND_L2 x the L2 of float32."""
    if quick:
        return QUICK_SIZES[-1] * 4
    l2 = l2_bytes(device)
    return max(CPU_BEYOND, BEYOND_L2 * l2 // 4) if l2 else CPU_BEYOND


def measure_cell(
    group: str,
    v: int,
    logits: int,
    dtype: torch.dtype,
    paths: list[str],
    device,
    deadline: Deadline,
    quick: bool,
    copy_gbps: float | None,
    place: str,
) -> list[dict]:
    """Every path of one (V, N, dtype) cell, interleaved; one entry per path."""
    n = max(1, logits // v)
    # ``classes`` is V everywhere; ``v`` only where V is the table's axis (bench/report.py), else the
    # axis is ``case``, the logits.
    common = dict(
        classes=v,
        n=n,
        case=n * v,
        size=logits,
        dtype=str(dtype).removeprefix("torch."),
        place=place,
        device=str(device),
    )
    if place != "in cache":
        common["v"] = v
    if deadline.left() <= 0 and not quick:
        return [skipped(group, f"{p} [{n * v}]", "out of time budget", path=p, **common) for p in paths]
    cell = Cell(n, v, dtype, device)
    fns, records = {}, []
    for name in paths:
        loss_fn = loss_paths(device)[name]
        if loss_fn is None:
            if deadline.left() < COMPILE_RESERVE_S and (v, dtype) not in _compiled and not quick:
                records.append(
                    skipped(
                        group, f"{name} [{n * v}]", "out of time budget (torch.compile's build)", path=name, **common
                    )
                )
                continue
            loss_fn = compiled_loss(v, dtype, quick)
        fns[name] = cell.step(loss_fn)
    calls = 2 if quick else CALLS if place == "in cache" else 3
    try:
        times = timed(fns, device, calls, 1 if quick else ROUNDS)
    except torch.OutOfMemoryError:
        return records + [skipped(group, f"{p} [{n * v}]", "out of memory", path=p, **common) for p in fns]
    size = torch.empty((), dtype=dtype).element_size()
    for name, (kernel, host, eager, method) in times.items():
        entry = record(
            group, f"{name} [{n * v}]", kernel, path=name, baseline=name == "F.cross_entropy", method=method, **common
        )
        median = entry["stats"]["median"]
        gbps = FLOOR[name] * n * v * size / median / 1e9
        info = entry["extra_info"]
        info.update(logits_per_s=round(n * v / median), gbps_at_floor=round(gbps, 1), eager_us=round(eager * 1e6, 1))
        if copy_gbps:
            info.update(copy_gbps=copy_gbps, pct_of_copy_bandwidth=round(100 * gbps / copy_gbps, 1))
        records += [entry, host_entry(group, name, n * v, host, common)]
    del cell, fns
    return records


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """GB/s (read + written) of a device-to-device copy of a beyond-L2 buffer, timed as the kernels are."""
    n = beyond_l2_logits(device, quick)
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    timer = Timer(lambda: dst.copy_(src), device, 1 if quick else 3)
    seconds = statistics.median(timer.seconds() for _ in range(1 if quick else ROUNDS))
    return round(2 * 4 * n / seconds / 1e9, 1)


def training_step(v: int, device: torch.device, deadline: Deadline, quick: bool) -> list[dict]:
    """The final Linear + loss + backward compiled (bfloat16 autocast), ours against inductor's own loss."""
    group = "cross-entropy in a compiled training step (Linear + loss + backward), bfloat16"
    fused = "triton" if device.type == "cuda" else "torch"
    losses = {
        "ours": partial(cross_entropy, backend=fused),
        "ours, inplace_grad": partial(cross_entropy, backend=fused, inplace_grad=True),
        "inductor (F.cross_entropy)": lambda logits, target: F.cross_entropy(logits, target),
    }
    rows, width = (256, 32) if quick else (TRAIN_ROWS, TRAIN_WIDTH)
    common = dict(v=v, n=rows, width=width, dtype="bfloat16", device=str(device))
    if deadline.left() < 3 * COMPILE_RESERVE_S and not quick:
        return [
            skipped(group, f"{name} [{v}]", "out of time budget (torch.compile's builds)", path=name, **common)
            for name in losses
        ]
    gen = torch.Generator(device).manual_seed(0)
    linear = torch.nn.Linear(width, v, device=device)
    hidden = torch.randn(rows, width, generator=gen, device=device)
    target = torch.randint(0, v, (rows,), generator=gen, device=device)
    fns = {}
    for name, loss_fn in losses.items():
        torch._dynamo.reset()

        def forward(h, t, loss_fn=loss_fn):
            with torch.autocast(device.type, torch.bfloat16):
                return loss_fn(linear(h), t)

        compiled = torch.compile(forward, backend="eager" if quick else "inductor", fullgraph=True)

        def step(compiled=compiled):
            linear.weight.grad = linear.bias.grad = None
            compiled(hidden, target).backward()

        fns[name] = step
    times = timed(fns, device, 2 if quick else CALLS, 1 if quick else ROUNDS)
    records = []
    for name, (kernel, host, eager, method) in times.items():
        entry = record(
            group, f"{name} [{v}]", kernel, path=name, baseline=name.startswith("inductor"), method=method, **common
        )
        info = entry["extra_info"]
        info.update(logits_per_s=round(rows * v / entry["stats"]["median"]), eager_us=round(eager * 1e6, 1))
        records += [entry, host_entry(group, name, v, host, dict(common, baseline=name.startswith("inductor")))]
    torch._dynamo.reset()
    return records


def host_entry(group: str, name: str, label, host: list[float], common: dict) -> dict:
    """The host time per eager call of one cell's path, in a group of its own beside the kernel times."""
    info = {k: v for k, v in common.items() if k != "baseline"}
    return record(
        f"{group}: host time per eager call",
        f"{name} [{label}]",
        host,
        path=name,
        baseline=common.get("baseline", name == "F.cross_entropy"),
        **info,
    )


def crossover_summary(records: list[dict], device: torch.device) -> dict:
    """The smallest size from which ours is never slower than F.cross_entropy at V = 27 and 65, in kernel
    and in eager time."""
    found = {}
    for key, time_of in (("kernel", lambda b: b["stats"]["median"]), ("eager", lambda b: b["extra_info"]["eager_us"])):
        ratios: dict[int, list[float]] = {}
        for v in CROSSOVER_VOCABS:
            cells = {
                (b["extra_info"]["path"], b["extra_info"]["size"]): b
                for b in records
                if b.get("stats") and b["extra_info"]["classes"] == v and "host time" not in b["group"]
            }
            for (path, size), b in cells.items():
                if path == "ours" and ("F.cross_entropy", size) in cells:  # by nominal size: n * v rounds per V
                    ratios.setdefault(size, []).append(time_of(cells["F.cross_entropy", size]) / time_of(b))
        measured = sorted((size, min(r)) for size, r in ratios.items() if len(r) == len(CROSSOVER_VOCABS))
        wins = [size for k, (size, _) in enumerate(measured) if all(ratio >= 1.0 for _, ratio in measured[k:])]
        found[key] = (wins[0] if wins else None, measured)
    size, measured = found["kernel"]
    if not measured:
        crossover, below = "not measured (out of time budget)", None
    elif size is None:
        crossover, below = f"not reached up to {measured[-1][0]} logits", None
    else:
        crossover, below = size, 0 if size == measured[0][0] else 1 << math.ceil(math.log2(size))
    eager = found["eager"][0]
    return {
        "crossover": crossover,
        "cuda_aten_below" if device.type == "cuda" else "aten_below": below,
        "eager_crossover": eager if eager is not None else "not reached",
    }


def sweep(device: torch.device, budget_s: float, quick: bool = False) -> list[dict]:
    """The whole suite within ``budget_s`` seconds (see the module docstring for its order)."""
    deadline = Deadline(budget_s)
    copy_gbps = copy_bandwidth(device, quick)
    beyond = beyond_l2_logits(device, quick)
    sizes = QUICK_SIZES if quick else IN_CACHE
    eager_paths = ["ours", "ours, inplace_grad", "F.cross_entropy"]
    compiled_path = ["torch.compile(F.cross_entropy)"]
    f32 = torch.float32
    records: list[dict] = []

    def cells(v, logits_list, paths, place):
        for logits in logits_list:
            group = (
                f"cross-entropy fwd+bwd in cache, V = {v}"
                if place == "in cache"
                else "cross-entropy fwd+bwd beyond L2, float32"
            )
            records.extend(
                measure_cell(
                    group,
                    v,
                    logits,
                    f32,
                    paths,
                    device,
                    deadline,
                    quick,
                    copy_gbps if place != "in cache" else None,
                    place,
                )
            )

    # 1. The crossover: V = 27 and 65 from 2^12 logits to beyond L2, without torch.compile.
    for v in CROSSOVER_VOCABS:
        cells(v, sizes, eager_paths, "in cache")
        cells(v, [beyond], eager_paths, "beyond L2")
    summary = crossover_summary(records, device)
    # 2. The compiled training step at shakespeare-gpu's V, 3. every other V beyond L2, 4. the step
    # at V = 27, then 5. torch.compile(F.cross_entropy), makemore's vocabularies first.
    records.extend(training_step(65, device, deadline, quick))
    vocabs = QUICK_VOCABS if quick else VOCABS
    for v in vocabs:
        if v not in CROSSOVER_VOCABS:
            cells(v, [beyond], eager_paths, "beyond L2")
    records.extend(training_step(27, device, deadline, quick))
    for v in vocabs:
        cells(v, [beyond], compiled_path, "beyond L2")
        if v in CROSSOVER_VOCABS:
            cells(v, sizes, compiled_path, "in cache")
    bf16_group = "cross-entropy fwd+bwd beyond L2, bfloat16"
    for v in CROSSOVER_VOCABS:  # the training dtype, makemore's vocabularies
        records.extend(
            measure_cell(
                bf16_group, v, beyond, torch.bfloat16, eager_paths, device, deadline, quick, copy_gbps, "beyond L2"
            )
        )
    for entry in records:
        if entry["extra_info"].get("classes") in CROSSOVER_VOCABS and entry["group"].startswith(
            "cross-entropy fwd+bwd in cache"
        ):
            entry["extra_info"].update(summary)
    _compiled.clear()
    torch._dynamo.reset()
    return records
