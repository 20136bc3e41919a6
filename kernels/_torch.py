"""The PyTorch fallback of ``cross_entropy``: the Triton kernels' passes, written with torch ops.

It runs wherever Triton does not (CPU, MPS, macOS, Windows) and is what ``backend="torch"`` forces.
Rows are processed in chunks small enough to stay in cache, so the (N, V) traffic is what the
pass table in kernels/loss.py says, and no (N, V) temporary exists besides the gradient; within a
chunk a few more passes run in cache.

Every function takes 2-D logits (N, V) and 1-D targets; kernels/loss.py reshapes and checks.
``ignore_index`` is None when no target equals it, which spares the masking: at V = 27 the
handful of small ops per call weigh as much as the arithmetic.

Two shortcuts read a value on the host (a chunk's logit range, whether a scale is exactly 1). They
are skipped while torch.compile traces (``torch.compiler.is_compiling()``), where the general
branch runs instead: the graph then has no data-dependent control flow and no host read.
"""

from __future__ import annotations

import itertools

import torch

CHUNK_ELEMENTS = 1 << 20

# Logits within +-EXP_SAFE need no max-shift: exp cannot overflow a row's sum (V * e**64 stays far
# below fp32's maximum) nor underflow a row's largest term (e**-64 is a normal float). Softmax is
# then one exp pass and a row sum, about half the work of a max-shifted one.
EXP_SAFE = 64.0


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64; every other dtype in float32 (both backends)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_weights(target, ignore_index, scale, n_rows):
    """(targets with ignored ones set to class 0, per-row weight (rows, 1): scale, or 0 where ignored)."""
    target = target.long().unsqueeze(1)
    scale = scale.reshape(-1, 1) if scale.dim() else scale.expand(n_rows, 1)
    if ignore_index is None:
        return target, scale
    ignored = target == ignore_index
    # torch.where, not a product: a mean over no targets has scale inf, and its rows must get 0.
    return target.masked_fill(ignored, 0), torch.where(ignored, 0.0, scale)


def _needs_shift(x) -> bool:
    """Whether a chunk has logits beyond +-EXP_SAFE (a host read; always True while compiling)."""
    if torch.compiler.is_compiling():
        return True
    low, high = torch.aminmax(x)
    return not (-EXP_SAFE <= low.item() and high.item() <= EXP_SAFE)


def forward(logits, target, grad, reduction, ignore_index, label_smoothing, want_stats):
    """(loss, aux) of 2-D ``logits``, as kernels/_triton.py's ``forward``: the loss in the logits'
    dtype (one value a row for reduction "none"), ``aux`` each row's shift and denominator and the
    count of targets (2N + 1 values; empty unless ``want_stats``). With ``grad`` the gradient is
    written too, scaled for the reduction.

    The stats keep denominators (the Triton kernel keeps log-denominators): the backward pass then
    divides by the very sum the forward pass took, so a one-class row's gradient is exactly 0.
    """
    n_rows, n_cols = logits.shape
    acc = accumulator(logits.dtype)
    eps = label_smoothing
    ignored = None if ignore_index is None else (target == ignore_index).unsqueeze(1)
    count = None
    if reduction == "mean":  # a tensor, never read on the host; a plain int when nothing can be ignored
        count = n_rows if ignored is None else (~ignored).sum()
    if grad is not None:
        # The reduction's scale; a mean over no targets gives inf, which ignored rows never see.
        scale = torch.ones((), dtype=acc, device=logits.device)
        target, weight = _row_weights(target, ignore_index, scale if count is None else scale / count, n_rows)
    else:
        target = target.long().unsqueeze(1)
        weight = None
        if ignored is not None:
            target = target.masked_fill(ignored, 0)  # ignored rows read class 0, harmlessly
    aux = torch.empty(2 * n_rows + 1, dtype=acc, device=logits.device)
    stats = aux[: 2 * n_rows].view(2, n_rows, 1)
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
        buf = g if direct else x if scratch is None else scratch[: x.shape[0]]
        x_target = x.gather(1, t)  # read before buf may overwrite x
        x_mean = x.mean(1, keepdim=True) if eps else None
        if _needs_shift(x):  # extreme or infinite logits: shift by the row max
            m = x.amax(1, keepdim=True)
            shift = m.masked_fill(m == float("-inf"), 0.0)  # exp(-inf - 0) adds 0, not nan
            denominator = torch.sub(x, shift, out=buf).exp_().sum(1, keepdim=True)
        else:
            shift = None
            denominator = torch.exp(x, out=buf).sum(1, keepdim=True)
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
            loss = loss.masked_fill(ign, 0.0)
        losses.append(loss)
        if g is not None:
            # buf holds exp(x - shift): scale it to softmax * w, then subtract eps * w / V everywhere
            # and (1 - eps) * w at the target.
            _finish_grad(buf, t, w, denominator.reciprocal(), eps, n_cols)
            if not direct:
                g.copy_(buf)
    rows = torch.cat(losses).view(-1)
    if reduction == "none":
        loss = rows
    else:  # 0 / 0: nan, as PyTorch
        loss = rows.sum() if count is None else rows.sum() / count
    if want_stats and count is not None:
        aux[-1] = count
    # A fresh result of an out-of-place op, never a no-op .to() (kernels/loss.py's docstring).
    loss = loss if loss.dtype == logits.dtype else loss.to(logits.dtype)
    return loss, aux if want_stats else aux[:0]


def _finish_grad(buf, t, w, inv_denominator, eps, n_cols):
    """buf = exp(x - shift) becomes (softmax - (1 - eps) * onehot - eps / V) * w, in place."""
    # The target's entry p - (1 - eps) - eps / V cancels: it is computed on its own from the
    # unscaled p, as the kernel does, and written over the rest, so it is exact to fp32 at any w
    # (a one-class row gets 0) without a second pass over the chunk to scale after subtracting.
    at_target = buf.gather(1, t).mul_(inv_denominator).sub_(1 - eps)
    buf.mul_(inv_denominator * w)
    if eps:
        at_target.sub_(eps / n_cols)
        buf.sub_(w * (eps / n_cols))
    buf.scatter_(1, t, at_target.mul_(w))


def backward(logits, target, aux, grad_output, grad, reduction, ignore_index, label_smoothing):
    """Write the gradient of 2-D ``logits`` into ``grad``, times ``grad_output`` (one value, or one
    per row for reduction "none"): one read of the logits, one write. ``aux`` is forward's."""
    n_rows, n_cols = logits.shape
    acc = aux.dtype
    scale = grad_output.to(acc)
    if reduction == "mean":
        scale = scale / aux[-1]  # on the device
    target, weight = _row_weights(target, ignore_index, scale, n_rows)
    shift, denominator = aux[: 2 * n_rows].view(2, n_rows, 1)
    direct = grad.dtype == acc
    rows = max(1, CHUNK_ELEMENTS // n_cols)
    for x, t, g, w, s, d in _row_chunks(n_rows, rows, logits, target, grad, weight, shift, denominator):
        # exp of a half tensor is computed in half (e**11.1 is inf there): upcast first.
        x = x.to(acc)
        buf = g if direct else x
        # The forward pass chose the shift; a zero one is skipped (a host read outside compile).
        if torch.compiler.is_compiling() or s.any():
            torch.sub(x, s, out=buf).exp_()
        else:
            torch.exp(x, out=buf)
        _finish_grad(buf, t, w, d.reciprocal(), label_smoothing, n_cols)
        if not direct:
            g.copy_(buf)


def rescale(grad, grad_output):
    """grad *= grad_output (a 0-d tensor, or one value per row); an exact 1 is skipped outside compile."""
    if not torch.compiler.is_compiling() and bool((grad_output == 1.0).all()):
        return
    scale = grad_output.to(grad.dtype)
    grad.mul_(scale.reshape(-1, 1) if scale.dim() else scale)


def _row_chunks(n_rows, rows, *values):
    """The values cut into matching chunks of ``rows`` rows; a non-tensor repeats in every chunk."""
    if n_rows <= rows:
        return [values]  # slicing costs about as much as a pass over the data at V = 27
    return zip(*(v.split(rows) if isinstance(v, torch.Tensor) else itertools.repeat(v) for v in values))
