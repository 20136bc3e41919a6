"""Fused softmax-cross-entropy: a Triton kernel for CUDA and a PyTorch fallback for everything else.

``cross_entropy`` has ``torch.nn.functional.cross_entropy``'s semantics for class-index targets.
Both backends compute each row's logsumexp, its loss and, when the logits need a gradient,
d(loss)/d(logits) in the forward call. The gradient is already scaled for the reduction, so
backward only multiplies by the incoming gradient, and no (N, V) softmax or log-softmax tensor
exists besides the gradient itself (F.cross_entropy keeps the log-softmax and then allocates
the gradient). With ``inplace_grad=True`` the gradient overwrites the logits' storage instead.
Small CPU problems, where a Python autograd.Function's fixed cost outweighs the fusion, go to
F.cross_entropy itself unless a backend is forced.

The module reads top to bottom: input checks, backend choice, the Triton kernel and its launcher,
the PyTorch fallback, the autograd Function, and the public function.
"""

from __future__ import annotations

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
# Input checks: all of them run before any kernel launch, so a bad target is an error, never
# an out-of-bounds read. (On CPU, F.cross_entropy bounds-checks its own targets; the small
# problems handed to it skip the extra pass and get the same error afterwards.)


def _check_arguments(logits, target, reduction, label_smoothing) -> None:
    """Raise ValueError on arguments F.cross_entropy would refuse; the target values are not read."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits must be a floating tensor of shape (..., V), got {logits.dtype} {tuple(logits.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' shape without the class dimension, "
            f"{tuple(logits.shape[:-1])}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def _check_targets(logits, target, ignore_index) -> bool:
    """Raise ValueError on a class index out of range; return whether some target may equal ``ignore_index``."""
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


# Below this many logits, "auto" on CPU hands the problem to F.cross_entropy: a Python
# autograd.Function costs about 130 us a call more than F.cross_entropy's C++ path on our 2-core
# CPU (200 against 70 us at N = 32, V = 27), more than fusing saves until about 4096 x 65 logits,
# and F.cross_entropy's two (N, V) buffers are at most 4 MiB here. bench/bench_cross_entropy.py
# measures both sides of the line.
ATEN_BELOW = 1 << 19


def _pick_backend(backend: str | None, logits: torch.Tensor, inplace_grad: bool) -> str:
    """The path to run: "triton", "torch" (the fused fallback) or "aten" (F.cross_entropy itself)."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or unset), got {backend!r}")
    device = logits.device
    if backend == "auto":
        if device.type == "cuda" and triton is not None:
            return "triton"
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


# ---------------------------------------------------------------------------------------------
# Triton kernel. Each program owns ROWS rows and walks their columns in BLOCK_V-wide tiles:
# small vocabularies (27, 65) pack many rows into one tile, so a program does real work; large
# ones (50,257 and up) take one row per program and loop over column tiles with an online
# softmax. Offsets are 64-bit so N x V beyond 2**31 addresses correctly.

if triton is not None:

    @triton.jit
    def _smoothed_softmax_grad(x, m, log_d, target, cols, valid, n_cols, label_smoothing, grad_scale):
        # d(loss)/d(x) = softmax - (1 - eps) * onehot - eps / V, times the reduction's scale.
        p = tl.exp((x - m[:, None]) - log_d[:, None])
        hit = cols[None, :] == target[:, None]
        g = p - tl.where(hit, 1.0 - label_smoothing, 0.0) - label_smoothing / n_cols
        # Ignored rows are scaled by 0 rather than replaced by 0: a row of only -inf then keeps
        # its nan gradient, as in PyTorch.
        return g * tl.where(valid, grad_scale, 0.0)[:, None]

    @triton.jit
    def _cross_entropy_kernel(
        logits_ptr, logits_stride_row, logits_stride_col,
        target_ptr, target_stride,
        loss_ptr,
        grad_ptr, grad_stride_row, grad_stride_col,
        n_rows, n_cols, ignore_index, label_smoothing, grad_scale,
        ROWS: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE_TILE: tl.constexpr,
        SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_in = rows < n_rows
        # Padding rows past the end re-read the last row, so they compute finite values; their
        # results are never stored.
        src_rows = tl.minimum(rows, n_rows - 1)
        target = tl.load(target_ptr + src_rows * target_stride).to(tl.int64)
        valid = row_in & (target != ignore_index)
        cols = tl.arange(0, BLOCK_V).to(tl.int64)
        x_rows = logits_ptr + src_rows[:, None] * logits_stride_row
        g_rows = grad_ptr + rows[:, None] * grad_stride_row

        if SINGLE_TILE:
            # The whole row fits in one tile: it stays in registers from the load to the gradient.
            col_in = cols[None, :] < n_cols
            x = tl.load(x_rows + cols[None, :] * logits_stride_col, mask=col_in, other=float("-inf")).to(tl.float32)
            m = tl.max(x, 1)
            log_d = tl.log(tl.sum(tl.exp(x - m[:, None]), 1))
            x_target = tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), 1)
            if SMOOTHING:
                x_sum = tl.sum(tl.where(col_in, x, 0.0), 1)
        else:
            m = tl.full([ROWS], float("-inf"), tl.float32)
            denominator = tl.zeros([ROWS], tl.float32)
            x_target = tl.zeros([ROWS], tl.float32)
            x_sum = tl.zeros([ROWS], tl.float32)
            for start in range(0, n_cols, BLOCK_V):
                c = start + cols
                col_in = c[None, :] < n_cols
                x = tl.load(x_rows + c[None, :] * logits_stride_col, mask=col_in, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 1))
                # Until a row shows a finite logit, shift by 0: exp(-inf - 0) adds 0, not nan.
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                denominator = denominator * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), 1)
                m = m_new
                x_target += tl.sum(tl.where(c[None, :] == target[:, None], x, 0.0), 1)
                if SMOOTHING:
                    x_sum += tl.sum(tl.where(col_in, x, 0.0), 1)
            log_d = tl.log(denominator)

        # The target's logit came from the tiles already in registers: no gather, and nothing to
        # re-read after an in-place gradient has overwritten the logits. Subtracting it from the
        # max before adding log_d keeps small losses exact next to large logits (lse ~ 1e4).
        loss = (m - x_target) + log_d
        if SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * ((m - x_sum / n_cols) + log_d)
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_in)

        if WRITE_GRAD:
            if SINGLE_TILE:
                g = _smoothed_softmax_grad(x, m, log_d, target, cols, valid, n_cols, label_smoothing, grad_scale)
                store_in = row_in[:, None] & col_in
                tl.store(g_rows + cols[None, :] * grad_stride_col, g.to(grad_ptr.dtype.element_ty), mask=store_in)
            else:
                # Second sweep over the row, mostly from L2: the softmax needs the whole row's logsumexp.
                for start in range(0, n_cols, BLOCK_V):
                    c = start + cols
                    col_in = c[None, :] < n_cols
                    x = tl.load(x_rows + c[None, :] * logits_stride_col, mask=col_in, other=float("-inf"))
                    g = _smoothed_softmax_grad(
                        x.to(tl.float32), m, log_d, target, c, valid, n_cols, label_smoothing, grad_scale
                    )
                    store_in = row_in[:, None] & col_in
                    tl.store(g_rows + c[None, :] * grad_stride_col, g.to(grad_ptr.dtype.element_ty), mask=store_in)

    # triton.jit hands back an interpreter instead of a compiled kernel when TRITON_INTERPRET=1.
    INTERPRET = not isinstance(_cross_entropy_kernel, triton.runtime.JITFunction)
else:
    INTERPRET = False

# Elements per program tile. On a GPU 8192 fp32 values spread over 8 warps are 32 registers a
# thread; the interpreter pays per program, not per element, so there a tile is much larger.
TILE = 1 << 16 if INTERPRET else 1 << 13


def _launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(rows per program, columns per tile, warps) for an (n_rows, n_cols) problem."""
    block_v = max(16, min(triton.next_power_of_2(n_cols), TILE))
    rows = max(1, min(TILE // block_v, triton.next_power_of_2(n_rows)))
    num_warps = 4 if rows * block_v <= 2048 else 8
    return rows, block_v, num_warps


def _triton_forward(logits, target, grad, ignore_index, label_smoothing, grad_scale):
    """Per-row losses (fp32, 0 where ignored) of 2-D ``logits``; fills ``grad`` when it is given.

    ``ignore_index`` is None when no target equals it.
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    rows, block_v, num_warps = _launch_config(n_rows, n_cols)
    out = grad if grad is not None else logits  # an unused pointer when WRITE_GRAD is off
    _cross_entropy_kernel[(triton.cdiv(n_rows, rows),)](
        logits, logits.stride(0), logits.stride(1),
        target, target.stride(0),
        loss,
        out, out.stride(0), out.stride(1),
        n_rows, n_cols,
        -1 if ignore_index is None else ignore_index,  # no target is negative, so -1 ignores none
        label_smoothing, grad_scale,
        ROWS=rows, BLOCK_V=block_v, SINGLE_TILE=block_v >= n_cols,
        SMOOTHING=label_smoothing > 0, WRITE_GRAD=grad is not None,
        num_warps=num_warps,
    )  # fmt: skip
    return loss


# ---------------------------------------------------------------------------------------------
# PyTorch fallback: the same computation in chunks of rows small enough to stay in cache, with
# in-place ops on the gradient buffer, so memory traffic is about one read of the logits and one
# write of the gradient, and no (N, V) temporary exists besides the gradient.

CHUNK_ELEMENTS = 1 << 20

# Logits within +-EXP_SAFE need no max-shift: exp cannot overflow a row's sum (V * e**64 stays far
# below fp32's maximum) nor underflow a row's largest term (e**-64 is a normal float). Softmax is
# then one exp pass, a row sum and a scale, about half the work of log_softmax followed by exp.
EXP_SAFE = 64.0


def _loss_and_softmax(x, target, label_smoothing, weight, buf):
    """Row losses (rows, 1) of fp32 logits ``x``; leaves softmax(x) * weight in ``buf``.

    ``buf`` may be ``x`` itself. With ``weight`` None the softmax is not finished (no gradient wanted).
    """
    eps = label_smoothing
    low, high = torch.aminmax(x)
    if -EXP_SAFE <= low.item() and high.item() <= EXP_SAFE:
        x_target = x.gather(1, target)  # read before buf overwrites x
        x_mean = x.mean(1, keepdim=True) if eps else None
        denominator = torch.exp(x, out=buf).sum(1, keepdim=True)
        # Per row only, in fp64: lse - x_target in fp32 would round to ulp(lse) ~ 4e-6, coarse
        # next to a confident row's loss; PyTorch's max-shifted form does not lose those digits.
        lse = denominator.double().log_()
        loss = (lse - x_target).float()
        if eps:
            loss = (1 - eps) * loss + eps * (lse - x_mean).float()
        if weight is not None:
            buf.mul_(denominator.reciprocal_().mul_(weight))
    else:
        # Extreme or infinite logits: PyTorch's per-row max-shifted log-softmax.
        log_p = torch.log_softmax(x, 1, out=buf)
        loss = log_p.gather(1, target).neg_()
        if eps:
            loss = (1 - eps) * loss - eps * log_p.mean(1, keepdim=True)
        if weight is not None:
            log_p.exp_().mul_(weight)
    return loss


def _torch_forward(logits, target, grad, ignore_index, label_smoothing, grad_scale):
    """Per-row losses (fp32, 0 where ignored) of 2-D ``logits``; fills ``grad`` when it is given.

    ``ignore_index`` is None when no target equals it, which spares the masking: at V = 27 the
    handful of small ops per call weigh as much as the arithmetic.
    """
    n_rows, n_cols = logits.shape
    eps = label_smoothing
    target = target.long().unsqueeze(1)
    if ignore_index is None:
        ignored = None
        weight = grad_scale
        at_target = torch.full((n_rows, 1), -(1 - eps) * grad_scale, device=logits.device)
    else:
        ignored = target == ignore_index
        target = target.masked_fill(ignored, 0)  # ignored rows read class 0, harmlessly
        weight = (~ignored).to(torch.float32).mul_(grad_scale)  # the reduction's scale, 0 on ignored rows
        at_target = weight * -(1 - eps)
    rows = max(1, CHUNK_ELEMENTS // n_cols)
    # The gradient's own rows are the working buffer for fp32; lower precisions work in the fp32
    # copy that upcasting makes anyway; only fp32 without a gradient needs scratch space.
    direct = grad is not None and grad.dtype == torch.float32
    scratch = None
    if grad is None and logits.dtype == torch.float32:
        scratch = torch.empty(min(rows, n_rows), n_cols, dtype=torch.float32, device=logits.device)
    losses = []
    for x, t, g, w, at, ign in _row_chunks(n_rows, rows, logits, target, grad, weight, at_target, ignored):
        x = x.float()
        buf = g if direct else x if scratch is None else scratch[: len(x)]
        row_loss = _loss_and_softmax(x, t, eps, None if g is None else w, buf)
        if ign is not None:
            row_loss.masked_fill_(ign, 0.0)
        losses.append(row_loss)
        if g is not None:
            # buf holds softmax * w: subtract eps * w / V everywhere and (1 - eps) * w at the target.
            if eps:
                buf.sub_(w * (eps / n_cols))
            buf.scatter_add_(1, t, at)
            if not direct:
                g.copy_(buf)
    return torch.cat(losses).view(-1)


def _row_chunks(n_rows, rows, *values):
    """The values cut into matching chunks of ``rows`` rows; a non-tensor repeats in every chunk."""
    if n_rows <= rows:
        return [values]  # slicing costs about as much as a pass over the data at V = 27
    return zip(*(v.split(rows) if isinstance(v, torch.Tensor) else itertools.repeat(v) for v in values))


# ---------------------------------------------------------------------------------------------
# Autograd glue, shared by both backends.

_FORWARD = {"triton": _triton_forward, "torch": _torch_forward}


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, ignore_index, may_ignore, reduction, label_smoothing, inplace_grad, backend, want_grad
    ):
        n_cols = logits.shape[-1]
        x = logits if logits.dim() == 2 else logits.reshape(-1, n_cols)  # a view whenever strides allow
        t = target if target.dim() == 1 else target.reshape(-1)
        count = None
        if reduction == "mean":
            count = int((t != ignore_index).sum()) if may_ignore else t.numel()
        grad = None
        if want_grad:
            if inplace_grad:
                grad = x
                torch.autograd.graph.increment_version(logits)  # autograd then rejects stale uses of the logits
            else:
                grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        # A mean over no targets has no gradient to scale: every row is ignored and gets zeros.
        grad_scale = 1.0 / count if count else 1.0
        if t.numel():
            rows = _FORWARD[backend](x, t, grad, ignore_index if may_ignore else None, label_smoothing, grad_scale)
        else:
            rows = x.new_zeros(0, dtype=torch.float32)

        ctx.grad = grad if grad is None or logits.dim() == 2 else grad.view(logits.shape)
        ctx.reduction = reduction
        if reduction == "none":
            return rows.view(target.shape).to(logits.dtype)
        total = rows.sum()
        return (total if count is None else total / count).to(logits.dtype)  # 0 / 0: nan, as PyTorch

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # Handing over the buffer (rather than keeping a reference) lets autograd store it as .grad
        # without a copy.
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "kernels.cross_entropy computes its gradient during forward and hands it over on the first "
                "backward; run the forward again instead of backpropagating through it twice"
            )
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(-1))
        elif not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            # On CPU, skipping a multiply by exactly 1 (loss.backward()) saves a pass over (N, V); on
            # CUDA reading the value would cost a device sync, dearer than the pass.
            grad.mul_(grad_output)
        return grad, None, None, None, None, None, None, None, None


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
    the same ``ignore_index``, ``reduction`` and ``label_smoothing``; the loss has the logits'
    dtype and is accumulated in fp32.

    inplace_grad: write the gradient into the logits' storage instead of a new buffer. The
        logits are overwritten by the forward call, so nothing else may read them afterwards.
    backend: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch" (the fused PyTorch
        fallback), or "auto": Triton for CUDA tensors, otherwise the fallback, or for fewer than
        ATEN_BELOW logits (without inplace_grad) F.cross_entropy itself, which is faster there.
        Unset, $MAKEMORE_XENT_BACKEND decides, defaulting to "auto".

    The gradient is computed during forward, so backward runs at most once per forward.
    """
    _check_arguments(logits, target, reduction, label_smoothing)
    backend = _pick_backend(backend, logits, inplace_grad)
    if backend == "aten":
        return _aten_cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
    may_ignore = _check_targets(logits, target, ignore_index)
    # Inside forward grad mode is always off and needs_input_grad ignores it, so decide here.
    want_grad = logits.requires_grad and torch.is_grad_enabled()
    return _CrossEntropy.apply(
        logits, target, ignore_index, may_ignore, reduction, float(label_smoothing), inplace_grad, backend, want_grad
    )


def _aten_cross_entropy(logits, target, ignore_index, reduction, label_smoothing):
    """F.cross_entropy on the (..., V) layout, with this module's error for a bad target."""
    if logits.device.type != "cpu":
        _check_targets(logits, target, ignore_index)  # a bad target would be a device-side assert
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
