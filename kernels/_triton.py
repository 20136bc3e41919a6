"""The Triton kernels of ``cross_entropy`` and their launcher (CUDA; CPU tensors under TRITON_INTERPRET=1).

Importing this module imports Triton; kernels/loss.py catches the ImportError where Triton does
not exist (it ships for Linux only) and uses the PyTorch fallback.

Launches. A call makes one launch a pass and nothing around it: forward + backward is two
launches in both modes (forward, then backward or rescale), whatever the reduction. The kernels
fold in what used to take launches of their own: the count of non-ignored targets, the mean's
1/count, the incoming gradient's scale and the target range check (a device-side assert).

Persistent programs. The grid holds as many programs as fit on the GPU at once (SMs x occupancy,
read from the compiled kernel's registers and shared memory); each loops over row blocks
pid, pid + P, pid + 2P, ... A reduction ("mean", "sum") adds each program's losses into one
partial; the program that takes the last ticket of an atomic counter sums the partials in
program order (the same order every call: deterministic) and writes the loss and the count.
The in-place mode writes gradients already divided by the count, so its programs first count
the targets together: each takes chunks of targets from an atomic counter until none is left,
then waits until every chunk taken is counted. A program only ever waits on chunks that running
programs hold, never on a program yet to start, so this cannot deadlock whatever the occupancy,
and under the interpreter (programs one after another) the first program counts every chunk.
The counters live in a small per-device, per-stream workspace that the last program leaves zeroed.

Tiles. A row of up to BLOCK_V_MAX classes is held in registers as one tile of BLOCK_V columns
plus, where V is not a power of two, a TAIL of the next power of two covering the rest: V = 65
is 64 + 1 lanes and V = 27 is 32 (the tail would be 16, as wide as the head, so the two merge),
and no V wastes more than a quarter of its lanes. A row wider than BLOCK_V_MAX takes a block of
its own and is swept in BLOCK_V-wide tiles with an online softmax.

Flat blocks. Rows of V classes in a contiguous (N, V) tensor are one run of memory, but a row of
27 or 65 floats does not start on a 16-byte boundary, so loads of the [ROWS, BLOCK_V] tile are
4 bytes wide. Where rows are contiguous and V is not a multiple of 16, a block of FLAT_ROWS rows
is loaded as one aligned run of FLAT_ROWS x V elements (16-byte vectors: FLAT_ROWS is a multiple
of the rows that make 16 bytes) and ``tl.gather`` moves it into the tiles in registers for the
row reductions. Gradients are computed on the flat lanes, each row's values gathered to its
lanes, and stored as 16-byte vectors too.

Targets are only ever compared with column indices, never used as addresses: a bad target
cannot make a kernel read out of bounds. It fails a ``tl.device_assert`` (the kernels compile
with debug on and integer-overflow checks off, so that assert is the only check), and its row's
loss is nan. The interpreter skips device asserts; there the launcher reads a flag the kernel
sets and raises instead. Row offsets are 64-bit, so N x V beyond 2**31 addresses correctly.

``forward``, ``backward`` and ``rescale`` launch the kernels directly (eager calls, the least
Python per call); ``forward_op`` and friends are the same functions registered as torch.library
custom ops with shape-only fake implementations, which torch.compile traces into a graph
(kernels/loss.py picks them while compiling).
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._torch import accumulator

# Reductions, as the kernels' REDUCTION constexpr.
NONE = tl.constexpr(0)
SUM = tl.constexpr(1)
MEAN = tl.constexpr(2)
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}

# The workspace's int32 counters.
NEXT = tl.constexpr(0)  # the next chunk of targets to count
DONE = tl.constexpr(1)  # chunks counted
COUNT = tl.constexpr(2)  # targets that are not ignore_index
TICKET = tl.constexpr(3)  # programs finished
BAD = tl.constexpr(4)  # set when a target is out of range (read under the interpreter)
COUNT_CHUNK = tl.constexpr(1024)  # targets a program counts at a time
PARTIALS = tl.constexpr(1024)  # partial sums the last program adds at a time


# --- pieces shared by the kernels ------------------------------------------------------------------


@triton.jit
def _tile_columns(BLOCK_V: tl.constexpr, TAIL: tl.constexpr):
    """The tile's column indices, and the tail's (the tile's again where there is no tail)."""
    cols = tl.arange(0, BLOCK_V)
    tail_cols = cols
    if TAIL:
        tail_cols = BLOCK_V + tl.arange(0, TAIL)
    return cols, tail_cols


@triton.jit
def _block_rows(block, n_rows, ROWS: tl.constexpr, FLAT: tl.constexpr, FLAT_ROWS: tl.constexpr):
    """Row block ``block``: (each tile row's index in the block, the block's first row, the rows: int64, which of
    them are rows of the block). A flat block holds FLAT_ROWS rows in a tile of ROWS; a tile block holds ROWS."""
    r = tl.arange(0, ROWS)
    if FLAT:
        first = tl.cast(block, tl.int64) * FLAT_ROWS
        rows = first + r
        row_in = (r < FLAT_ROWS) & (rows < n_rows)
    else:
        first = tl.cast(block, tl.int64) * ROWS
        rows = first + r
        row_in = rows < n_rows
    return r, first, rows, row_in


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
def _store_tile(g_rows, grad_stride_col, g, c, row_in, n_cols):
    mask = row_in[:, None] & (c < n_cols)[None, :]
    tl.store(g_rows + c.to(tl.int64)[None, :] * grad_stride_col, g.to(g_rows.dtype.element_ty), mask=mask)


@triton.jit
def _load_flat(ptr, rows_left, V: tl.constexpr, FLAT: tl.constexpr, FLAT_ROWS: tl.constexpr):
    """FLAT_ROWS contiguous rows of V elements (fewer at the end) as one 1-D run of FLAT lanes."""
    f = tl.arange(0, FLAT)
    if rows_left >= FLAT_ROWS:  # a whole block: the mask is a constant, so the loads are 16-byte vectors
        x = tl.load(ptr + f, mask=f < FLAT_ROWS * V, other=0.0)
    else:
        x = tl.load(ptr + f, mask=f < rows_left * V, other=0.0)
    return x


@triton.jit
def _store_flat(ptr, g, rows_left, V: tl.constexpr, FLAT: tl.constexpr, FLAT_ROWS: tl.constexpr):
    f = tl.arange(0, FLAT)
    g = g.to(ptr.dtype.element_ty)
    if rows_left >= FLAT_ROWS:
        tl.store(ptr + f, g, mask=f < FLAT_ROWS * V)
    else:
        tl.store(ptr + f, g, mask=f < rows_left * V)


@triton.jit
def _flat_to_tile(x_flat, r, c, row_in, V: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr):
    """The [ROWS, COLS] tile of columns ``c`` of the flat block's rows; -inf outside them."""
    inside = row_in[:, None] & (c < V)[None, :]
    index = tl.where(inside, r[:, None] * V + c[None, :], 0)
    x = tl.reshape(tl.gather(x_flat, tl.reshape(index, [ROWS * COLS]), 0), [ROWS, COLS])
    return tl.where(inside, x.to(ACC), float("-inf"))


@triton.jit
def _tile_sums(x, c, shift, cls, n_cols):
    """A tile's share of (sum of exp(x - shift), the target's logit, the sum of the logits)."""
    e = tl.sum(tl.exp(x - shift[:, None]), 1)
    x_target = tl.sum(tl.where(c[None, :] == cls[:, None], x, 0.0), 1)
    x_sum = tl.sum(tl.where((c < n_cols)[None, :], x, 0.0), 1)
    return e, x_target, x_sum


@triton.jit
def _grad(x, c, shift, log_d, cls, weight, n_cols, label_smoothing):
    # d(loss)/d(x) = softmax - (1 - eps) * onehot - eps / V, times the row's weight. Ignored rows
    # have weight 0 and are scaled by it rather than replaced by 0: a row of only -inf then keeps
    # its nan gradient, as in PyTorch.
    p = tl.exp((x - shift[:, None]) - log_d[:, None])
    g = p - tl.where(c[None, :] == cls[:, None], 1.0 - label_smoothing, 0.0) - label_smoothing / n_cols
    return g * weight[:, None]


@triton.jit
def _grad_flat(
    x_flat,
    shift,
    log_d,
    cls,
    weight,
    label_smoothing,
    V: tl.constexpr,
    FLAT: tl.constexpr,
    ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    """_grad on the flat block's lanes, each row's values gathered to its lanes."""
    f = tl.arange(0, FLAT)
    row = f // V
    col = f - row * V
    row = tl.minimum(row, ROWS - 1)  # lanes past the block: stored nowhere
    p = tl.exp((x_flat.to(ACC) - tl.gather(shift, row, 0)) - tl.gather(log_d, row, 0))
    g = p - tl.where(col == tl.gather(cls, row, 0), 1.0 - label_smoothing, 0.0) - label_smoothing / V
    return g * tl.gather(weight, row, 0)


@triton.jit
def _count_targets(target_ptr, target_stride, n_rows, ignore_index, work_ptr):
    """The number of targets that are not ignore_index, counted by the programs together (see the module docstring)."""
    n_chunks = tl.cdiv(n_rows, COUNT_CHUNK)
    chunk = tl.atomic_add(work_ptr + NEXT, 1)
    while chunk < n_chunks:
        rows = chunk.to(tl.int64) * COUNT_CHUNK + tl.arange(0, COUNT_CHUNK)
        t = tl.load(target_ptr + rows * target_stride, mask=rows < n_rows, other=ignore_index)
        tl.atomic_add(work_ptr + COUNT, tl.sum((t != ignore_index).to(tl.int32)))
        tl.atomic_add(work_ptr + DONE, 1, sem="release")
        chunk = tl.atomic_add(work_ptr + NEXT, 1)
    done = tl.atomic_add(work_ptr + DONE, 0, sem="acquire")
    while done < n_chunks:  # only chunks that running programs hold are outstanding
        done = tl.atomic_add(work_ptr + DONE, 0, sem="acquire")
    return tl.atomic_add(work_ptr + COUNT, 0, sem="acquire")


@triton.jit
def _finish(
    loss_ptr,
    count_ptr,
    work_ptr,
    partial_ptr,
    loss_sum,
    n_valid,
    COUNTED: tl.constexpr,
    REDUCTION: tl.constexpr,
    WRITE_COUNT: tl.constexpr,
):
    """Hand in this program's partial sum; the last program to do so writes the loss and resets the workspace."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    tl.store(partial_ptr + pid, loss_sum.to(tl.float64))
    if not COUNTED:
        tl.atomic_add(work_ptr + COUNT, n_valid)
    # The barrier and acq_rel: this program's partial is visible before its ticket; the last one
    # sees every partial.
    tl.debug_barrier()
    ticket = tl.atomic_add(work_ptr + TICKET, 1, sem="acq_rel")
    if ticket == n_programs - 1:
        total = tl.zeros([], tl.float64)
        for start in range(0, n_programs, PARTIALS):  # in program order: the same sum every call
            i = start + tl.arange(0, PARTIALS)
            total += tl.sum(tl.load(partial_ptr + i, mask=i < n_programs, other=0.0, cache_modifier=".cg"))
        count = tl.atomic_xchg(work_ptr + COUNT, 0)
        if REDUCTION == MEAN:
            total = total / count.to(tl.float64)  # 0 / 0: nan, as PyTorch
            if WRITE_COUNT:
                tl.store(count_ptr, count.to(count_ptr.dtype.element_ty))
        total = total.to(loss_sum.dtype)  # through ACC: the interpreter rounds float64 to bfloat16 wrongly
        tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))
        tl.atomic_xchg(work_ptr + NEXT, 0)
        tl.atomic_xchg(work_ptr + DONE, 0)
        tl.atomic_xchg(work_ptr + TICKET, 0)


# --- the kernels -----------------------------------------------------------------------------------


# ignore_index is not specialised: its value (-100, 0, 1, ...) must not multiply compiled variants.
@triton.jit(do_not_specialize=["ignore_index"])
def _forward_kernel(
    x_ptr,
    x_stride_row,
    x_stride_col,
    target_ptr,
    target_stride,
    loss_ptr,
    aux_ptr,
    work_ptr,
    partial_ptr,
    grad_ptr,
    grad_stride_row,
    grad_stride_col,
    n_rows,
    n_cols,
    ignore_index,
    label_smoothing,
    label_smoothing_lo,
    REDUCTION: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    COUNT_FIRST: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    TAIL: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    FLAT: tl.constexpr,
    FLAT_ROWS: tl.constexpr,
    V: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ACC: tl.constexpr,
):
    """The loss (per row, or reduced); with WRITE_STATS each row's (shift, log-denominator) and
    the count for backward in ``aux``; with WRITE_GRAD the gradient, scaled for the reduction
    (COUNT_FIRST: the mean's, counted before any gradient is written). FLAT blocks take V = n_cols."""
    label_smoothing = tl.cast(label_smoothing, ACC) + tl.cast(label_smoothing_lo, ACC)  # see _split_fp32
    if COUNT_FIRST:  # the gradient's scale, 1 / count, before any gradient is written
        n_counted = _count_targets(target_ptr, target_stride, n_rows, ignore_index, work_ptr)
        scale = 1.0 / n_counted.to(ACC)  # inf for no targets, which ignored rows never see
    else:
        scale = tl.full([], 1.0, ACC)
    loss_sum = tl.zeros([], ACC)
    n_valid = tl.zeros([], tl.int32)
    n_blocks = tl.cdiv(n_rows, FLAT_ROWS)
    cols, tail_cols = _tile_columns(BLOCK_V, TAIL)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        r, first, rows, row_in = _block_rows(block, n_rows, ROWS, FLAT, FLAT_ROWS)
        if FLAT:
            x_flat = _load_flat(x_ptr + first * V, n_rows - first, V, FLAT, FLAT_ROWS)
        else:
            x_rows = x_ptr + rows[:, None] * x_stride_row
        cls, valid, bad = _row_targets(target_ptr, target_stride, rows, row_in, n_cols, ignore_index)
        tl.device_assert(
            bad == 0, "cross_entropy: a target is out of range: class indices must be in [0, V) or equal ignore_index"
        )
        tl.store(work_ptr + BAD, 1, mask=tl.max(bad.to(tl.int32), 0) > 0)

        if SINGLE_TILE:
            # The whole row is one tile (and its tail): it stays in registers from the load to the gradient.
            if FLAT:
                x = _flat_to_tile(x_flat, r, cols, row_in, V, ROWS, BLOCK_V, ACC)
            else:
                x = _load_tile(x_rows, x_stride_col, cols, row_in, n_cols, ACC)
            m = tl.max(x, 1)
            if TAIL:
                if FLAT:
                    x_tail = _flat_to_tile(x_flat, r, tail_cols, row_in, V, ROWS, TAIL, ACC)
                else:
                    x_tail = _load_tile(x_rows, x_stride_col, tail_cols, row_in, n_cols, ACC)
                m = tl.maximum(m, tl.max(x_tail, 1))
            shift = tl.where(m == float("-inf"), 0.0, m)  # exp(-inf - 0) adds 0, not nan
            denominator, x_target, x_sum = _tile_sums(x, cols, shift, cls, n_cols)
            if TAIL:
                d_tail, t_tail, s_tail = _tile_sums(x_tail, tail_cols, shift, cls, n_cols)
                denominator += d_tail
                x_target += t_tail
                x_sum += s_tail
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
                e, t_part, s_part = _tile_sums(x, c, new_shift, cls, n_cols)
                denominator = denominator * tl.exp(shift - new_shift) + e
                shift = new_shift
                x_target += t_part
                x_sum += s_part
        log_d = tl.log(denominator)

        # The target's logit came from the tiles already loaded: no gather, and nothing to re-read
        # after an in-place gradient has overwritten the logits. Subtracting it from the max before
        # adding log_d keeps small losses exact next to large logits (lse ~ 1e4).
        loss = (m - x_target) + log_d
        if SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * ((m - x_sum / n_cols) + log_d)
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)  # never a silent value where asserts are off
        if REDUCTION == NONE:
            tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_in)
        else:
            loss_sum += tl.sum(loss, 0)
            n_valid += tl.sum(valid.to(tl.int32), 0)
        if WRITE_STATS:
            tl.store(aux_ptr + rows, shift, mask=row_in)
            tl.store(aux_ptr + n_rows + rows, log_d, mask=row_in)

        if WRITE_GRAD:
            weight = tl.where(valid, scale, 0.0)
            if FLAT:
                g_flat = _grad_flat(x_flat, shift, log_d, cls, weight, label_smoothing, V, FLAT, ROWS, ACC)
                _store_flat(grad_ptr + first * V, g_flat, n_rows - first, V, FLAT, FLAT_ROWS)
            elif SINGLE_TILE:
                g = _grad(x, cols, shift, log_d, cls, weight, n_cols, label_smoothing)
                g_rows = grad_ptr + rows[:, None] * grad_stride_row
                _store_tile(g_rows, grad_stride_col, g, cols, row_in, n_cols)
                if TAIL:
                    g = _grad(x_tail, tail_cols, shift, log_d, cls, weight, n_cols, label_smoothing)
                    _store_tile(g_rows, grad_stride_col, g, tail_cols, row_in, n_cols)
            else:
                # Second read of the row, right after the first (mostly from L2): the softmax needs
                # the whole row's logsumexp before any of its gradient can be written.
                g_rows = grad_ptr + rows[:, None] * grad_stride_row
                for start in range(0, n_cols, BLOCK_V):
                    c = start + cols
                    x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
                    g = _grad(x, c, shift, log_d, cls, weight, n_cols, label_smoothing)
                    _store_tile(g_rows, grad_stride_col, g, c, row_in, n_cols)

    if REDUCTION != NONE:
        count_ptr = aux_ptr + 2 * n_rows  # where backward reads the mean's count
        _finish(loss_ptr, count_ptr, work_ptr, partial_ptr, loss_sum, n_valid, COUNT_FIRST, REDUCTION, WRITE_STATS)


@triton.jit(do_not_specialize=["ignore_index", "go_stride"])
def _backward_kernel(
    x_ptr,
    x_stride_row,
    x_stride_col,
    target_ptr,
    target_stride,
    aux_ptr,
    go_ptr,
    go_stride,
    grad_ptr,
    grad_stride_row,
    grad_stride_col,
    n_rows,
    n_cols,
    ignore_index,
    label_smoothing,
    label_smoothing_lo,
    REDUCTION: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    TAIL: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    FLAT: tl.constexpr,
    FLAT_ROWS: tl.constexpr,
    V: tl.constexpr,
    ACC: tl.constexpr,
):
    """One read of the logits, one write of the gradient, times the incoming gradient ``go`` (one
    value per row for reduction "none") and, for the mean, 1 / the count forward left in ``aux``."""
    label_smoothing = tl.cast(label_smoothing, ACC) + tl.cast(label_smoothing_lo, ACC)  # see _split_fp32
    if REDUCTION != NONE:
        scale = tl.load(go_ptr).to(ACC)
        if REDUCTION == MEAN:
            scale = scale / tl.load(aux_ptr + 2 * n_rows)
    n_blocks = tl.cdiv(n_rows, FLAT_ROWS)
    cols, tail_cols = _tile_columns(BLOCK_V, TAIL)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        r, first, rows, row_in = _block_rows(block, n_rows, ROWS, FLAT, FLAT_ROWS)
        if FLAT:
            x_flat = _load_flat(x_ptr + first * V, n_rows - first, V, FLAT, FLAT_ROWS)
        else:
            x_rows = x_ptr + rows[:, None] * x_stride_row
            g_rows = grad_ptr + rows[:, None] * grad_stride_row
        cls, valid, bad = _row_targets(target_ptr, target_stride, rows, row_in, n_cols, ignore_index)
        shift = tl.load(aux_ptr + rows, mask=row_in, other=0.0)
        log_d = tl.load(aux_ptr + n_rows + rows, mask=row_in, other=0.0)
        if REDUCTION == NONE:
            scale = tl.load(go_ptr + rows * go_stride, mask=row_in, other=0.0).to(ACC)
        # tl.where, not a product: a mean over no targets has scale inf, and its rows must get 0.
        weight = tl.where(valid, scale, 0.0)
        if FLAT:
            g_flat = _grad_flat(x_flat, shift, log_d, cls, weight, label_smoothing, V, FLAT, ROWS, ACC)
            _store_flat(grad_ptr + first * V, g_flat, n_rows - first, V, FLAT, FLAT_ROWS)
        elif SINGLE_TILE:
            x = _load_tile(x_rows, x_stride_col, cols, row_in, n_cols, ACC)
            g = _grad(x, cols, shift, log_d, cls, weight, n_cols, label_smoothing)
            _store_tile(g_rows, grad_stride_col, g, cols, row_in, n_cols)
            if TAIL:
                x_tail = _load_tile(x_rows, x_stride_col, tail_cols, row_in, n_cols, ACC)
                g = _grad(x_tail, tail_cols, shift, log_d, cls, weight, n_cols, label_smoothing)
                _store_tile(g_rows, grad_stride_col, g, tail_cols, row_in, n_cols)
        else:
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
                g = _grad(x, c, shift, log_d, cls, weight, n_cols, label_smoothing)
                _store_tile(g_rows, grad_stride_col, g, c, row_in, n_cols)


@triton.jit
def _rescale_tile(g_rows, grad_stride_col, c, touch, scale, n_cols):
    mask = touch[:, None] & (c < n_cols)[None, :]
    ptrs = g_rows + c.to(tl.int64)[None, :] * grad_stride_col
    g = tl.load(ptrs, mask=mask)
    tl.store(ptrs, (g.to(scale.dtype) * scale[:, None]).to(g_rows.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["go_stride"])
def _rescale_kernel(
    grad_ptr,
    grad_stride_row,
    grad_stride_col,
    go_ptr,
    go_stride,
    n_rows,
    n_cols,
    PER_ROW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    TAIL: tl.constexpr,
    FLAT: tl.constexpr,
    ACC: tl.constexpr,
):
    """grad *= go, skipping rows whose ``go`` is exactly 1: decided here, on the device. With one
    ``go`` for all and contiguous rows (FLAT), the gradient is one run of 16-byte vectors."""
    if not PER_ROW and FLAT:
        scale = tl.load(go_ptr).to(ACC)
        if scale != 1.0:  # nan != 1: a nan incoming gradient still propagates
            n = n_rows.to(tl.int64) * n_cols
            f = tl.arange(0, FLAT)
            for block in tl.range(tl.program_id(0), tl.cdiv(n, FLAT), tl.num_programs(0)):
                ptrs = grad_ptr + tl.cast(block, tl.int64) * FLAT + f
                if (tl.cast(block, tl.int64) + 1) * FLAT <= n:
                    tl.store(ptrs, (tl.load(ptrs).to(ACC) * scale).to(grad_ptr.dtype.element_ty))
                else:
                    mask = tl.cast(block, tl.int64) * FLAT + f < n
                    tl.store(ptrs, (tl.load(ptrs, mask=mask).to(ACC) * scale).to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        cols = tl.arange(0, BLOCK_V)
        for block in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
            rows = tl.cast(block, tl.int64) * ROWS + tl.arange(0, ROWS)
            row_in = rows < n_rows
            scale = tl.load(go_ptr + rows * go_stride, mask=row_in, other=1.0).to(ACC)
            touch = row_in & (scale != 1.0)
            if tl.max(touch.to(tl.int32), 0) > 0:
                g_rows = grad_ptr + rows[:, None] * grad_stride_row
                n_swept = n_cols
                if TAIL:
                    n_swept = BLOCK_V
                    _rescale_tile(g_rows, grad_stride_col, BLOCK_V + tl.arange(0, TAIL), touch, scale, n_cols)
                for start in range(0, n_swept, BLOCK_V):
                    _rescale_tile(g_rows, grad_stride_col, start + cols, touch, scale, n_cols)


# triton.jit hands back an interpreter instead of a compiled kernel when TRITON_INTERPRET=1.
INTERPRET = not isinstance(_forward_kernel, triton.runtime.JITFunction)

# Elements per program, the same under the interpreter as on the GPU, so the tests run the tilings
# a GPU runs. A row of up to TILE classes is held in registers, one row a block (8192 fp32 values
# over 16 warps: 16 a thread); a wider row is swept in tiles of TILE // 2 over 8 warps. Narrower
# rows share a block in 2-D tiles of about ROW_TILE elements over 4 warps, or load as flat blocks
# of FLAT_LANES lanes, 8 a thread (float64: half the lanes). tests/test_cross_entropy_aot.py
# reports the registers of every configuration.
TILE = 1 << 13
ROW_TILE = 1 << 10
BLOCK_V_MAX = TILE  # the widest row kept in registers (BLOCK_V_MAX // 2 for float64)
FLAT_LANES = (1 << 10, 1 << 11, 1 << 12)
FLAT_LANES_PER_WARP = 256  # 8 elements a thread, whatever the block: registers stay in budget
LANES_USED = 0.75  # the least share of its lanes a flat block and its tile may fill
RESCALE_BYTES = 1 << 13  # a block of the in-place gradient's rescale: four 16-byte vectors a thread over 4 warps
MAX_PROGRAMS = 1 << 14  # the partial sums' slots: more than any GPU holds programs at once
INTERPRET_PROGRAMS = 3  # programs under the interpreter: each loops over several blocks, unevenly


class Config(NamedTuple):
    """How a launch tiles an (N, V) problem."""

    rows: int  # ROWS: rows of the tile (a power of two)
    block_v: int  # BLOCK_V: columns of the tile
    tail: int  # TAIL: columns of the tail tile (0: none; with rows wider than BLOCK_V, a sweep)
    num_warps: int
    flat: int = 0  # FLAT: lanes of the flat block (0: rows are loaded as 2-D tiles)
    flat_rows: int = 0  # FLAT_ROWS: rows a block holds (the tile's rows without a flat block)


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def launch_config(n_rows: int, n_cols: int, dtype: torch.dtype = torch.float32, contiguous: bool = False) -> Config:
    """The tiling of an (n_rows, n_cols) problem in ``dtype``; ``contiguous``: rows follow each other in memory."""
    return _config(n_rows, n_cols, torch.empty((), dtype=dtype).element_size(), contiguous, TILE, ROW_TILE)


@functools.lru_cache(maxsize=256)  # computed once per shape, not once per call (tests patch TILE)
def _config(n_rows: int, n_cols: int, element_size: int, contiguous: bool, tile: int, row_tile: int) -> Config:
    wide = 2 if element_size == 8 else 1
    tile, row_tile = tile // wide, min(row_tile, tile) // wide
    if n_cols > tile:
        return Config(1, tile // 2, 0, 8, 0, 1)
    block_v = _floor_pow2(n_cols)
    rest = n_cols - block_v
    tail = triton.next_power_of_2(rest) if rest else 0
    if tail == block_v:  # V = 27: 16 + 16 is one tile of 32, with the same lanes and simpler code
        block_v, tail = 2 * block_v, 0
    if contiguous and n_cols % 16:  # rows not 16-byte aligned: a flat block where one fills its lanes
        flat = _flat_config(n_cols, element_size, n_rows, wide)
        if flat is not None:
            rows, flat_lanes, flat_rows = flat
            return Config(rows, block_v, tail, max(4, flat_lanes * wide // FLAT_LANES_PER_WARP), flat_lanes, flat_rows)
    rows = max(1, min(_floor_pow2(max(1, row_tile // block_v)), triton.next_power_of_2(n_rows)))
    # At most 16 elements a thread (8 in float64): the widest rows take 16 warps.
    num_warps = max(4, min(16, rows * (block_v + tail) * wide // 512))
    return Config(rows, block_v, tail, num_warps, 0, rows)


def _flat_config(n_cols: int, element_size: int, n_rows: int, wide: int) -> tuple[int, int, int] | None:
    """(tile rows, flat lanes, rows a block) filling the most lanes, or None where no choice fills LANES_USED of both.

    A block's rows are a multiple of ``align``, so every block starts on a 16-byte boundary.
    """
    align = 16 // math.gcd(n_cols * element_size, 16)
    best, best_use = None, 0.0
    for lanes in (lanes // wide for lanes in FLAT_LANES):
        for flat_rows in range(align, min(lanes // n_cols, max(align, n_rows)) + 1, align):
            rows = triton.next_power_of_2(flat_rows)
            flat_use, row_use = flat_rows * n_cols / lanes, flat_rows / rows
            if min(flat_use, row_use) >= LANES_USED and flat_use * row_use > best_use + 1e-9:
                best, best_use = (rows, lanes, flat_rows), flat_use * row_use
    return best


def _rows_follow(x: torch.Tensor) -> bool:
    """Whether the rows of 2-D ``x`` lie one after another in memory (a flat block may load them)."""
    return x.stride(1) == 1 and (x.stride(0) == x.shape[1] or x.shape[0] == 1)


# --- the launcher ----------------------------------------------------------------------------------

_CAPACITY: dict = {}
_WORKSPACES: dict = {}
# Every launch compiles with its device asserts on, no integer-overflow checks, and at most
# MAX_REGISTERS a thread (ptxas otherwise settles some kernels at 64 and spills).
MAX_REGISTERS = 128
_COMPILE = dict(debug=True, sanitize_overflow=False, maxnreg=MAX_REGISTERS)


def _capacity(kernel, device: torch.device, args, meta) -> int:
    """Programs of this kernel the device holds at once: SMs x occupancy (registers, shared memory, threads)."""
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    key = (kernel, device.index, *(a.dtype for a in args if isinstance(a, torch.Tensor)), *meta.items())
    capacity = _CAPACITY.get(key)
    if capacity is None:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        threads = 32 * meta["num_warps"]
        registers = -(-max(compiled.n_regs, 1) // 8) * 8 * threads  # allocated 8 a thread at a time
        per_sm = min(props.max_threads_per_multi_processor // threads, 65536 // registers)
        if compiled.metadata.shared:
            per_sm = min(per_sm, props.shared_memory_per_multiprocessor // compiled.metadata.shared)
        capacity = _CAPACITY[key] = min(MAX_PROGRAMS, max(1, per_sm) * props.multi_processor_count)
    return capacity


def _launch(kernel, n_blocks: int, *args, **meta):
    """Launch ``kernel`` over ``n_blocks`` row blocks with a persistent grid, on the current stream
    of the tensors' device (multi-GPU).

    Every launch goes through here: tests/test_cross_entropy_aot.py records them to compile
    exactly what the dispatcher launches, and tests count them.
    """
    device = args[0].device
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        kernel[(min(n_blocks, _capacity(kernel, device, args, meta)),)](*args, **meta)


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 counters, float64 partial sums) for the launches on ``device``'s current stream.

    Zeroed once; every kernel leaves the counters zeroed, so calls on one stream reuse them in
    turn. Each stream has its own, so calls on two streams never share counters.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    work = _WORKSPACES.get((device, stream))
    if work is None:
        work = _WORKSPACES[(device, stream)] = (
            torch.zeros(8, dtype=torch.int32, device=device),
            torch.empty(MAX_PROGRAMS, dtype=torch.float64, device=device),
        )
    return work


def _raise_on_bad_target(work: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Under the interpreter (which skips device asserts): the kernel's flag as the assert's error."""
    if work[BAD.value]:
        work[BAD.value] = 0
        raise RuntimeError(
            f"cross_entropy: a target is out of range: class indices must be in [0, {n_cols}) or equal "
            f"ignore_index={ignore_index} (device-side assert)"
        )


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
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, value - high


def forward(x, target, grad, reduction, ignore_index, label_smoothing, want_stats):
    """(loss, aux) of 2-D ``x``: the loss in x's dtype (N values for reduction "none", else one);
    ``aux`` what backward needs (each row's shift and log-denominator, then the count: 2N + 1
    values) when ``want_stats``, else empty. With ``grad`` (the in-place mode: ``x`` itself) the
    gradient is written too, scaled for the reduction. ``ignore_index`` None means no target
    equals it; the kernel then compares with -100 harmlessly. One launch.
    """
    n_rows, n_cols = x.shape
    acc = accumulator(x.dtype)
    cfg = launch_config(n_rows, n_cols, x.dtype, _rows_follow(x))
    red = REDUCTION_CODES[reduction]
    loss = torch.empty(n_rows if red == 0 else (), dtype=x.dtype, device=x.device)
    aux = torch.empty(2 * n_rows + 1 if want_stats else 0, dtype=acc, device=x.device)
    work, partials = _workspace(x.device)
    ignore_index = -100 if ignore_index is None else ignore_index
    out = grad if grad is not None else x  # unused pointers when WRITE_GRAD is off
    _launch(
        _forward_kernel,
        triton.cdiv(n_rows, cfg.flat_rows),
        x,
        x.stride(0),
        x.stride(1),
        target,
        target.stride(0),
        loss,
        aux,
        work,
        partials,
        out,
        out.stride(0),
        out.stride(1),
        n_rows,
        n_cols,
        ignore_index,
        *_split_fp32(label_smoothing, acc),
        REDUCTION=red,
        WRITE_STATS=want_stats,
        WRITE_GRAD=grad is not None,
        COUNT_FIRST=grad is not None and red == 2,
        ROWS=cfg.rows,
        BLOCK_V=cfg.block_v,
        TAIL=cfg.tail,
        SINGLE_TILE=cfg.block_v + cfg.tail >= n_cols,
        FLAT=cfg.flat,
        FLAT_ROWS=cfg.flat_rows,
        V=n_cols if cfg.flat else 0,
        SMOOTHING=label_smoothing > 0,
        ACC=_tl_dtype(acc),
        num_warps=cfg.num_warps,
        **_COMPILE,
    )
    if INTERPRET:
        _raise_on_bad_target(work, n_cols, ignore_index)
    return loss, aux


def backward(x, target, aux, grad_output, grad, reduction, ignore_index, label_smoothing):
    """Write the gradient of 2-D ``x`` into ``grad`` (contiguous), times ``grad_output`` (one value,
    or one per row for reduction "none"); ``aux`` is forward's. One launch."""
    n_rows, n_cols = x.shape
    cfg = launch_config(n_rows, n_cols, x.dtype, _rows_follow(x))
    _launch(
        _backward_kernel,
        triton.cdiv(n_rows, cfg.flat_rows),
        x,
        x.stride(0),
        x.stride(1),
        target,
        target.stride(0),
        aux,
        grad_output,
        grad_output.stride(0) if grad_output.dim() else 0,
        grad,
        grad.stride(0),
        grad.stride(1),
        n_rows,
        n_cols,
        -100 if ignore_index is None else ignore_index,
        *_split_fp32(label_smoothing, aux.dtype),
        REDUCTION=REDUCTION_CODES[reduction],
        ROWS=cfg.rows,
        BLOCK_V=cfg.block_v,
        TAIL=cfg.tail,
        SINGLE_TILE=cfg.block_v + cfg.tail >= n_cols,
        FLAT=cfg.flat,
        FLAT_ROWS=cfg.flat_rows,
        V=n_cols if cfg.flat else 0,
        ACC=_tl_dtype(aux.dtype),
        num_warps=cfg.num_warps,
        **_COMPILE,
    )


def rescale(grad, grad_output):
    """grad *= grad_output (one value, or one per row), skipping rows where it is 1, on the device. One launch."""
    n_rows, n_cols = grad.shape
    cfg = launch_config(n_rows, n_cols, grad.dtype)
    per_row = grad_output.dim() > 0
    flat = 0 if per_row or not _rows_follow(grad) else RESCALE_BYTES // grad.element_size()
    _launch(
        _rescale_kernel,
        triton.cdiv(n_rows * n_cols, flat) if flat else triton.cdiv(n_rows, cfg.rows),
        grad,
        grad.stride(0),
        grad.stride(1),
        grad_output,
        grad_output.stride(0) if per_row else 0,
        n_rows,
        n_cols,
        PER_ROW=per_row,
        ROWS=cfg.rows,
        BLOCK_V=cfg.block_v,
        TAIL=cfg.tail,
        FLAT=flat,
        ACC=_tl_dtype(accumulator(grad.dtype)),
        num_warps=4 if flat else cfg.num_warps,
        **_COMPILE,
    )


# --- the same launches as custom ops, for torch.compile -------------------------------------------
# Dynamo cannot trace into a Triton launch made from Python with raw strides; registered as ops
# with fake (shape-only) implementations, the launches become single graph nodes. The in-place
# forward writes the gradient over ``x``, which its schema declares.


@torch.library.custom_op("makemore::xent_triton_forward", mutates_args=())
def forward_op(
    x: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int, label_smoothing: float, want_stats: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(x, target, None, reduction, ignore_index, label_smoothing, want_stats)


@torch.library.custom_op("makemore::xent_triton_forward_inplace", mutates_args=("x",))
def forward_inplace_op(
    x: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int, label_smoothing: float
) -> torch.Tensor:
    return forward(x, target, x, reduction, ignore_index, label_smoothing, False)[0]


@torch.library.custom_op("makemore::xent_triton_backward", mutates_args=())
def backward_op(
    x: torch.Tensor,
    target: torch.Tensor,
    aux: torch.Tensor,
    grad_output: torch.Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    backward(x, target, aux, grad_output, grad, reduction, ignore_index, label_smoothing)
    return grad


@torch.library.custom_op("makemore::xent_triton_rescale", mutates_args=("grad",))
def rescale_op(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    rescale(grad, grad_output)


def _fake_loss(x, reduction):
    return x.new_empty(x.shape[0] if reduction == "none" else ())


@forward_op.register_fake
def _(x, target, reduction, ignore_index, label_smoothing, want_stats):
    return _fake_loss(x, reduction), x.new_empty(2 * x.shape[0] + 1 if want_stats else 0, dtype=accumulator(x.dtype))


@forward_inplace_op.register_fake
def _(x, target, reduction, ignore_index, label_smoothing):
    return _fake_loss(x, reduction)


@backward_op.register_fake
def _(x, target, aux, grad_output, reduction, ignore_index, label_smoothing):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@rescale_op.register_fake
def _(grad, grad_output):
    return None
