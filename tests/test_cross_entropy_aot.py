"""The Triton kernels of cross_entropy (kernels/_triton.py) compiled ahead of time for real GPUs, without one.

The interpreter (tests/test_cross_entropy.py) tolerates code a GPU compile refuses, so this file
compiles every kernel configuration the dispatcher launches down to PTX and a cubin for sm_80
(A100) and sm_90 (H100), with the ptxas that ships in the triton wheel.

The configurations are not written out by hand: each case calls the public ``cross_entropy`` (and
its backward) on CPU tensors with ``_launch`` replaced by a recorder, so the recorded kernels,
grids, constexprs, dtypes, strides and pointer alignments are exactly what a real call would
launch; the recorded launches are then compiled with ``kernel.warmup`` while Triton's active
driver reports the GPU target, so the compile sees the same specialisations (integer
divisibility, stride 1 as a constant) as a launch on that GPU would. Cases (VOCABS_OF below):
fp32 / bf16 / fp16 / fp64 logits x V from 27 to 131,072 (flat blocks and multi-row tiles with
and without a tail, the widest row held in registers, online-softmax sweeps) x label smoothing
on / off x default mode (forward, backward) / inplace gradient (forward writing the gradient,
rescale), with int64 targets, and int32 ones too for fp32 logits; plus the three reductions,
odd row counts (1, 3, 4095) and transposed logits. The kernels compile as they launch, with
debug on (their device-side asserts) and integer-overflow checks off.

Every configuration must fit MAX_REGISTERS a thread with no spills (cuobjdump's resource usage of
the cubins; ptxas -v for the table of the main ones, which the first test prints and
kernels/README.md records).

Compiles run in two processes and land in Triton's on-disk cache, so a second run takes seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from makemore.kernels import loss as xent

tk = xent._triton  # the Triton kernels' module; None without triton
INTERPRET = tk is not None and tk.INTERPRET

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# makemore's character vocabularies (27, 65: flat blocks of several rows, 65 with a one-column
# tail), a tail as wide as half the head (96 = 64 + 32, a multiple of 16: 2-D tiles), a flat block
# with a wide tail (300 = 256 + 64) and one of a single row (1000), the widest row held in
# registers (8192), and rows swept in tiles (50257, 131072; 131072 is a multiple of 16, so its
# loads vectorise). The integer specialisations (V and strides divisible by 16 or not, int32
# targets, odd row counts) and the reductions are covered in fp32; bf16 and fp16 differ from it in
# their conversions, float64 in its tiles (half as wide): they get fewer cases, which keeps the
# compile within CI's time.
VOCABS = (27, 65, 96, 300, 1000, 8192, 50257, 131072)
VOCABS_OF = {"fp32": VOCABS, "bf16": VOCABS[:-1], "fp16": (65, 8192), "fp64": (27, 65, 96, 300, 50257)}
INT32_VOCABS = (27, 65)  # int32 targets change only the target load
MAX_REGISTERS = 128  # per thread, for every configuration: more would cap occupancy (and invite spills)


def _bin_dir() -> Path | None:
    if tk is None:
        return None
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return path if (path / "ptxas").exists() and (path / "cuobjdump").exists() else None


pytestmark = [
    pytest.mark.skipif(tk is None, reason="triton is not importable"),
    pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled"),
    pytest.mark.skipif(_bin_dir() is None, reason="the triton wheel's ptxas / cuobjdump are missing"),
]


# --- cases: public calls whose launches are recorded ------------------------------------------


def _cases(dtype_name: str) -> list[dict]:
    cases = []
    for target_dtype in ("int32", "int64") if dtype_name == "fp32" else ("int64",):
        for v in VOCABS_OF[dtype_name] if target_dtype == "int64" else INT32_VOCABS:
            for smoothing in (0.0, 0.1):
                for inplace in (False, True):
                    cases.append(
                        dict(dtype=dtype_name, target=target_dtype, v=v, n=None, smoothing=smoothing, inplace=inplace)
                    )
    if dtype_name in ("fp32", "bf16"):
        # The reductions: "sum" (no count), "none" (per-row losses and incoming gradients).
        for v in (27, 65):
            for reduction in ("sum", "none"):
                for inplace in (False, True):
                    case = dict(dtype=dtype_name, target="int64", v=v, n=None, smoothing=0.1, inplace=inplace)
                    cases.append(dict(case, reduction=reduction))
    if dtype_name == "fp32":
        # Other specialisations a launch can hit: row counts not divisible by 16 (and one row), a
        # column stride other than 1 (2-D tiles where V = 27 and 65 would load flat blocks).
        transposed = dict(dtype=dtype_name, target="int64", v=27, n=None, smoothing=0.1, inplace=False, transposed=True)
        cases.append(transposed)
        for v in (65, 50257):
            for n in (1, 4095 if v < 1000 else 3):
                cases.append(dict(dtype=dtype_name, target="int64", v=v, n=n, smoothing=0.1, inplace=False))
            cases.append(
                dict(dtype=dtype_name, target="int64", v=v, n=None, smoothing=0.1, inplace=False, transposed=True)
            )
            cases.append(
                dict(dtype=dtype_name, target="int64", v=v, n=None, smoothing=0.0, inplace=True, reduction="none")
            )
    return cases


def _record_launches(case: dict) -> list[tuple]:
    """The (kernel, row blocks, args, meta) launches of one forward + backward of ``case``, none of them run."""
    v = case["v"]
    n = case["n"] or (4096 if v < 1000 else 8)
    dtype = DTYPES[case["dtype"]]
    logits = torch.empty(v, n, dtype=dtype).t() if case.get("transposed") else torch.empty(n, v, dtype=dtype)
    logits.zero_()
    target = torch.zeros(n, dtype=getattr(torch, case["target"]))
    target[::3] = -100
    reduction = case.get("reduction", "mean")
    launches = []
    saved = tk._launch, tk.INTERPRET
    # Record instead of launching; INTERPRET lets backend="triton" accept the CPU tensors.
    tk._launch = lambda kernel, n_blocks, *args, **meta: launches.append((kernel, n_blocks, args, meta))
    tk.INTERPRET = True
    try:
        x = logits.clone().requires_grad_()
        source = x * 1 if case["inplace"] else x
        out = xent.cross_entropy(
            source,
            target,
            reduction=reduction,
            label_smoothing=case["smoothing"],
            inplace_grad=case["inplace"],
            backend="triton",
        )
        out.backward(torch.full_like(out, 2.5))
    finally:
        tk._launch, tk.INTERPRET = saved
    return launches


# --- compiling in worker processes ------------------------------------------------------------


class _TargetDriver:
    """Just enough of a Triton driver for kernel.warmup to compile for ``target`` with no GPU present."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"aot-sm{self.target.arch}"  # a separate JIT cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _describe(kernel, meta) -> str:
    name = kernel.__name__.strip("_").replace("_kernel", "")
    if name == "forward" and meta.get("WRITE_GRAD"):
        name = "forward+grad"
    return name


def _resources(compiled, bin_dir: Path) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(bin_dir / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(match.group(1)), int(match.group(2))


def _spill_bytes(compiled, arch: int, bin_dir: Path) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) from ptxas -v on the kernel's PTX, as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run(
            [
                get_ptxas(arch).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                str(ptx),
                "-o",
                str(Path(tmp) / "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores, loads


def _compile_task(arch: int, dtype_name: str) -> list[dict]:
    """Compile every launch of every case of one dtype for sm_<arch>; one row per distinct launch."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    bin_dir = _bin_dir()
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    rows, seen = [], set()
    for case in _cases(dtype_name):
        for kernel, _, args, meta in _record_launches(case):
            label = dict(case, kernel=_describe(kernel, meta), arch=arch, num_warps=meta["num_warps"])
            try:
                compiled = kernel.warmup(*args, grid=(1,), **meta)
            except Exception as error:  # noqa: BLE001 - every failure is reported with its configuration
                rows.append(dict(label, error=f"{type(error).__name__}: {error}"[:2000]))
                continue
            if compiled.hash in seen:
                continue
            seen.add(compiled.hash)
            regs, stack = _resources(compiled, bin_dir)
            row = dict(label, regs=regs, stack=stack)
            table_row = (
                case["target"] == "int64"
                and case["n"] is None
                and not case.get("transposed")
                and not case.get("reduction")
            )
            table_row = table_row and (case["smoothing"] or label["kernel"] in ("backward", "rescale"))
            if table_row and dtype_name in ("fp32", "bf16"):
                row["ptxas"] = _spill_bytes(compiled, arch, bin_dir)
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    tasks = [(arch, dtype) for dtype in DTYPES for arch in ARCHS]
    workers = max(1, min(len(tasks), os.cpu_count() or 1))
    # spawn, not fork: a forked child would inherit this process's torch thread pools.
    # One torch thread a worker: two workers' spinning OpenMP pools on two cores ran 50x slower.
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        results = list(pool.map(_compile_task, *zip(*tasks)))
    return [row for rows in results for row in rows]


def _name(row: dict) -> str:
    extra = "".join(f" {k}={row[k]}" for k in ("n", "transposed", "reduction") if row.get(k))
    return (
        f"sm_{row['arch']} {row['kernel']:<12} {row['dtype']} {row['target']} V={row['v']:<6} "
        f"eps={row['smoothing']} inplace={row['inplace']}{extra}"
    )


def table(rows: list[dict]) -> str:
    """Registers / spill-store bytes of the main configurations, sm_80 and sm_90 side by side."""
    main = {}
    for row in rows:
        if "ptxas" in row and row["dtype"] in ("fp32", "bf16"):
            main.setdefault((row["kernel"], row["dtype"], row["v"]), {})[row["arch"]] = row["ptxas"]
    lines = ["kernel        dtype  V        warps  sm_80 regs/spill  sm_90 regs/spill"]
    warps = {(r["kernel"], r["dtype"], r["v"]): r["num_warps"] for r in rows if "ptxas" in r}
    for (kernel, dtype, v), by_arch in sorted(main.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        cells = [f"{by_arch[a][0]:>4} / {by_arch[a][1]:<4}" if a in by_arch else "   -" for a in ARCHS]
        lines.append(f"{kernel:<13} {dtype:<6} {v:<8} {warps[(kernel, dtype, v)]:<6} {cells[0]:<17} {cells[1]}")
    return "\n".join(lines)


# --- the tests --------------------------------------------------------------------------------


def test_every_configuration_compiles_for_sm80_and_sm90(compiled, capsys):
    failures = [f"{_name(row)}: {row['error']}" for row in compiled if "error" in row]
    assert not failures, f"{len(failures)} configurations failed to compile:\n" + "\n".join(failures)
    kernels = {(row["kernel"], row["arch"]) for row in compiled}
    assert kernels == {(k, a) for k in ("forward", "forward+grad", "backward", "rescale") for a in ARCHS}
    with capsys.disabled():  # shown without -s
        most = max(row["regs"] for row in compiled)
        print(
            f"\nAOT: {len(compiled)} distinct kernels compiled for sm_80 and sm_90 without errors, "
            f"at most {most} registers a thread. TABLE:\n{table(compiled)}"
        )


def test_every_configuration_fits_the_register_budget_without_spills(compiled):
    rows = [row for row in compiled if "error" not in row]
    assert {row["v"] for row in rows} == set(VOCABS)
    over = [
        f"{_name(row)}: {row['regs']} registers, stack {row['stack']} B, ptxas {row.get('ptxas')}"
        for row in rows
        if row["regs"] > MAX_REGISTERS or row["stack"] or row.get("ptxas", (0, 0, 0))[1]
    ]
    assert not over, f"over {MAX_REGISTERS} registers or spilling:\n" + "\n".join(over) + "\n" + table(compiled)


def test_ptxas_and_cuobjdump_agree_on_registers(compiled):
    """The table's ptxas -v numbers describe the cubins Triton built (same flags, same registers)."""
    for row in compiled:
        if "ptxas" in row:
            assert row["ptxas"][0] == row["regs"], _name(row)


def test_recorded_launches_are_what_the_dispatcher_runs():
    """A recorded case replays the launcher's choices: tile shape, warps and flags for V = 27 and 50257."""
    small = _record_launches(dict(dtype="bf16", target="int32", v=27, n=None, smoothing=0.1, inplace=True))
    assert [_describe(k, m) for k, _, _, m in small] == ["forward+grad", "rescale"]
    cfg = tk.launch_config(4096, 27, torch.bfloat16, contiguous=True)
    kernel, n_blocks, args, meta = small[0]
    launched = (meta["ROWS"], meta["BLOCK_V"], meta["FLAT"], meta["FLAT_ROWS"], meta["num_warps"])
    assert cfg.flat and launched == (cfg.rows, cfg.block_v, cfg.flat, cfg.flat_rows, cfg.num_warps)
    assert n_blocks == -(-4096 // cfg.flat_rows) and meta["V"] == 27 and meta["COUNT_FIRST"] and meta["debug"]
    assert (
        meta["SINGLE_TILE"] and meta["SMOOTHING"] and args[0].dtype == torch.bfloat16 and args[3].dtype == torch.int32
    )
    large = _record_launches(dict(dtype="fp32", target="int64", v=50257, n=None, smoothing=0.0, inplace=False))
    assert [_describe(k, m) for k, _, _, m in large] == ["forward", "backward"]
    assert not large[0][3]["SINGLE_TILE"] and large[0][3]["BLOCK_V"] == tk.BLOCK_V_MAX // 2


def test_tools_are_the_wheels_own():
    assert shutil.which("ptxas", path=str(_bin_dir())) is not None
