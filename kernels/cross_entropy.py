"""Fused softmax-cross-entropy: a Triton kernel for CUDA and a PyTorch fallback for everything else.

``cross_entropy`` has ``torch.nn.functional.cross_entropy``'s semantics for class-index targets,
with the classes in the LAST dimension: logits (..., V) and targets (...). (F.cross_entropy
wants (N, C, d1, ...); a (N, C, C) tensor is valid for both and gives different losses, with no
error, so move the class dimension last before calling this.)

Memory traffic, in passes over the (N, V) logits-sized data (one pass = every element read
once, or written once), counted from the kernels below:

    mode                                    forward    backward             forward + backward
    default                                 1 read     1 read + 1 write     3
    inplace_grad=True, V <= BLOCK_V_MAX (*) 1 read     0 (incoming grad 1)  2
      (gradient written during forward      + 1 write  2 (otherwise)        4
       into the logits' storage)
    inplace_grad=True, V >  BLOCK_V_MAX (*) 2 reads    as above             3 (5 if rescaled)
                                            + 1 write
    no gradient wanted                      1 read     -                    1

    (*) BLOCK_V_MAX = 8192 classes (4096 for float64)

- Default: forward reads each row once (an online softmax across column tiles when the row is
  wider than one tile) and keeps the row's max and log-denominator, two numbers a row. Backward
  reads the logits once more and writes the gradient, already multiplied by the incoming
  gradient (per row for reduction="none") and the mean's 1/count. Nothing (N, V)-sized is held
  between the two calls except the logits themselves (F.cross_entropy keeps its log-softmax).
- ``inplace_grad=True``: forward writes d(loss)/d(logits), scaled for the reduction, over the
  logits. A row up to BLOCK_V_MAX classes stays in registers from its load to its gradient; a
  wider one is read a second time right after the first (mostly from L2), because the
  gradient needs the whole row's logsumexp. Backward launches one kernel whose programs read
  the incoming gradient on the device and touch their rows only where it is not exactly 1, so
  ``loss.backward()`` costs no pass over the gradient and no host synchronisation.

No device-to-host synchronisation on CUDA: the target range check is a device-side assert
(``torch._assert_async``, as F.cross_entropy's own CUDA kernels do: a bad target stops the
process's CUDA context at the next synchronisation); the kernels never address memory with a
target (they compare it with column indices), so nothing is read out of bounds before the assert
fires, and a bad row's loss is nan. The count of non-ignored targets and the mean's scale are
device tensors. The loss therefore works under CUDA graphs and without host round trips. On CPU
the checks run on the host and a bad target is a ValueError naming its position.

Vectorised loads: Triton emits 16-byte loads only where it can prove a row starts 16-byte
aligned and the load mask is constant over each 16 bytes, which it learns from the launcher's
integer specialisation (stride and V divisible by 16). At V = 50,257 neither holds, so loads are
4 or 2 bytes wide; a warp's neighbouring loads still coalesce into full 32-byte sectors, so the
DRAM traffic is the same and only the instruction count grows. Padding here would need a copy of
the logits (two more passes); the cure belongs to the caller: a vocabulary padded to a multiple
of 16 or 64 classes (GPT-2's 50,304) gives aligned rows and unmasked tiles.

Small problems, where a Python autograd.Function's fixed cost outweighs the fusion, go to
F.cross_entropy itself unless a backend is forced (ATEN_BELOW on CPU, CUDA_ATEN_BELOW on CUDA).
float64 logits are computed in float64 by both backends; the rest accumulate in float32.

The module reads top to bottom: input checks, backend choice, the Triton kernels and their
launchers, the PyTorch fallback, the autograd Function, and the public function.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the fallback covers the rest.
    triton = None

__all__ = ["cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "MAKEMORE_XENT_BACKEND"


# ---------------------------------------------------------------------------------------------
# Input checks. Argument checks never read tensor values. Target values are checked on the host
# where that is free (CPU), and with a device-side assert on CUDA, where reading them would
# cost a synchronisation.


def _check_arguments(logits, target, reduction, label_smoothing) -> None:
    """Raise ValueError on arguments F.cross_entropy would refuse; the target values are not read."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"logits and target must be tensors, got {type(logits).__name__} and {type(target).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits must be a floating tensor of shape (..., V), got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[-1] == 0:  # every target is out of range, or all are ignored: 0 / 0 classes, in every backend
        raise ValueError(f"logits must have at least one class (V >= 1 in the last dimension), got shape {tuple(logits.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' shape without the class dimension, "
            f"{tuple(logits.shape[:-1])} (classes are the last dimension, unlike F.cross_entropy's dim 1)"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def _check_targets(logits, target, ignore_index) -> bool:
    """Raise ValueError on a class index out of range; return whether some target may equal ``ignore_index``.

    Reads the targets on the host: for CPU tensors (and other non-CUDA devices) only.
    """
    if target.numel() == 0:
        return False
    # One reduction settles the common case; the position of a bad value is looked up only on failure.
    n_classes = logits.shape[-1]
    low, high = (int(v) for v in torch.aminmax(target))
    if low < 0 or high >= n_classes:
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bad.any():
            position = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(
                f"target{position} = {int(target[tuple(position)])} is out of range: class indices must be "
                f"in [0, {n_classes}) or equal ignore_index={ignore_index}"
            )
    return low <= ignore_index <= high


def _assert_targets_on_device(target, n_classes, ignore_index) -> None:
    """The CUDA form of _check_targets: a device-side assert, so the host never waits for the values."""
    in_range = ((target >= 0) & (target < n_classes)) | (target == ignore_index)
    torch._assert_async(
        in_range.all(),
        f"cross_entropy: a target is out of range: class indices must be in [0, {n_classes}) or equal "
        f"ignore_index={ignore_index}",
    )


# Below this many logits, "auto" on CPU hands the problem to F.cross_entropy. Small problems: a
# Python autograd.Function costs more per call than fusing saves (about 130 us against 70 us for
# all of F.cross_entropy at N = 32, V = 27 on our 2-core CPU). Up to a few million logits,
# F.cross_entropy's vectorised log-softmax is faster still, its two (N, V) buffers staying in
# cache; above, the fused path's single pass wins. Measured forward + backward, F.cross_entropy's
# time over the fused path's: 0.71 at 4096 x 256, 0.89 at 4096 x 1024, 1.05 at 16384 x 256 (all
# 2^22 logits and below), 1.66 at 4096 x 2048. bench/bench_cross_entropy.py measures both sides.
ATEN_BELOW = 1 << 22

# The same line on CUDA, where problems too small to fill the GPU (makemore's 32 x 27) are
# dominated by launch and Python overhead. PROVISIONAL: no GPU measurement has been made yet; set
# it from bench/bench_cross_entropy.py --device cuda (the size where the fused path's forward +
# backward time crosses F.cross_entropy's).
CUDA_ATEN_BELOW = 1 << 16


def _pick_backend(backend: str | None, logits: torch.Tensor, inplace_grad: bool) -> str:
    """The path to run: "triton", "torch" (the fused fallback) or "aten" (F.cross_entropy itself)."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or unset), got {backend!r}")
    device = logits.device
    if backend == "auto":
        if device.type == "cuda" and triton is not None:
            return "aten" if logits.numel() < CUDA_ATEN_BELOW and not inplace_grad else "triton"
        return "aten" if logits.numel() < ATEN_BELOW and not inplace_grad else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package, which could not be imported")
        if device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device.type} ones; to run the kernel on CPU "
                "tensors set TRITON_INTERPRET=1 before kernels is imported"
            )
    return backend


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64; every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Triton kernels. Every program owns ROWS rows and walks their columns in BLOCK_V-wide tiles:
# small vocabularies (27, 65) pack many rows into one tile, so a program does real work; large
# ones (50,257 and up) take one row per program and loop over column tiles. Row offsets are
# 64-bit, so N x V beyond 2**31 addresses correctly; per-element column indices and the target
# comparisons stay 32-bit, which keeps register use down at small V.
#
# Targets are only ever compared with column indices, never used as addresses: a bad target
# cannot make a kernel read out of bounds.

if triton is not None:

    @triton.jit
    def _row_targets(target_ptr, target_stride, rows, row_in, n_cols, ignore_index):
        """(class to pick: int32, -1 for none; the row counts; the row's target is out of range)."""
        t = tl.load(target_ptr + rows * target_stride, mask=row_in, other=ignore_index)
        valid = row_in & (t != ignore_index)
        in_range = (t >= 0) & (t < n_cols)
        cls = tl.where(valid & in_range, t, -1).to(tl.int32)
        return cls, valid, valid & ~in_range

    @triton.jit
    def _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC: tl.constexpr):
        # Padding rows past the end and columns past V load -inf: no memory is touched for them.
        mask = row_in[:, None] & (c < n_cols)[None, :]
        x = tl.load(x_rows + c.to(tl.int64)[None, :] * x_stride_col, mask=mask, other=float("-inf"))
        return x.to(ACC)

    @triton.jit
    def _grad_tile(x, shift, log_d, cls, c, n_cols, label_smoothing, weight):
        # d(loss)/d(x) = softmax - (1 - eps) * onehot - eps / V, times the row's weight. Ignored
        # rows have weight 0 and are scaled by it rather than replaced by 0: a row of only -inf then
        # keeps its nan gradient, as in PyTorch.
        p = tl.exp((x - shift[:, None]) - log_d[:, None])
        g = p - tl.where(c[None, :] == cls[:, None], 1.0 - label_smoothing, 0.0) - label_smoothing / n_cols
        return g * weight[:, None]

    # ignore_index is not specialised: its value (-100, 0, 1, ...) must not multiply compiled variants.
    @triton.jit(do_not_specialize=["ignore_index"])
    def _forward_kernel(
        x_ptr, x_stride_row, x_stride_col,
        target_ptr, target_stride,
        loss_ptr, stats_ptr, scale_ptr,
        grad_ptr, grad_stride_row, grad_stride_col,
        n_rows, n_cols, ignore_index, label_smoothing, label_smoothing_lo,
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE_TILE: tl.constexpr,
        SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Row losses and (shift, log-denominator) per row; with WRITE_GRAD the scaled gradient too."""
        label_smoothing = tl.cast(label_smoothing, ACC) + tl.cast(label_smoothing_lo, ACC)  # see _split_fp32
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_in = rows < n_rows
        cls, valid, bad = _row_targets(target_ptr, target_stride, rows, row_in, n_cols, ignore_index)
        cols = tl.arange(0, BLOCK_V)
        x_rows = x_ptr + rows[:, None] * x_stride_row

        if SINGLE_TILE:
            # The whole row fits in one tile: it stays in registers from the load to the gradient.
            x = _load_tile(x_rows, x_stride_col, cols, row_in, n_cols, ACC)
            m = tl.max(x, 1)
            shift = tl.where(m == float("-inf"), 0.0, m)  # exp(-inf - 0) adds 0, not nan
            denominator = tl.sum(tl.exp(x - shift[:, None]), 1)
            x_target = tl.sum(tl.where(cols[None, :] == cls[:, None], x, 0.0), 1)
            if SMOOTHING:
                x_sum = tl.sum(tl.where((cols < n_cols)[None, :], x, 0.0), 1)
        else:
            # One sweep with an online softmax: the running max rescales the running sum.
            m = tl.full([ROWS], float("-inf"), ACC)
            shift = tl.zeros([ROWS], ACC)
            denominator = tl.zeros([ROWS], ACC)
            x_target = tl.zeros([ROWS], ACC)
            x_sum = tl.zeros([ROWS], ACC)
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
                m = tl.maximum(m, tl.max(x, 1))
                new_shift = tl.where(m == float("-inf"), 0.0, m)
                denominator = denominator * tl.exp(shift - new_shift) + tl.sum(tl.exp(x - new_shift[:, None]), 1)
                shift = new_shift
                x_target += tl.sum(tl.where(c[None, :] == cls[:, None], x, 0.0), 1)
                if SMOOTHING:
                    x_sum += tl.sum(tl.where((c < n_cols)[None, :], x, 0.0), 1)
        log_d = tl.log(denominator)

        # The target's logit came from the tiles already loaded: no gather, and nothing to re-read
        # after an in-place gradient has overwritten the logits. Subtracting it from the max before
        # adding log_d keeps small losses exact next to large logits (lse ~ 1e4).
        loss = (m - x_target) + log_d
        if SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * ((m - x_sum / n_cols) + log_d)
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)  # the device-side assert reports it; never a silent value
        tl.store(loss_ptr + rows, loss, mask=row_in)
        tl.store(stats_ptr + rows, shift, mask=row_in)
        tl.store(stats_ptr + n_rows + rows, log_d, mask=row_in)

        if WRITE_GRAD:
            weight = tl.where(valid, tl.load(scale_ptr).to(ACC), 0.0)
            g_rows = grad_ptr + rows[:, None] * grad_stride_row
            if SINGLE_TILE:
                g = _grad_tile(x, shift, log_d, cls, cols, n_cols, label_smoothing, weight)
                store_in = row_in[:, None] & (cols < n_cols)[None, :]
                tl.store(g_rows + cols[None, :] * grad_stride_col, g.to(grad_ptr.dtype.element_ty), mask=store_in)
            else:
                # Second read of the row, right after the first (mostly from L2): the softmax needs
                # the whole row's logsumexp before any of its gradient can be written.
                for start in range(0, n_cols, BLOCK_V):
                    c = start + cols
                    x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
                    g = _grad_tile(x, shift, log_d, cls, c, n_cols, label_smoothing, weight)
                    store_in = row_in[:, None] & (c < n_cols)[None, :]
                    g_ptrs = g_rows + c.to(tl.int64)[None, :] * grad_stride_col
                    tl.store(g_ptrs, g.to(grad_ptr.dtype.element_ty), mask=store_in)

    @triton.jit(do_not_specialize=["scale_stride", "ignore_index"])
    def _backward_kernel(
        x_ptr, x_stride_row, x_stride_col,
        target_ptr, target_stride,
        stats_ptr, scale_ptr, scale_stride,
        grad_ptr, grad_stride_row, grad_stride_col,
        n_rows, n_cols, ignore_index, label_smoothing, label_smoothing_lo,
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """One read of the logits, one write of the gradient, scaled per row by ``scale`` (stride 0: one value)."""
        label_smoothing = tl.cast(label_smoothing, ACC) + tl.cast(label_smoothing_lo, ACC)  # see _split_fp32
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_in = rows < n_rows
        cls, valid, bad = _row_targets(target_ptr, target_stride, rows, row_in, n_cols, ignore_index)
        shift = tl.load(stats_ptr + rows, mask=row_in, other=0.0)
        log_d = tl.load(stats_ptr + n_rows + rows, mask=row_in, other=0.0)
        # tl.where, not a product: a mean over no targets has scale inf, and its rows must get 0.
        weight = tl.where(valid, tl.load(scale_ptr + rows * scale_stride, mask=row_in, other=0.0).to(ACC), 0.0)
        cols = tl.arange(0, BLOCK_V)
        x_rows = x_ptr + rows[:, None] * x_stride_row
        g_rows = grad_ptr + rows[:, None] * grad_stride_row
        for start in range(0, n_cols, BLOCK_V):
            c = start + cols
            x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
            g = _grad_tile(x, shift, log_d, cls, c, n_cols, label_smoothing, weight)
            store_in = row_in[:, None] & (c < n_cols)[None, :]
            tl.store(g_rows + c.to(tl.int64)[None, :] * grad_stride_col, g.to(grad_ptr.dtype.element_ty), mask=store_in)

    @triton.jit(do_not_specialize=["scale_stride"])
    def _rescale_kernel(
        grad_ptr, grad_stride_row, grad_stride_col,
        scale_ptr, scale_stride,
        n_rows, n_cols,
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """grad *= scale, row by row, skipping rows whose scale is exactly 1: decided here, on the device."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_in = rows < n_rows
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_in, other=1.0)
        touch = row_in & (scale != 1.0)  # nan != 1: a nan incoming gradient still propagates
        if tl.max(touch.to(tl.int32), 0) > 0:
            cols = tl.arange(0, BLOCK_V)
            g_rows = grad_ptr + rows[:, None] * grad_stride_row
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                mask = touch[:, None] & (c < n_cols)[None, :]
                ptrs = g_rows + c.to(tl.int64)[None, :] * grad_stride_col
                g = tl.load(ptrs, mask=mask)
                tl.store(ptrs, (g.to(scale.dtype) * scale[:, None]).to(grad_ptr.dtype.element_ty), mask=mask)

    # triton.jit hands back an interpreter instead of a compiled kernel when TRITON_INTERPRET=1.
    INTERPRET = not isinstance(_forward_kernel, triton.runtime.JITFunction)
else:
    INTERPRET = False

# Elements per program, the same under the interpreter as on the GPU, so the tests run the tilings
# a GPU runs. A row wider than one tile is swept in TILE-wide tiles, one row a program (8192 fp32
# values over 8 warps: 32 a thread). Rows narrower than that share a program in ROW_TILE-element
# tiles (2048 over 4 warps: 16 a thread): every element there carries its own 64-bit address, as
# V = 27 or 65 rows are never 16-byte aligned, and 32 a thread spilled at V = 65 in the sm_90
# compile (tests/test_cross_entropy_aot.py). float64 tiles hold half as many elements.
TILE = 1 << 13
ROW_TILE = 1 << 11
BLOCK_V_MAX = TILE  # the widest row kept in one tile (BLOCK_V_MAX // 2 for float64)


def _launch_config(n_rows: int, n_cols: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(rows per program, columns per tile, warps) for an (n_rows, n_cols) problem in ``dtype``."""
    wide = 2 if dtype == torch.float64 else 1
    tile, row_tile = TILE // wide, min(ROW_TILE, TILE) // wide
    block_v = max(16, min(triton.next_power_of_2(n_cols), tile))
    rows = max(1, min(row_tile // block_v, triton.next_power_of_2(n_rows)))
    num_warps = 4 if rows * block_v <= 2048 else 8
    return rows, block_v, num_warps


def _launch(kernel, grid, *args, **meta):
    """Launch under the tensors' device (multi-GPU), on its current stream.

    Every launch goes through here: tests/test_cross_entropy_aot.py records them to compile
    exactly what the dispatcher launches.
    """
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _split_fp32(value: float, acc: torch.dtype) -> tuple[float, float]:
    """``value`` as (its fp32 rounding, the rest), for kernels that add the two in ACC.

    Triton passes a Python float to a compiled kernel as fp32 (the interpreter rounds it where it
    meets a tensor): label smoothing 0.1 would arrive as 0.10000000149, an error of 1e-8 in float64
    losses and gradients. Both parts survive fp32 (the first exactly, the second to 2^-48 of the
    value); in float32 the second vanishes below the first's last bit, so it is 0 there.
    """
    if acc != torch.float64:
        return value, 0.0
    high = torch.tensor(value, dtype=torch.float32).item()
    return high, value - high


def _triton_forward(x, target, grad, scale, ignore_index, label_smoothing):
    """(row losses, (2, N) stats: shift and log-denominator) of 2-D ``x``; fills ``grad`` when given.

    ``scale`` is a 0-d device tensor, the gradient's reduction scale (read only with ``grad``).
    """
    n_rows, n_cols = x.shape
    acc = _accumulator(x.dtype)
    loss = torch.empty(n_rows, dtype=acc, device=x.device)
    stats = torch.empty(2, n_rows, dtype=acc, device=x.device)
    rows, block_v, num_warps = _launch_config(n_rows, n_cols, x.dtype)
    out = grad if grad is not None else x  # unused pointers when WRITE_GRAD is off
    _launch(
        _forward_kernel, (triton.cdiv(n_rows, rows),),
        x, x.stride(0), x.stride(1),
        target, target.stride(0),
        loss, stats, scale if scale is not None else loss,
        out, out.stride(0), out.stride(1),
        n_rows, n_cols,
        -100 if ignore_index is None else ignore_index,
        *_split_fp32(label_smoothing, acc),
        ROWS=rows, BLOCK_V=block_v, SINGLE_TILE=block_v >= n_cols,
        SMOOTHING=label_smoothing > 0, WRITE_GRAD=grad is not None, ACC=_tl_dtype(acc),
        num_warps=num_warps,
    )  # fmt: skip
    return loss, stats


def _triton_backward(x, target, stats, scale, grad, ignore_index, label_smoothing):
    """Write the gradient of 2-D ``x`` into ``grad``; ``scale`` holds one value per row, or one in all."""
    n_rows, n_cols = x.shape
    rows, block_v, num_warps = _launch_config(n_rows, n_cols, x.dtype)
    _launch(
        _backward_kernel, (triton.cdiv(n_rows, rows),),
        x, x.stride(0), x.stride(1),
        target, target.stride(0),
        stats, scale, scale.stride(0) if scale.dim() else 0,
        grad, grad.stride(0), grad.stride(1),
        n_rows, n_cols,
        -100 if ignore_index is None else ignore_index,
        *_split_fp32(label_smoothing, stats.dtype),
        ROWS=rows, BLOCK_V=block_v, ACC=_tl_dtype(stats.dtype),
        num_warps=num_warps,
    )  # fmt: skip


def _triton_rescale(grad, scale):
    """grad *= scale (one value per row, or one in all), skipping rows where it is 1, on the device."""
    n_rows, n_cols = grad.shape
    rows, block_v, num_warps = _launch_config(n_rows, n_cols, grad.dtype)
    _launch(
        _rescale_kernel, (triton.cdiv(n_rows, rows),),
        grad, grad.stride(0), grad.stride(1),
        scale, scale.stride(0) if scale.dim() else 0,
        n_rows, n_cols,
        ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# PyTorch fallback: the same passes in chunks of rows small enough to stay in cache, so the
# (N, V) traffic is what the table in the module docstring says, and no (N, V) temporary exists
# besides the gradient. Within a chunk a few more passes run in cache.

CHUNK_ELEMENTS = 1 << 20

# Logits within +-EXP_SAFE need no max-shift: exp cannot overflow a row's sum (V * e**64 stays far
# below fp32's maximum) nor underflow a row's largest term (e**-64 is a normal float). Softmax is
# then one exp pass and a row sum, about half the work of a max-shifted one.
EXP_SAFE = 64.0


def _row_weights(target, ignore_index, scale, n_rows):
    """(targets with ignored ones set to class 0, per-row weight (rows, 1): scale, or 0 where ignored)."""
    target = target.long().unsqueeze(1)
    scale = scale.reshape(-1, 1) if scale.dim() else scale.expand(n_rows, 1)
    if ignore_index is None:
        return target, scale
    ignored = target == ignore_index
    # torch.where, not a product: a mean over no targets has scale inf, and its rows must get 0.
    return target.masked_fill(ignored, 0), torch.where(ignored, 0.0, scale)


def _torch_forward(logits, target, grad, scale, ignore_index, label_smoothing):
    """(row losses, (2, N) stats) of 2-D ``logits``; fills ``grad`` when given.

    The stats are each row's shift and denominator (the Triton kernel keeps log-denominators): the
    backward pass then divides by the very sum the forward pass took, so a one-class row's
    gradient is exactly 0.

    ``ignore_index`` is None when no target equals it, which spares the masking: at V = 27 the
    handful of small ops per call weigh as much as the arithmetic.
    """
    n_rows, n_cols = logits.shape
    acc = _accumulator(logits.dtype)
    eps = label_smoothing
    ignored = None if ignore_index is None else (target == ignore_index).unsqueeze(1)
    if grad is not None:
        target, weight = _row_weights(target, ignore_index, scale.to(acc), n_rows)
    else:
        target = target.long().unsqueeze(1)
        weight = None
        if ignored is not None:
            target = target.masked_fill(ignored, 0)  # ignored rows read class 0, harmlessly
    stats = torch.empty(2, n_rows, 1, dtype=acc, device=logits.device)
    rows = max(1, CHUNK_ELEMENTS // n_cols)
    # The gradient's own rows are the working buffer when it has the accumulator's dtype; lower
    # precisions work in the copy that upcasting makes anyway; only an acc-dtype input without a
    # gradient needs scratch space.
    direct = grad is not None and grad.dtype == acc
    scratch = None
    if grad is None and logits.dtype == acc:
        scratch = torch.empty(min(rows, n_rows), n_cols, dtype=acc, device=logits.device)
    losses = []
    chunks = _row_chunks(n_rows, rows, logits, target, grad, weight, ignored, stats[0], stats[1])
    for x, t, g, w, ign, shift_out, denominator_out in chunks:
        x = x.to(acc)
        buf = g if direct else x if scratch is None else scratch[: len(x)]
        x_target = x.gather(1, t)  # read before buf may overwrite x
        x_mean = x.mean(1, keepdim=True) if eps else None
        low, high = torch.aminmax(x)
        if -EXP_SAFE <= low.item() and high.item() <= EXP_SAFE:
            shift = None
            denominator = torch.exp(x, out=buf).sum(1, keepdim=True)
        else:  # extreme or infinite logits: shift by the row max
            m = x.amax(1, keepdim=True)
            shift = m.masked_fill(m == float("-inf"), 0.0)  # exp(-inf - 0) adds 0, not nan
            denominator = torch.sub(x, shift, out=buf).exp_().sum(1, keepdim=True)
        # Per row only, in fp64: lse - x_target in fp32 would round to ulp(lse) ~ 4e-6, coarse next
        # to a confident row's loss.
        log_d = torch.log(denominator.double())  # not in place: for fp64, .double() is the same tensor
        if shift is None:
            loss = log_d - x_target
            smooth = (log_d - x_mean) if eps else None
            shift_out.zero_()
        else:
            loss = (m - x_target) + log_d
            smooth = ((m - x_mean) + log_d) if eps else None
            shift_out.copy_(shift)
        if eps:
            loss = (1 - eps) * loss + eps * smooth
        loss = loss.to(acc)
        denominator_out.copy_(denominator)
        if ign is not None:
            loss.masked_fill_(ign, 0.0)
        losses.append(loss)
        if g is not None:
            # buf holds exp(x - shift): scale it to softmax * w, then subtract eps * w / V everywhere
            # and (1 - eps) * w at the target.
            _finish_grad(buf, t, w, denominator.reciprocal_(), eps, n_cols)
            if not direct:
                g.copy_(buf)
    return torch.cat(losses).view(-1), stats.view(2, n_rows)


def _finish_grad(buf, t, w, inv_denominator, eps, n_cols):
    """buf = exp(x - shift) becomes (softmax - (1 - eps) * onehot - eps / V) * w, in place."""
    # The target's entry p - (1 - eps) - eps / V cancels: it is computed on its own from the
    # unscaled p, as the kernel does, and written over the rest, so it is exact to fp32 at any w
    # (a one-class row gets 0) without a second pass over the chunk to scale after subtracting.
    at_target = buf.gather(1, t).mul_(inv_denominator).sub_(1 - eps)
    buf.mul_(inv_denominator.mul_(w))
    if eps:
        at_target.sub_(eps / n_cols)
        buf.sub_(w * (eps / n_cols))
    buf.scatter_(1, t, at_target.mul_(w))


def _torch_backward(logits, target, stats, scale, grad, ignore_index, label_smoothing):
    """Write the gradient of 2-D ``logits`` into ``grad``: one read of the logits, one write."""
    n_rows, n_cols = logits.shape
    acc = stats.dtype
    target, weight = _row_weights(target, ignore_index, scale.to(acc), n_rows)
    shift, denominator = stats.unsqueeze(2)
    direct = grad.dtype == acc
    rows = max(1, CHUNK_ELEMENTS // n_cols)
    for x, t, g, w, s, d in _row_chunks(n_rows, rows, logits, target, grad, weight, shift, denominator):
        # exp of a half tensor is computed in half (e**11.1 is inf there): upcast first.
        x = x.to(acc)
        buf = g if direct else x
        if s.any():
            torch.sub(x, s, out=buf).exp_()
        else:
            torch.exp(x, out=buf)
        _finish_grad(buf, t, w, d.reciprocal(), label_smoothing, n_cols)
        if not direct:
            g.copy_(buf)


def _torch_rescale(grad, scale):
    """grad *= scale; on the host's own device, skipping an exact 1 costs nothing to decide."""
    if scale.dim() == 0:
        if scale.item() != 1.0:
            grad.mul_(scale.to(grad.dtype))
    elif not bool((scale == 1.0).all()):
        grad.mul_(scale.to(grad.dtype).unsqueeze(1))


def _row_chunks(n_rows, rows, *values):
    """The values cut into matching chunks of ``rows`` rows; a non-tensor repeats in every chunk."""
    if n_rows <= rows:
        return [values]  # slicing costs about as much as a pass over the data at V = 27
    return zip(*(v.split(rows) if isinstance(v, torch.Tensor) else itertools.repeat(v) for v in values))


# ---------------------------------------------------------------------------------------------
# Autograd glue, shared by both backends.

_FORWARD = {"triton": _triton_forward, "torch": _torch_forward}
_BACKWARD = {"triton": _triton_backward, "torch": _torch_backward}
_RESCALE = {"triton": _triton_rescale, "torch": _torch_rescale}


def _shares_memory(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may be one memory location (stride 0, or as_strided overlaps).

    Sorted by stride, each dimension must step past everything the smaller ones span; a layout
    that fails this might still be injective, but none that PyTorch's view ops make.
    """
    reach = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, ignore_index, may_ignore, reduction, label_smoothing, inplace_grad, backend, want_grad
    ):
        n_cols = logits.shape[-1]
        x = logits if logits.dim() == 2 else logits.reshape(-1, n_cols)  # a view whenever strides allow
        t = target if target.dim() == 1 else target.reshape(-1)
        acc = _accumulator(logits.dtype)
        count = None
        if reduction == "mean":
            # A device tensor, never read on the host; a plain int when nothing can be ignored.
            count = (t != ignore_index).sum() if may_ignore else t.numel()
        fused = want_grad and inplace_grad
        grad = scale = None
        if fused:
            if _shares_memory(x):  # rows would write their gradients over each other's
                raise ValueError(
                    "inplace_grad=True writes the gradient over the logits, but some of their elements share memory "
                    "(an expanded tensor?); pass logits.contiguous() or leave inplace_grad off"
                )
            grad = x
            torch.autograd.graph.increment_version(logits)  # autograd then rejects stale uses of the logits
            # The reduction's scale; a mean over no targets gives inf, which ignored rows never see.
            scale = torch.ones((), dtype=acc, device=x.device)
            if count is not None:
                scale = scale / count
        ignored = ignore_index if may_ignore else None
        if t.numel():
            rows, stats = _FORWARD[backend](x, t, grad, scale, ignored, label_smoothing)
        else:
            rows, stats = x.new_zeros(0, dtype=acc), x.new_zeros(2, 0, dtype=acc)

        ctx.fused, ctx.reduction, ctx.count, ctx.backend = fused, reduction, count, backend
        ctx.ignore_index, ctx.label_smoothing, ctx.shape = ignored, label_smoothing, logits.shape
        if fused:
            ctx.grad = grad if logits.dim() == 2 else grad.view(logits.shape)
        elif want_grad:
            ctx.save_for_backward(x, t, stats)
        if reduction == "none":
            return rows.view(target.shape).to(logits.dtype)
        total = rows.sum()
        return (total if count is None else total / count).to(logits.dtype)  # 0 / 0: nan, as PyTorch

    @staticmethod
    def backward(ctx, grad_output):
        # Grad mode is on here only under create_graph=True. The gradient is computed by kernels,
        # outside autograd: refuse rather than return one with no grad_fn, which would read as a
        # zero second derivative.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy cannot differentiate twice (backward ran with create_graph=True); use "
                "F.cross_entropy for higher-order gradients"
            )
        acc = _accumulator(grad_output.dtype)
        scale = grad_output.to(acc)
        if ctx.fused:
            # The gradient was written during forward, scaled for the reduction: hand the buffer
            # over (autograd stores it as .grad without a copy) after multiplying by the incoming
            # gradient where that is not 1.
            grad, ctx.grad = ctx.grad, None
            if grad is None:
                raise RuntimeError(
                    "cross_entropy(inplace_grad=True) writes its gradient during forward and hands it over "
                    "on the first backward; it cannot backpropagate twice (run the forward again, or leave "
                    "inplace_grad off)"
                )
            if grad.numel():
                g = grad if grad.dim() == 2 else grad.view(-1, grad.shape[-1])
                _RESCALE[ctx.backend](g, scale.reshape(-1) if ctx.reduction == "none" else scale)
            return grad, None, None, None, None, None, None, None, None
        x, t, stats = ctx.saved_tensors
        if ctx.reduction == "mean":
            scale = scale / ctx.count  # on the device
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if t.numel():
            scale = scale.reshape(-1) if ctx.reduction == "none" else scale
            _BACKWARD[ctx.backend](x, t, stats, scale, grad, ctx.ignore_index, ctx.label_smoothing)
        return grad.view(ctx.shape), None, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    inplace_grad: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    Matches ``torch.nn.functional.cross_entropy`` for class-index targets (int64 or int32), with
    the same ``ignore_index``, ``reduction`` and ``label_smoothing``, except that the classes are
    the LAST dimension of ``logits`` (F.cross_entropy takes them in dim 1). The loss has the
    logits' dtype; float64 logits are computed in float64, the others accumulate in float32.

    inplace_grad: write the gradient into the logits' storage during forward (2 passes over the
        logits instead of 3, see the module docstring). The logits are overwritten by the forward
        call, so nothing else may read them afterwards, and backward runs once per forward.
    backend: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch" (the fused PyTorch
        fallback), or "auto": Triton for CUDA tensors, otherwise the fallback, or below
        CUDA_ATEN_BELOW / ATEN_BELOW logits (without inplace_grad) F.cross_entropy itself, which
        is faster there. Unset, $MAKEMORE_XENT_BACKEND decides, defaulting to "auto".
    """
    _check_arguments(logits, target, reduction, label_smoothing)
    backend = _pick_backend(backend, logits, inplace_grad)
    if backend == "aten":
        return _aten_cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
    if logits.device.type == "cuda":
        _assert_targets_on_device(target, logits.shape[-1], ignore_index)
        may_ignore = True
    else:
        may_ignore = _check_targets(logits, target, ignore_index)
    # Inside forward grad mode is always off and needs_input_grad ignores it, so decide here.
    want_grad = logits.requires_grad and torch.is_grad_enabled()
    return _CrossEntropy.apply(
        logits, target, ignore_index, may_ignore, reduction, float(label_smoothing), inplace_grad, backend, want_grad
    )


def _aten_cross_entropy(logits, target, ignore_index, reduction, label_smoothing):
    """F.cross_entropy on the (..., V) layout, with this module's error for a bad target on CPU.

    On CUDA F.cross_entropy asserts on a bad target on the device itself, without a sync.
    """
    if logits.device.type not in ("cpu", "cuda"):
        _check_targets(logits, target, ignore_index)
    rows, row_targets = logits, target
    if logits.dim() != 2:  # F.cross_entropy wants the classes in dim 1; (N, V) skips a view node in the graph
        rows, row_targets = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    try:
        loss = F.cross_entropy(
            rows, row_targets.long(), ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    except IndexError:  # on CPU F.cross_entropy checks the targets itself, before reading logits with them
        _check_targets(logits, target, ignore_index)  # names the bad target's position in the caller's shape
        raise
    return loss.view(target.shape) if reduction == "none" else loss
