"""The Triton kernels of ``cross_entropy`` and their launcher (CUDA; CPU tensors under TRITON_INTERPRET=1).

Importing this module imports Triton; kernels/loss.py catches the ImportError where Triton does
not exist (it ships for Linux only) and uses the PyTorch fallback.

Tiles. Every program owns ROWS rows. A row of up to BLOCK_V_MAX classes is held in registers as
one tile of BLOCK_V columns plus, where V is not a power of two, a TAIL of the next power of two
covering the rest: V = 65 is 64 + 1 lanes and V = 27 is 32 (the tail would be 16, as wide as the
head, so the two merge), and no V wastes more than a quarter of its lanes (V = 2^k + 2^(k-1) + 1
comes closest). Small vocabularies pack ROWS rows into a program so it does real work; a row
wider than BLOCK_V_MAX takes a program of its own and is swept in BLOCK_V-wide tiles with an
online softmax. Row offsets are 64-bit, so N x V beyond 2**31 addresses correctly; column indices
and target comparisons stay 32-bit, which keeps register use down at small V.

Targets are only ever compared with column indices, never used as addresses: a bad target cannot
make a kernel read out of bounds, and its row's loss is nan (the caller's device-side assert
reports it).

``forward``, ``backward`` and ``rescale`` launch the kernels directly (eager calls, the least
Python per call); ``forward_op`` and friends are the same functions registered as torch.library
custom ops with shape-only fake implementations, which torch.compile traces into a graph
(kernels/loss.py picks them while compiling).
"""

from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

from ._torch import accumulator


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
def _tile_sums(x, c, shift, cls, n_cols):
    """A tile's share of (sum of exp(x - shift), the target's logit, the sum of the logits)."""
    e = tl.sum(tl.exp(x - shift[:, None]), 1)
    x_target = tl.sum(tl.where(c[None, :] == cls[:, None], x, 0.0), 1)
    x_sum = tl.sum(tl.where((c < n_cols)[None, :], x, 0.0), 1)
    return e, x_target, x_sum


@triton.jit
def _store_grad(g_rows, grad_stride_col, x, c, row_in, shift, log_d, cls, n_cols, label_smoothing, weight):
    # d(loss)/d(x) = softmax - (1 - eps) * onehot - eps / V, times the row's weight. Ignored rows
    # have weight 0 and are scaled by it rather than replaced by 0: a row of only -inf then keeps
    # its nan gradient, as in PyTorch.
    p = tl.exp((x - shift[:, None]) - log_d[:, None])
    g = p - tl.where(c[None, :] == cls[:, None], 1.0 - label_smoothing, 0.0) - label_smoothing / n_cols
    g = g * weight[:, None]
    mask = row_in[:, None] & (c < n_cols)[None, :]
    tl.store(g_rows + c.to(tl.int64)[None, :] * grad_stride_col, g.to(g_rows.dtype.element_ty), mask=mask)


# ignore_index is not specialised: its value (-100, 0, 1, ...) must not multiply compiled variants.
@triton.jit(do_not_specialize=["ignore_index"])
def _forward_kernel(
    x_ptr, x_stride_row, x_stride_col,
    target_ptr, target_stride,
    loss_ptr, stats_ptr, scale_ptr, ok_ptr,
    grad_ptr, grad_stride_row, grad_stride_col,
    n_rows, n_cols, ignore_index, label_smoothing, label_smoothing_lo,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, TAIL: tl.constexpr, SINGLE_TILE: tl.constexpr,
    SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Row losses and (shift, log-denominator) per row; with WRITE_GRAD the scaled gradient too.
    ``ok`` (one int32, 1 on entry) becomes 0 if some target is out of range."""
    label_smoothing = tl.cast(label_smoothing, ACC) + tl.cast(label_smoothing_lo, ACC)  # see _split_fp32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < n_rows
    cls, valid, bad = _row_targets(target_ptr, target_stride, rows, row_in, n_cols, ignore_index)
    cols = tl.arange(0, BLOCK_V)
    x_rows = x_ptr + rows[:, None] * x_stride_row

    if SINGLE_TILE:
        # The whole row is one tile (and its tail): it stays in registers from the load to the gradient.
        x = _load_tile(x_rows, x_stride_col, cols, row_in, n_cols, ACC)
        m = tl.max(x, 1)
        if TAIL:
            tail_cols = BLOCK_V + tl.arange(0, TAIL)
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
    loss = tl.where(bad, float("nan"), loss)  # the device-side assert reports it; never a silent value
    tl.store(ok_ptr, 0, mask=tl.max(bad.to(tl.int32), 0) > 0)
    tl.store(loss_ptr + rows, loss, mask=row_in)
    tl.store(stats_ptr + rows, shift, mask=row_in)
    tl.store(stats_ptr + n_rows + rows, log_d, mask=row_in)

    if WRITE_GRAD:
        weight = tl.where(valid, tl.load(scale_ptr).to(ACC), 0.0)
        g_rows = grad_ptr + rows[:, None] * grad_stride_row
        if SINGLE_TILE:
            _store_grad(g_rows, grad_stride_col, x, cols, row_in, shift, log_d, cls, n_cols, label_smoothing, weight)
            if TAIL:
                _store_grad(g_rows, grad_stride_col, x_tail, tail_cols, row_in, shift, log_d, cls, n_cols, label_smoothing, weight)
        else:
            # Second read of the row, right after the first (mostly from L2): the softmax needs
            # the whole row's logsumexp before any of its gradient can be written.
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
                _store_grad(g_rows, grad_stride_col, x, c, row_in, shift, log_d, cls, n_cols, label_smoothing, weight)


@triton.jit(do_not_specialize=["scale_stride", "ignore_index"])
def _backward_kernel(
    x_ptr, x_stride_row, x_stride_col,
    target_ptr, target_stride,
    stats_ptr, scale_ptr, scale_stride,
    grad_ptr, grad_stride_row, grad_stride_col,
    n_rows, n_cols, ignore_index, label_smoothing, label_smoothing_lo,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, TAIL: tl.constexpr, ACC: tl.constexpr,
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
    n_swept = n_cols
    if TAIL:
        n_swept = BLOCK_V
        tail_cols = BLOCK_V + tl.arange(0, TAIL)
        x_tail = _load_tile(x_rows, x_stride_col, tail_cols, row_in, n_cols, ACC)
        _store_grad(g_rows, grad_stride_col, x_tail, tail_cols, row_in, shift, log_d, cls, n_cols, label_smoothing, weight)
    for start in range(0, n_swept, BLOCK_V):
        c = start + cols
        x = _load_tile(x_rows, x_stride_col, c, row_in, n_cols, ACC)
        _store_grad(g_rows, grad_stride_col, x, c, row_in, shift, log_d, cls, n_cols, label_smoothing, weight)


@triton.jit
def _rescale_tile(g_rows, grad_stride_col, c, touch, scale, n_cols):
    mask = touch[:, None] & (c < n_cols)[None, :]
    ptrs = g_rows + c.to(tl.int64)[None, :] * grad_stride_col
    g = tl.load(ptrs, mask=mask)
    tl.store(ptrs, (g.to(scale.dtype) * scale[:, None]).to(g_rows.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["scale_stride"])
def _rescale_kernel(
    grad_ptr, grad_stride_row, grad_stride_col,
    scale_ptr, scale_stride,
    n_rows, n_cols,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """grad *= scale, row by row, skipping rows whose scale is exactly 1: decided here, on the device."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < n_rows
    scale = tl.load(scale_ptr + rows * scale_stride, mask=row_in, other=1.0)
    touch = row_in & (scale != 1.0)  # nan != 1: a nan incoming gradient still propagates
    if tl.max(touch.to(tl.int32), 0) > 0:
        cols = tl.arange(0, BLOCK_V)
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
# a GPU runs. A row of up to TILE classes is held in registers, one row a program (8192 fp32 values
# over 8 warps: 32 a thread); a wider row is swept in tiles of TILE // 2, 16 a thread (full-width
# sweeps took 142 registers, and spilled, in the sm_90 compile). Narrower rows share a program in
# tiles of about ROW_TILE elements over 4 warps, 8 a thread: every element there carries its own
# 64-bit address (rows of V = 27 or 65 are never 16-byte aligned), and 16 a thread took 166
# registers at V = 27. tests/test_cross_entropy_aot.py reports every configuration. float64 tiles
# hold half as many elements.
TILE = 1 << 13
ROW_TILE = 1 << 10
BLOCK_V_MAX = TILE  # the widest row kept in registers (BLOCK_V_MAX // 2 for float64)


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def launch_config(n_rows: int, n_cols: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_V, TAIL, warps) for an (n_rows, n_cols) problem in ``dtype``.

    TAIL > 0 only for a single-tile row whose V is not a power of two; with TAIL = 0 a row wider
    than BLOCK_V is swept.
    """
    return _config(n_rows, n_cols, dtype == torch.float64, TILE, ROW_TILE)


@functools.lru_cache(maxsize=256)  # computed once per shape, not once per call (tests patch TILE)
def _config(n_rows: int, n_cols: int, fp64: bool, tile: int, row_tile: int) -> tuple[int, int, int, int]:
    wide = 2 if fp64 else 1
    tile, row_tile = tile // wide, min(row_tile, tile) // wide
    if n_cols > tile:
        return 1, tile // 2, 0, 8
    block_v = _floor_pow2(n_cols)
    rest = n_cols - block_v
    tail = triton.next_power_of_2(rest) if rest else 0
    if tail == block_v:  # V = 27: 16 + 16 is one tile of 32, with the same lanes and simpler code
        block_v, tail = 2 * block_v, 0
    rows = max(1, min(_floor_pow2(max(1, row_tile // block_v)), triton.next_power_of_2(n_rows)))
    num_warps = 4 if rows * (block_v + tail) <= 2 * row_tile else 8
    return rows, block_v, tail, num_warps


def _launch(kernel, grid, *args, **meta):
    """Launch on the current stream of the tensors' device (multi-GPU).

    Every launch goes through here: tests/test_cross_entropy_aot.py records them to compile
    exactly what the dispatcher launches.
    """
    device = args[0].device
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
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
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, value - high


def forward(x, target, grad, scale, ignore_index, label_smoothing):
    """(row losses, (2, N) stats: shift and log-denominator) of 2-D ``x``; fills ``grad`` when given.

    ``scale`` is a 0-d device tensor, the gradient's reduction scale (read only with ``grad``).
    ``ignore_index`` None means no target equals it; the kernel then compares with -100 harmlessly.
    The kernel checks the targets' range as it reads them and clears a flag on a bad one, which a
    device-side assert reports: one launch, where the same check in torch ops takes six.
    """
    n_rows, n_cols = x.shape
    acc = accumulator(x.dtype)
    loss = torch.empty(n_rows, dtype=acc, device=x.device)
    stats = torch.empty(2, n_rows, dtype=acc, device=x.device)
    ok = torch.ones(1, dtype=torch.int32, device=x.device)
    rows, block_v, tail, num_warps = launch_config(n_rows, n_cols, x.dtype)
    out = grad if grad is not None else x  # unused pointers when WRITE_GRAD is off
    _launch(
        _forward_kernel, (triton.cdiv(n_rows, rows),),
        x, x.stride(0), x.stride(1),
        target, target.stride(0),
        loss, stats, scale if scale is not None else loss, ok,
        out, out.stride(0), out.stride(1),
        n_rows, n_cols,
        -100 if ignore_index is None else ignore_index,
        *_split_fp32(label_smoothing, acc),
        ROWS=rows, BLOCK_V=block_v, TAIL=tail, SINGLE_TILE=block_v + tail >= n_cols,
        SMOOTHING=label_smoothing > 0, WRITE_GRAD=grad is not None, ACC=_tl_dtype(acc),
        num_warps=num_warps,
    )  # fmt: skip
    torch._assert_async(
        ok, f"cross_entropy: a target is out of range: class indices must be in [0, {n_cols}) or equal ignore_index={ignore_index}"
    )
    return loss, stats


def backward(x, target, stats, scale, grad, ignore_index, label_smoothing):
    """Write the gradient of 2-D ``x`` into ``grad``; ``scale`` holds one value per row, or one in all."""
    n_rows, n_cols = x.shape
    rows, block_v, tail, num_warps = launch_config(n_rows, n_cols, x.dtype)
    _launch(
        _backward_kernel, (triton.cdiv(n_rows, rows),),
        x, x.stride(0), x.stride(1),
        target, target.stride(0),
        stats, scale, scale.stride(0) if scale.dim() else 0,
        grad, grad.stride(0), grad.stride(1),
        n_rows, n_cols,
        -100 if ignore_index is None else ignore_index,
        *_split_fp32(label_smoothing, stats.dtype),
        ROWS=rows, BLOCK_V=block_v, TAIL=tail, ACC=_tl_dtype(stats.dtype),
        num_warps=num_warps,
    )  # fmt: skip


def rescale(grad, scale):
    """grad *= scale (one value per row, or one in all), skipping rows where it is 1, on the device."""
    n_rows, n_cols = grad.shape
    rows, block_v, tail, num_warps = launch_config(n_rows, n_cols, grad.dtype)
    _launch(
        _rescale_kernel, (triton.cdiv(n_rows, rows),),
        grad, grad.stride(0), grad.stride(1),
        scale, scale.stride(0) if scale.dim() else 0,
        n_rows, n_cols,
        ROWS=rows, BLOCK_V=block_v, TAIL=tail, num_warps=num_warps,
    )  # fmt: skip


# --- the same launches as custom ops, for torch.compile -------------------------------------------
# Dynamo cannot trace into a Triton launch made from Python with raw strides; registered as ops
# with fake (shape-only) implementations, the launches become single graph nodes. The in-place
# forward writes the gradient over ``x``, which its schema declares.


@torch.library.custom_op("makemore::xent_triton_forward", mutates_args=())
def forward_op(x: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(x, target, None, None, ignore_index, label_smoothing)


@torch.library.custom_op("makemore::xent_triton_forward_inplace", mutates_args=("x",))
def forward_inplace_op(
    x: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(x, target, x, scale, ignore_index, label_smoothing)


@torch.library.custom_op("makemore::xent_triton_backward", mutates_args=())
def backward_op(
    x: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, scale: torch.Tensor, ignore_index: int, label_smoothing: float
) -> torch.Tensor:
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    backward(x, target, stats, scale, grad, ignore_index, label_smoothing)
    return grad


@torch.library.custom_op("makemore::xent_triton_rescale", mutates_args=("grad",))
def rescale_op(grad: torch.Tensor, scale: torch.Tensor) -> None:
    rescale(grad, scale)


@forward_op.register_fake
def _(x, target, ignore_index, label_smoothing):
    acc = accumulator(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(2, x.shape[0], dtype=acc)


@forward_inplace_op.register_fake
def _(x, target, scale, ignore_index, label_smoothing):
    acc = accumulator(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(2, x.shape[0], dtype=acc)


@backward_op.register_fake
def _(x, target, stats, scale, ignore_index, label_smoothing):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@rescale_op.register_fake
def _(grad, scale):
    return None
