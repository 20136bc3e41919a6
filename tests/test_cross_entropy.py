"""cross_entropy (kernels/loss.py) against F.cross_entropy: losses and gradients, both backends.

Every test that takes ``backend`` runs for the PyTorch fallback here and for the Triton kernel
in a subprocess with TRITON_INTERPRET=1 (see test_triton_cases_pass_under_the_interpreter):
the interpreter has to be chosen before Triton compiles anything, so this process never enters
it by accident. On a machine with CUDA the Triton cases run here, on the GPU.
"""

import importlib.util
import subprocess
import sys
import unittest
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreter import rerun_triton_cases

from makemore.kernels import _torch, cross_entropy
from makemore.kernels import loss as xent

tk = xent._triton  # the Triton kernels' module; None without triton
INTERPRET = tk is not None and tk.INTERPRET

CUDA_TRITON = tk is not None and torch.cuda.is_available() and not INTERPRET
TRITON_HERE = INTERPRET or CUDA_TRITON
# Without a GPU or the interpreter the Triton cases are not collected here at all: the subprocess
# of test_triton_cases_pass_under_the_interpreter collects and runs them.
BACKENDS = ["torch", "triton"] if TRITON_HERE else ["torch"]
REDUCTIONS = ("mean", "sum", "none")


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and CUDA_TRITON else "cpu"


def make_case(n, v, *, ignore="none", batch=(), dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    """Logits (*batch, n, v) and int64 targets, with no, some or all targets set to -100."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch, n, v, generator=gen) * scale
    target = torch.randint(0, v, (*batch, n), generator=gen)
    if ignore == "some":
        target[..., ::3] = -100
    elif ignore == "all":
        target[...] = -100
    return logits.to(device, dtype), target.to(device)


def check(logits, target, backend, *, upstream=None, rtol=2e-5, atol=1e-7, **kwargs):
    """Compare loss and d(loss * upstream)/d(logits) with F.cross_entropy in fp64.

    fp64, because F.cross_entropy's own fp32 gradient strays by 1e-5 at V = 50257.
    """
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, target, backend=backend, **kwargs)
    x_ref = logits.detach().double().requires_grad_()
    v = logits.shape[-1]
    ref = F.cross_entropy(x_ref.reshape(-1, v), target.reshape(-1).long(), **kwargs)
    if kwargs.get("reduction") == "none":
        ref = ref.reshape(target.shape)
    if upstream is None:
        upstream = torch.rand_like(ref) + 0.5 if ref.dim() else torch.ones((), device=ref.device)
    upstream = upstream.to(ref.dtype)
    (loss * upstream.to(loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()

    assert loss.dtype == logits.dtype and loss.shape == ref.shape
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(loss.float(), ref.to(logits.dtype).float(), rtol=rtol, atol=atol, equal_nan=True)
    # Entries near zero (p - eps / V) cancel, so gradient errors count against the largest entry.
    expected = x_ref.grad.to(logits.dtype).float()
    grad_atol = atol + rtol * expected.nan_to_num(0.0).abs().max().item()
    torch.testing.assert_close(x.grad.float(), expected, rtol=rtol, atol=grad_atol, equal_nan=True)
    return loss, x.grad


# --- semantics: shapes, reductions, ignore_index, label smoothing ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [1, 2, 27, 65, 1000, 50257])
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_matches_torch(backend, v, n, reduction, label_smoothing, ignore):
    if INTERPRET and v == 50257 and ignore != "some":
        pytest.skip("the interpreter sweeps V = 50257 slowly: ignore='some' covers the sweep")
    logits, target = make_case(n, v, ignore=ignore, device=device_for(backend))
    check(logits, target, backend, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [27, 65, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_torch_on_a_full_batch(backend, v, reduction, label_smoothing):
    # The interpreter runs each program in Python: there a batch of 4096 rows of V = 1000 would be
    # 4096 programs a call, so it takes 130 rows, still several programs with a ragged last one.
    n = 130 if INTERPRET else 4096
    logits, target = make_case(n, v, ignore="some", device=device_for(backend))
    check(logits, target, backend, reduction=reduction, label_smoothing=label_smoothing, rtol=1e-4)


def test_fallback_matches_torch_at_gpt2_scale():
    logits, target = make_case(4096, 50257)
    check(logits, target, "torch", rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_three_dimensional_logits(backend, reduction):
    logits, target = make_case(8, 65, batch=(3,), ignore="some", device=device_for(backend))
    check(logits, target, backend, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_logits(backend):
    logits, target = make_case(1, 27, device=device_for(backend))
    check(logits[0], target[0], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    device = device_for(backend)
    logits = torch.randn(0, 27, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = cross_entropy(logits, target, reduction=reduction, backend=backend)
    ref = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mean_over_no_targets_is_nan_with_zero_gradient(backend, reduction):
    logits, target = make_case(5, 27, ignore="all", device=device_for(backend))
    loss, grad = check(logits, target, backend, reduction=reduction)
    assert loss.isnan().all() if reduction == "mean" else (loss == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [0, 3, -1])
def test_any_ignore_index(backend, ignore_index):
    logits, target = make_case(40, 27, device=device_for(backend))
    target[::4] = ignore_index
    check(logits, target, backend, ignore_index=ignore_index, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    logits, target = make_case(33, 65, ignore="some", device=device_for(backend))
    check(logits, target.int(), backend, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_gradient_scales_the_saved_one(backend, reduction):
    logits, target = make_case(16, 65, ignore="some", device=device_for(backend))
    check(logits, target, backend, reduction=reduction, upstream=torch.tensor(-2.5, device=logits.device))


# --- numerics: extreme values, layouts, precisions -------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [27, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits(backend, v, label_smoothing, reduction):
    logits, target = make_case(12, v, device=device_for(backend))
    logits[0, :] = -1e4
    logits[0, target[0]] = 1e4  # certain and right: loss 0
    logits[1, target[1]] = -1e4  # certain and wrong: loss ~1e4
    logits[2, 5:] = float("-inf")  # masked classes, target among them for row 2 only if >= 5
    logits[3, :] = 1e4
    logits[4, ::2] = float("-inf")
    target[4] = 1
    logits[5, 0] = float("-inf")  # a masked target class: infinite loss, finite gradient
    target[5] = 0
    check(logits, target, backend, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided_columns", "permuted_3d"])
def test_non_contiguous_logits(backend, layout):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(1)
    if layout == "transposed":
        logits = torch.randn(65, 30, generator=gen).to(device).t()
    elif layout == "strided_columns":
        logits = torch.randn(30, 130, generator=gen).to(device)[:, ::2]
    else:
        logits = torch.randn(2, 65, 15, generator=gen).to(device).transpose(1, 2)
    assert not logits.is_contiguous()
    target = torch.randint(0, 65, logits.shape[:-1], generator=gen).to(device)
    check(logits, target, backend, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v", [27, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_logits(backend, dtype, v, reduction):
    logits, target = make_case(64, v, ignore="some", dtype=dtype, device=device_for(backend))
    check(logits, target, backend, reduction=reduction, label_smoothing=0.1, rtol=2e-2, atol=2e-3)


# --- memory behaviour: the gradient is the only (N, V) buffer ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_grad_writes_the_gradient_into_the_logits(backend, dtype, reduction):
    logits, target = make_case(20, 65, ignore="some", dtype=dtype, device=device_for(backend))
    weight = torch.ones((), dtype=dtype, device=logits.device, requires_grad=True)
    scaled = logits * weight  # non-leaf logits, as a model's output would be
    storage = scaled.data_ptr()
    grads = []
    scaled.register_hook(grads.append)
    loss = cross_entropy(scaled, target, reduction=reduction, label_smoothing=0.1, inplace_grad=True, backend=backend)
    loss.sum().backward()

    x_ref = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(x_ref, target, reduction=reduction, label_smoothing=0.1)
    ref.sum().backward()
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.float(), ref.to(dtype).float(), **tol)
    assert grads[0].data_ptr() == storage
    torch.testing.assert_close(scaled.detach().float(), x_ref.grad.to(dtype).float(), **tol)
    torch.testing.assert_close(weight.grad.double(), (x_ref.grad * logits.double()).sum(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_autograd_no_gradient_is_written(backend):
    logits, target = make_case(20, 65, device=device_for(backend))
    before = logits.clone()
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), target, inplace_grad=True, backend=backend)
    assert loss.grad_fn is None
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss, F.cross_entropy(before, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_recomputes_the_gradient(backend):
    """The default mode keeps the logits, not a gradient:
    a retained graph backpropagates again, as F.cross_entropy's does."""
    logits, target = make_case(4, 27, device=device_for(backend))
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, backend=backend, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (loss * 3).backward()
    torch.testing.assert_close(x.grad, 4 * first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_with_inplace_grad_is_refused(backend):
    logits, target = make_case(4, 27, device=device_for(backend))
    loss = cross_entropy(logits.requires_grad_(), target, inplace_grad=True, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot backpropagate twice"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace_grad", [False, True])
def test_double_backward_is_refused(backend, inplace_grad):
    logits, target = make_case(4, 27, device=device_for(backend))
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x * 1, target, inplace_grad=inplace_grad, backend=backend)
    with pytest.raises(RuntimeError, match="cannot differentiate twice.*create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [27, 1000, 20_000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace_grad", [False, True])
def test_float64_is_computed_in_float64(backend, v, reduction, inplace_grad):
    """fp32 arithmetic would be off by ~1e-7 relative; fp64 agrees with F.cross_entropy to ~1e-15."""
    logits, target = make_case(5, v, ignore="some", dtype=torch.float64, scale=10.0, device=device_for(backend))
    x = logits.clone().requires_grad_()
    scaled = x * 1  # non-leaf, so inplace_grad may overwrite it
    loss = cross_entropy(scaled, target, reduction=reduction, inplace_grad=inplace_grad, backend=backend)
    x_ref = logits.clone().requires_grad_()
    ref = F.cross_entropy(x_ref, target, reduction=reduction)
    upstream = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64, device=ref.device).view(ref.shape)
    (loss * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [1, 27, 1000])
@pytest.mark.parametrize("inplace_grad", [False, True])
def test_float64_label_smoothing_is_exact(backend, v, inplace_grad):
    """Triton passes a Python float to a kernel as fp32: label smoothing 0.1 arrived as 0.10000000149,
    and V = 1's gradient, exactly 0, came out 2e-8. Found by tests/test_fuzz_cross_entropy.py."""
    logits, target = make_case(5, v, ignore="some", dtype=torch.float64, device=device_for(backend))
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x * 1, target, label_smoothing=0.1, inplace_grad=inplace_grad, backend=backend)
    x_ref = logits.clone().requires_grad_()
    ref = F.cross_entropy(x_ref, target, label_smoothing=0.1)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-15)


# --- tiling: several chunks (fallback) and several tiles per row or rows per tile (Triton) ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v", [27, 1000])
@pytest.mark.parametrize("extreme", [False, True])
def test_fallback_over_many_row_chunks(monkeypatch, dtype, v, extreme):
    monkeypatch.setattr(_torch, "CHUNK_ELEMENTS", 2 * v)  # two rows a chunk
    logits, target = make_case(9, v, ignore="some", dtype=dtype)
    if extreme:
        logits[4, 0] = 1e4  # one chunk takes the max-shifted path, the others the plain one
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for reduction in REDUCTIONS:
        check(logits, target, "torch", reduction=reduction, label_smoothing=0.1, **tol)
    with torch.no_grad():
        torch.testing.assert_close(
            cross_entropy(logits, target, backend="torch").float(),
            F.cross_entropy(logits.float(), target).to(dtype).float(),
            **tol,
        )


@pytest.mark.skipif(tk is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tiles_waste_at_most_a_quarter_of_their_lanes(dtype):
    """Every row held in registers (V up to BLOCK_V_MAX) fills at least 3/4 of its tile's columns;
    a flat block fills at least 3/4 of its lanes with rows, and those rows 3/4 of the tile's rows,
    and starts every block on a 16-byte boundary."""
    widest = tk.BLOCK_V_MAX // (2 if dtype == torch.float64 else 1)
    size = torch.empty((), dtype=dtype).element_size()
    flat_vocabs = set()
    for v in range(1, widest + 1):
        for contiguous in (False, True):
            cfg = tk.launch_config(4096, v, dtype, contiguous)
            lanes = cfg.block_v + cfg.tail
            assert v <= lanes <= v * 4 / 3, (v, cfg)
            assert cfg.tail < cfg.block_v and cfg.rows * lanes <= 2 * tk.ROW_TILE or cfg.rows == 1 or cfg.flat, (v, cfg)
            if cfg.flat:
                flat_vocabs.add(v)
                assert contiguous and v % 16 and cfg.flat * (2 if size == 8 else 1) in tk.FLAT_LANES, (v, cfg)
                assert cfg.flat_rows * v <= cfg.flat and cfg.flat_rows * v >= 0.75 * cfg.flat, (v, cfg)
                assert cfg.flat_rows <= cfg.rows and cfg.flat_rows >= 0.75 * cfg.rows, (v, cfg)
                assert cfg.flat_rows * v * size % 16 == 0, (v, cfg)
            else:
                assert cfg.flat_rows == cfg.rows, (v, cfg)
    assert {27, 65} <= flat_vocabs  # makemore's vocabularies load as flat blocks
    assert tk.launch_config(4096, 27)[1:3] == (32, 0)  # 27 of 32 lanes: 16% idle
    assert tk.launch_config(4096, 65)[1:3] == (64, 1)  # 65 of 65 (was 65 of 128)
    assert tk.launch_config(4096, widest + 1, dtype)[:3] == (1, widest // 2, 0)  # wider rows are swept


@pytest.mark.skipif(not TRITON_HERE, reason="runs in test_triton_cases_pass_under_the_interpreter")
@pytest.mark.parametrize("tile", [64, 256])
@pytest.mark.parametrize("v", [5, 27, 65, 96, 300])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_tiling(monkeypatch, tile, v, reduction):
    """Small tiles, few programs: several rows a program with and without a tail (5 = 4 + 1, 65 =
    64 + 1, 96 = 64 + 32 columns), and an online softmax over column tiles for rows wider than TILE."""
    monkeypatch.setattr(tk, "TILE", tile)
    logits, target = make_case(13, v, ignore="some", device=device_for("triton"))
    logits[2, -1] = float("-inf")
    logits[3, : v // 2] = float("-inf")  # whole leading tiles of -inf
    check(logits, target, "triton", reduction=reduction, label_smoothing=0.1)


@pytest.mark.skipif(not CUDA_TRITON, reason="needs a GPU with 5 GB free")
def test_triton_64_bit_offsets():
    n, v = 65_600, 32_768  # n * v > 2**31
    logits = torch.randn(n, v, device="cuda", dtype=torch.float16)
    target = torch.randint(0, v, (n,), device="cuda")
    target[-1] = v - 1
    loss = cross_entropy(logits, target, reduction="none", backend="triton")
    ref = F.cross_entropy(logits[-4:].float(), target[-4:], reduction="none").half()
    torch.testing.assert_close(loss[-4:], ref, rtol=1e-3, atol=1e-3)


# --- memory traffic: passes over the (N, V) data, counted element by element in the interpreter ---


@contextmanager
def interpreter_traffic():
    """Record every address the interpreted kernels load and store (masked-off lanes excluded).

    Yields a function ``passes(kind, tensor)``: elements of ``kind`` ("load" or "store") that fell
    in ``tensor``'s storage, over the tensor's element count, and resets the record.
    """
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    record = {"load": [], "store": []}
    # An unmasked load or store is a masked one with every lane on: the interpreter's create_load
    # and create_store call these two, so every access is recorded here, and once.
    originals = {name: getattr(builder, name) for name in ("create_masked_load", "create_masked_store")}

    def keep(kind, ptrs, mask):
        record[kind].append(ptrs.data.reshape(-1)[mask.data.reshape(-1)])

    def create_masked_load(self, ptrs, mask, *args):
        keep("load", ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        keep("store", ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, *args)

    def passes(kind, tensor):
        low = tensor.untyped_storage().data_ptr()
        high = low + tensor.untyped_storage().nbytes()
        hits = sum(int(((a >= low) & (a < high)).sum()) for a in record[kind])
        return hits / tensor.numel()

    def reset():
        record["load"].clear()
        record["store"].clear()

    passes.reset = reset
    patches = dict(create_masked_load=create_masked_load, create_masked_store=create_masked_store)
    for name, fn in patches.items():
        setattr(builder, name, fn)
    try:
        yield passes
    finally:
        for name, fn in originals.items():
            setattr(builder, name, fn)


# (rows, V, tile): one tile per row (several rows a program, with a one-column and a 32-column
# tail), and rows swept in several tiles, both at the GPU's tile size and at a small one.
PASS_CASES = [(40, 65, None), (9, 96, None), (3, 20_000, None), (7, 65, 32), (5, 300, 64)]


@pytest.mark.skipif(not INTERPRET, reason="counts loads and stores in Triton's interpreter (runs in its subprocess)")
@pytest.mark.parametrize("n, v, tile", PASS_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_default_mode_makes_three_passes(monkeypatch, n, v, tile, reduction):
    """Forward reads the logits once and writes nothing (N, V)-sized;
    backward reads them once and writes the gradient once."""
    if tile:
        monkeypatch.setattr(tk, "TILE", tile)
    logits, target = make_case(n, v, ignore="some")
    x = logits.clone().requires_grad_()
    with interpreter_traffic() as passes:
        loss = cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, backend="triton")
        assert (passes("load", x), passes("store", x)) == (1, 0)
        passes.reset()
        upstream = torch.linspace(0.5, 2.0, loss.numel()).view(loss.shape)
        (loss * upstream).sum().backward()
        assert (passes("load", x), passes("store", x)) == (1, 0)
        assert (passes("load", x.grad), passes("store", x.grad)) == (0, 1)
    check(logits, target, "triton", reduction=reduction, label_smoothing=0.1)


@pytest.mark.skipif(not INTERPRET, reason="counts loads and stores in Triton's interpreter (runs in its subprocess)")
@pytest.mark.parametrize("n, v, tile", PASS_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_inplace_mode_makes_two_passes(monkeypatch, n, v, tile, reduction):
    """Forward reads the logits once (twice when a row spans tiles) and writes the gradient over them;
    backward touches it only where the incoming gradient is not 1, decided by the kernel."""
    if tile:
        monkeypatch.setattr(tk, "TILE", tile)
    single_tile = v <= min(tk.TILE, tk.BLOCK_V_MAX)
    logits, target = make_case(n, v, ignore="some")
    launches, launch = [], tk._launch
    monkeypatch.setattr(
        tk, "_launch", lambda kernel, *args, **meta: launches.append(kernel) or launch(kernel, *args, **meta)
    )
    for upstream_is_one in (True, False):
        x = logits.clone().requires_grad_()
        scaled = x * 1
        with interpreter_traffic() as passes:
            loss = cross_entropy(
                scaled, target, reduction=reduction, label_smoothing=0.1, inplace_grad=True, backend="triton"
            )
            assert (passes("load", scaled), passes("store", scaled)) == (1 if single_tile else 2, 1)
            passes.reset()
            launches.clear()
            if upstream_is_one:
                upstream = torch.ones_like(loss)
            else:  # every third row keeps an incoming gradient of 1 and is left alone
                upstream = (
                    torch.where(torch.arange(loss.numel()) % 3 == 0, 1.0, 2.5).view(loss.shape)
                    if loss.dim()
                    else torch.tensor(2.5)
                )
            loss.backward(upstream)
            touched = (
                0.0 if upstream_is_one else float((upstream.reshape(-1) != 1).float().mean()) if loss.dim() else 1.0
            )
            assert launches == [tk._rescale_kernel]  # the host launched it without looking at the value
            assert passes("load", scaled) == pytest.approx(touched) and passes("store", scaled) == pytest.approx(
                touched
            )
        x_ref = logits.double().requires_grad_()
        ref = F.cross_entropy(x_ref, target, reduction=reduction, label_smoothing=0.1)
        (ref * upstream.double()).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(loss, ref.float(), rtol=2e-5, atol=1e-6)


# Ops that allocate or re-view a tensor without a kernel; anything else in a Triton call would be a launch around them.
NO_KERNEL_OPS = {
    "aten::empty",
    "aten::empty_strided",
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::alias",
    "aten::detach",
}


@pytest.mark.skipif(tk is None, reason="triton is not installed")
@pytest.mark.parametrize(
    "inplace_grad, kernels",
    [(False, ["_forward_kernel", "_backward_kernel"]), (True, ["_forward_kernel", "_rescale_kernel"])],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("v", [27, 65, 1000, 20_000])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_triton_makes_one_launch_a_pass_and_nothing_around_it(monkeypatch, inplace_grad, kernels, reduction, v, batch):
    """Forward + backward is two launches in both modes, whatever the reduction (the count, the mean's
    scale, the incoming gradient and the target check are in the kernels), and no torch op around
    them launches a kernel: the profiler sees only allocations and views. Recorded at the launcher,
    without running the kernels (their outputs are left unwritten)."""
    launches = []
    monkeypatch.setattr(tk, "_launch", lambda kernel, n_blocks, *args, **meta: launches.append(kernel.__name__))
    monkeypatch.setattr(tk, "INTERPRET", True)  # backend="triton" takes CPU tensors
    monkeypatch.setattr(xent, "_host_checks", lambda logits: False)  # as on CUDA: no host read of the targets
    monkeypatch.setattr(tk, "_raise_on_bad_target", lambda *args: None)  # the interpreter's stand-in for the assert
    logits, target = make_case(40, v, ignore="some", batch=batch)
    x = logits.clone().requires_grad_()
    source = x * 1 if inplace_grad else x
    tk._workspace(source.device)  # made once per device and stream, before the first launch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss = cross_entropy(
            source, target, reduction=reduction, label_smoothing=0.1, inplace_grad=inplace_grad, backend="triton"
        )
        upstream = loss.detach()  # any tensor of the loss's shape: its values are not read here
        torch.autograd.grad(loss, source, upstream)
    assert launches == kernels
    ops = {event.name for event in prof.events() if event.name.startswith("aten::")}
    assert ops <= NO_KERNEL_OPS, ops - NO_KERNEL_OPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_opinfo_samples_with_classes_last(backend):
    """PyTorch's own OpInfo samples for nn.functional.cross_entropy (class-index targets, no class weights)."""
    if importlib.util.find_spec("expecttest") is None:
        # torch.testing._internal imports it only for its TestCase base class; the samples do not need it.
        sys.modules["expecttest"] = SimpleNamespace(TestCase=unittest.TestCase)
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(op for op in op_db if op.name == "nn.functional.cross_entropy")
    device = device_for(backend)
    tried = 0
    for sample in op.sample_inputs(device, torch.float32, requires_grad=True):
        target = sample.args[0] if sample.args else sample.kwargs["target"]
        if target.is_floating_point() or sample.kwargs.get("weight") is not None:
            continue  # class probabilities and class weights are outside this module's API
        kwargs = {k: v for k, v in sample.kwargs.items() if k in ("reduction", "ignore_index", "label_smoothing")}
        ref = F.cross_entropy(sample.input, target, **kwargs)
        (ref_grad,) = torch.autograd.grad(ref.sum(), sample.input)
        x = (
            sample.input.detach().movedim(1, -1).clone().requires_grad_()
            if sample.input.dim() > 1
            else sample.input.detach().clone().requires_grad_()
        )
        loss = cross_entropy(x, target, backend=backend, **kwargs)
        loss.sum().backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(x.grad if x.dim() == 1 else x.grad.movedim(-1, 1), ref_grad)
        tried += 1
    assert tried >= 6


def test_device_target_check_is_an_assert_not_a_host_read():
    """On CUDA the range check is torch._assert_async (no sync); on CPU tensors the same call raises at once."""
    target = torch.tensor([0, 26, -100])
    xent._assert_targets_on_device(target, 27, -100)
    with pytest.raises(RuntimeError, match=r"out of range.*\[0, 27\).*ignore_index=-100"):
        xent._assert_targets_on_device(torch.tensor([0, 27]), 27, -100)


@pytest.mark.parametrize(
    "device_type, numel, inplace_grad, expected",
    [
        (torch.device("cuda"), 32 * 27, False, "aten"),
        (torch.device("cuda"), xent.CUDA_ATEN_BELOW - 1, False, "aten"),
        (torch.device("cuda"), xent.CUDA_ATEN_BELOW, False, "triton"),
        (torch.device("cuda"), 32 * 27, True, "triton"),
        (torch.device("cuda"), 4096 * 50257, False, "triton"),
        (torch.device("cpu"), xent.ATEN_BELOW - 1, False, "aten"),
        (torch.device("cpu"), xent.ATEN_BELOW, False, "torch"),
        (torch.device("cpu"), 32 * 27, True, "torch"),
        (torch.device("mps"), 32 * 27, False, "aten"),
    ],
)  # torch.device values: the ids stay "device_type0"..., not counted as cuda cases by conftest
def test_auto_picks_f_cross_entropy_below_the_crossover(device_type, numel, inplace_grad, expected):
    """The dispatch decision on its own: the size and mode that send "auto" to each path (no tensor needed)."""
    if device_type.type == "cuda" and tk is None:
        pytest.skip("triton is not installed")
    assert xent.pick_backend(None, device_type, numel, inplace_grad) == expected
    assert xent.pick_backend("torch", device_type, numel, inplace_grad) == "torch"  # forcing wins


@pytest.mark.skipif(not CUDA_TRITON, reason="needs a GPU")
@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_never_synchronises_with_the_host(inplace_grad, reduction):
    logits, target = make_case(512, 50257, ignore="some", device="cuda")
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cross_entropy(
            x * 1, target, reduction=reduction, inplace_grad=inplace_grad, label_smoothing=0.1, backend="triton"
        )
        loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(logits, target, "triton", reduction=reduction, label_smoothing=0.1, rtol=1e-4)


# --- torch.compile: the loss and its backward in one graph ------------------------------------


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@pytest.mark.parametrize("inplace_grad, reduction", [(False, "mean"), (True, "none"), (True, "sum")])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiles_into_one_graph_with_its_backward(backend, inplace_grad, reduction, compiler):
    """fullgraph=True fails on any graph break: a host read, a data-dependent branch, an untraceable
    call. aot_eager traces forward and backward (AOTAutograd) without needing a C++ compiler; "eager"
    runs dynamo's trace of the autograd.Function alone, where a returned tensor that is another
    traced node (a no-op .to()) gets a zero gradient under torch 2.11."""
    torch._dynamo.reset()  # one code object, compiled once per case: stay under dynamo's recompile limit
    logits, target = make_case(48, 65, ignore="some", device=device_for(backend))
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)

    @torch.compile(fullgraph=True, backend=counter)
    def step(x, t):
        return cross_entropy(
            x * 2, t, reduction=reduction, label_smoothing=0.1, inplace_grad=inplace_grad, backend=backend
        )

    x = logits.clone().requires_grad_()
    loss = step(x, target)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device).view(loss.shape)
    (loss * upstream).sum().backward()
    x_ref = logits.double().requires_grad_()
    ref = F.cross_entropy(x_ref * 2, target, reduction=reduction, label_smoothing=0.1)
    (ref * upstream.double()).sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, ref.float(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_bad_target_is_still_an_error(backend):
    """Inside a compiled graph the host check becomes the device-side assert (on CPU it raises at once)."""
    if device_for(backend) == "cuda":
        pytest.skip("on CUDA a device-side assert poisons the context: test_out_of_range_target_is_a_clear_error")
    logits, target = make_case(6, 27)
    target[4] = 27
    step = torch.compile(lambda x, t: cross_entropy(x, t, backend=backend), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"cross_entropy: a target is out of range.*\[0, 27\)"):
        step(logits, target)


# --- property tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)  # derandomized by the "ci" profile (conftest.py)
@given(
    n=st.integers(1, 40),
    v=st.integers(1, 300),
    scale=st.sampled_from([0.1, 3.0, 30.0, 100.0]),
    ignore=st.sampled_from(["none", "some", "all"]),
    reduction=st.sampled_from(REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    extremes=st.lists(
        st.tuples(st.integers(0, 39), st.integers(0, 299), st.sampled_from([1e4, -1e4, -float("inf")])), max_size=4
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_torch(backend, n, v, scale, ignore, reduction, label_smoothing, extremes, seed):
    logits, target = make_case(n, v, ignore=ignore, scale=scale, seed=seed, device=device_for(backend))
    for row, col, value in extremes:
        logits[row % n, col % v] = value
    check(logits, target, backend, reduction=reduction, label_smoothing=label_smoothing, rtol=1e-4, atol=1e-5)


# --- argument checks, all before any kernel launch ----------------------------------------------


# On CUDA a bad target is a device-side assert, which leaves the process's CUDA context unusable:
# that case runs in a child process, which must die of the assert and of nothing else.
BAD_TARGET_ON_CUDA = """
import sys, torch
from makemore.kernels import cross_entropy
logits = torch.randn(6, 27, device="cuda")
target = torch.randint(0, 27, (6,), device="cuda")
target[4] = int(sys.argv[2])
loss = cross_entropy(logits, target, backend=sys.argv[1])
print("returned", flush=True)
torch.cuda.synchronize()
print("synchronized", flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("bad", [27, 1000, -1, -101])
def test_out_of_range_target_is_a_clear_error(backend, bad):
    device = device_for(backend)
    if device == "cuda":
        child = subprocess.run(
            [sys.executable, "-c", BAD_TARGET_ON_CUDA, backend, str(bad)], capture_output=True, text=True, timeout=300
        )
        assert child.returncode != 0 and "returned" in child.stdout and "synchronized" not in child.stdout, (
            child.stdout + child.stderr[-3000:]
        )
        assert "device-side assert" in child.stderr, child.stderr[-3000:]
        return
    logits, target = make_case(6, 27, ignore="some", device=device)
    target[4] = bad
    with pytest.raises(ValueError, match=rf"target\[4\] = {bad} is out of range.*\[0, 27\).*ignore_index=-100"):
        cross_entropy(logits, target, backend=backend)


def test_out_of_range_target_names_its_position_in_three_dimensional_targets():
    logits, target = make_case(5, 27, batch=(2,))
    target[1, 3] = 27
    with pytest.raises(ValueError, match=r"target\[1, 3\] = 27 is out of range"):
        cross_entropy(logits, target)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(target=torch.zeros(4, 2)), "int64 or int32"),
        (dict(target=torch.zeros(5, dtype=torch.long)), "target shape"),
        (dict(logits=torch.zeros(4, 27, dtype=torch.long)), "floating"),
        (dict(reduction="avg"), "reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_value_errors(change, message):
    args = dict(logits=torch.zeros(4, 27), target=torch.zeros(4, dtype=torch.long)) | change
    with pytest.raises(ValueError, match=message):
        cross_entropy(args.pop("logits"), args.pop("target"), **args)


def test_backend_comes_from_the_environment(monkeypatch):
    logits, target = make_case(4, 27)
    monkeypatch.setenv(xent.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="backend"):
        cross_entropy(logits, target)
    cross_entropy(logits, target, backend="torch")  # the keyword wins


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as on macOS and Windows: `import triton` raises ImportError
import torch
from makemore.kernels import cross_entropy
x, t = torch.randn(4, 27, requires_grad=True), torch.tensor([0, 5, -100, 26])
cross_entropy(x, t, backend="torch").backward()
assert x.grad.shape == (4, 27)
try:
    cross_entropy(x, t, backend="triton")
except RuntimeError as error:
    print(error)
"""


def test_without_the_gpu_package_the_fallback_runs():
    child = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "backend='triton' needs the triton package" in child.stdout


@pytest.mark.skipif(TRITON_HERE, reason="Triton can run here")
def test_triton_backend_on_cpu_tensors_says_how_to_run_it():
    logits, target = make_case(4, 27)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|needs the triton package"):
        cross_entropy(logits, target, backend="triton")


@pytest.mark.parametrize(
    "n, inplace_grad, expected", [(4, False, "aten"), (4, True, "torch"), ("at the crossover", False, "torch")]
)
def test_auto_on_cpu_takes_f_cross_entropy_below_the_crossover(monkeypatch, n, inplace_grad, expected):
    """Small problems go to F.cross_entropy (no Python autograd.Function to pay for), large ones to the fallback."""
    if n == "at the crossover":
        n = -(-xent.ATEN_BELOW // (2 * 27))  # rows of (2, 27) logits: the first size at or above ATEN_BELOW
    calls = []
    monkeypatch.setitem(xent._FORWARD, "torch", lambda *args: calls.append("torch") or _torch.forward(*args))
    spy = SimpleNamespace(
        cross_entropy=lambda *args, **kwargs: calls.append("aten") or F.cross_entropy(*args, **kwargs)
    )
    monkeypatch.setattr(xent, "F", spy)
    logits, target = make_case(n, 27, ignore="some", batch=(2,))
    loss = cross_entropy(
        logits.clone().requires_grad_(), target, reduction="none", label_smoothing=0.1, inplace_grad=inplace_grad
    )
    assert calls == [expected]
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.transpose(1, 2), target, reduction="none", label_smoothing=0.1)
    )


# --- the Triton path in the interpreter ---------------------------------------------------------


@pytest.mark.skipif(tk is None, reason="triton is not installed")
@pytest.mark.skipif(TRITON_HERE, reason="the Triton cases run in this process")
def test_triton_cases_pass_under_the_interpreter():
    """Rerun this file's Triton cases in a process that imports Triton with TRITON_INTERPRET=1."""
    rerun_triton_cases(__file__, xent.BACKEND_ENV)
