"""``cross_entropy``: input checks, the choice of path, and the autograd Function over the two backends.

``cross_entropy`` has ``torch.nn.functional.cross_entropy``'s semantics for class-index targets,
with the classes in the LAST dimension: logits (..., V) and targets (...). (F.cross_entropy
wants (N, C, d1, ...); a (N, C, C) tensor is valid for both and gives different losses, with no
error, so move the class dimension last before calling this.)

Paths: the Triton kernels (kernels/_triton.py) for CUDA tensors, the PyTorch fallback
(kernels/_torch.py) everywhere else, and F.cross_entropy itself ("aten") for problems too small
for the fusion to pay for its Python.

Memory traffic, in passes over the (N, V) logits-sized data (one pass = every element read
once, or written once), and launches of the Triton path, counted from the kernels:

    mode                                    forward    backward             fwd + bwd   launches
    default                                 1 read     1 read + 1 write     3           2
    inplace_grad=True, V <= BLOCK_V_MAX (*) 1 read     0 (incoming grad 1)  2           2
      (gradient written during forward      + 1 write  2 (otherwise)        4
       into the logits' storage)
    inplace_grad=True, V >  BLOCK_V_MAX (*) 2 reads    as above             3 (5 if     2
                                            + 1 write                        rescaled)
    no gradient wanted                      1 read     -                    1           1

    (*) BLOCK_V_MAX = 8192 classes (4096 for float64)

- Default: forward reads each row once and keeps the row's max and log-denominator, two numbers
  a row, and the count of targets. Backward reads the logits once more and writes the gradient,
  already multiplied by the incoming gradient (per row for reduction="none") and the mean's
  1/count, both read on the device by the kernel. Nothing (N, V)-sized is held between the two
  calls except the logits themselves (F.cross_entropy keeps its log-softmax).
- ``inplace_grad=True``: forward writes d(loss)/d(logits), scaled for the reduction, over the
  logits (for the mean, its programs count the targets first, together). Backward launches one
  kernel whose programs read the incoming gradient on the device and touch the gradient only
  where it is not exactly 1, so ``loss.backward()`` costs no pass over it and no host
  synchronisation.
- The reductions happen in the forward kernel (kernels/_triton.py): no launch sums, counts,
  divides or fills around the kernels, in either mode, whatever the reduction.

No host reads on the hot path. The argument checks look at shapes, dtypes and devices only. On
CUDA a target out of range fails a device-side assert inside the forward kernel (as
F.cross_entropy's own CUDA kernels do: it stops the process's CUDA context at the next
synchronisation), and its row's loss is nan. On CPU a bad target is a ValueError naming its
position (reading CPU values costs no sync), except inside torch.compile, where the fallback
runs ``torch._assert_async`` and the interpreted kernel raises through its launcher.
``cross_entropy`` traces with ``torch.compile(fullgraph=True)``: the aten path and the fallback
as torch ops, the Triton launches as custom ops (kernels/_triton.py).

The autograd Function returns only fresh results of out-of-place ops (a view of one for
reduction="none"): never a tensor an in-place op produced, nor a no-op ``.to()`` of another
traced node. Dynamo in torch 2.11 returns every intermediate of a traced Function as an extra
output, and where the returned tensor is one of them autograd hands its gradient to the wrong
slot: it arrives as zeros (pytorch/pytorch#180642).

Vectorised loads: Triton emits 16-byte loads only where it can prove an address 16-byte aligned
and the load mask constant over each 16 bytes. Contiguous rows whose V is not a multiple of 16
(27, 65, 50,257 ...) do not start on 16-byte boundaries; up to a few thousand classes the kernels
load them as flat blocks of whole rows (kernels/_triton.py), which are aligned. Wider such rows
(50,257) load 4 or 2 bytes at a time; a warp's neighbouring loads still coalesce into full
32-byte sectors, so the DRAM traffic is the same and only the instruction count grows. A
vocabulary padded to a multiple of 16 or 64 classes (GPT-2's 50,304) gives aligned rows.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _torch
from ._torch import accumulator

try:
    from . import _triton
except ImportError:  # Triton ships for Linux only; the fallback covers the rest.
    _triton = None

__all__ = ["cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "MAKEMORE_XENT_BACKEND"

# Below this many logits, "auto" on CPU hands the problem to F.cross_entropy: a Python
# autograd.Function costs more per call than fusing saves, and up to a few million logits
# F.cross_entropy's vectorised log-softmax, its two (N, V) buffers in cache, is faster still.
# bench/bench_cross_entropy.py measures both sides (docs/kernel.md has the figures).
ATEN_BELOW = 1 << 22

# The same line on CUDA: below it F.cross_entropy is faster per call. Set from the kernel-time
# crossover that bench/gpu.py's cross-entropy step reports (docs/kernel.md has the figures).
CUDA_ATEN_BELOW = 1 << 23


# --- checks ---------------------------------------------------------------------------------------


def _check_arguments(logits, target, reduction, label_smoothing) -> None:
    """Raise on arguments F.cross_entropy would refuse; reads shapes, dtypes and devices, no values."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"logits and target must be tensors, got {type(logits).__name__} and {type(target).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(
            f"logits must be a floating tensor of shape (..., V), got {logits.dtype} {tuple(logits.shape)}"
        )
    if logits.shape[-1] == 0:  # every target is out of range, or all are ignored: 0 / 0 classes, in every backend
        raise ValueError(
            f"logits must have at least one class (V >= 1 in the last dimension), got shape {tuple(logits.shape)}"
        )
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

    Reads the targets on the host: for CPU tensors (and other non-CUDA devices) outside torch.compile.
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
    """The device form of _check_targets: an assert the host never waits for (CUDA, and compiled graphs)."""
    in_range = ((target >= 0) & (target < n_classes)) | (target == ignore_index)
    torch._assert_async(
        in_range.all(),
        f"cross_entropy: a target is out of range: class indices must be in [0, {n_classes}) or equal "
        f"ignore_index={ignore_index}",
    )


def _host_checks(logits) -> bool:
    """Whether the targets are checked by reading them (CPU and the like, eager); else a device assert."""
    return logits.device.type != "cuda" and not torch.compiler.is_compiling()


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


# --- the path -------------------------------------------------------------------------------------


def pick_backend(backend: str | None, device: torch.device, numel: int, inplace_grad: bool) -> str:
    """The path to run: "triton", "torch" (the fused fallback) or "aten" (F.cross_entropy itself)."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or unset), got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton is not None:
            return "aten" if numel < CUDA_ATEN_BELOW and not inplace_grad else "triton"
        return "aten" if numel < ATEN_BELOW and not inplace_grad else "torch"
    if backend == "triton":
        if _triton is None:
            raise RuntimeError("backend='triton' needs the triton package, which could not be imported")
        if device.type != "cuda" and not _triton.INTERPRET:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device.type} ones; to run the kernel on CPU "
                "tensors set TRITON_INTERPRET=1 before makemore.kernels is imported"
            )
    return backend


# The backends' functions as called outside torch.compile: direct launches, the least Python per call.
_FORWARD = {"torch": _torch.forward}
_BACKWARD = {"torch": _torch.backward}
_RESCALE = {"torch": _torch.rescale}
if _triton is not None:
    _FORWARD["triton"], _BACKWARD["triton"], _RESCALE["triton"] = _triton.forward, _triton.backward, _triton.rescale


def _forward(backend, x, t, grad, reduction, ignore_index, label_smoothing, want_stats):
    """(loss, aux) from the backend's forward; while torch.compile traces, Triton's launch as a custom op."""
    if backend == "triton" and torch.compiler.is_compiling():
        ignore_index = -100 if ignore_index is None else ignore_index
        if grad is None:
            return _triton.forward_op(x, t, reduction, ignore_index, label_smoothing, want_stats)
        return _triton.forward_inplace_op(x, t, reduction, ignore_index, label_smoothing), None
    return _FORWARD[backend](x, t, grad, reduction, ignore_index, label_smoothing, want_stats)


def _backward(backend, x, t, aux, grad_output, reduction, ignore_index, label_smoothing):
    """The gradient of 2-D ``x``, a new tensor (the same way while compiling)."""
    if backend == "triton" and torch.compiler.is_compiling():
        ignore_index = -100 if ignore_index is None else ignore_index
        return _triton.backward_op(x, t, aux, grad_output, reduction, ignore_index, label_smoothing)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _BACKWARD[backend](x, t, aux, grad_output, grad, reduction, ignore_index, label_smoothing)
    return grad


def _rescale(backend, grad, grad_output):
    """grad *= grad_output where that is not 1 (in place)."""
    if backend == "triton" and torch.compiler.is_compiling():
        return _triton.rescale_op(grad, grad_output)
    return _RESCALE[backend](grad, grad_output)


# --- autograd -------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, ignore_index, may_ignore, reduction, label_smoothing, inplace_grad, backend, want_grad
    ):
        n_cols = logits.shape[-1]
        x = logits if logits.dim() == 2 else logits.reshape(-1, n_cols)  # a view whenever strides allow
        t = target if target.dim() == 1 else target.reshape(-1)
        fused = want_grad and inplace_grad
        if fused:
            if _shares_memory(x):  # rows would write their gradients over each other's
                raise ValueError(
                    "inplace_grad=True writes the gradient over the logits, but some of their elements share memory "
                    "(an expanded tensor?); pass logits.contiguous() or leave inplace_grad off"
                )
            torch.autograd.graph.increment_version(logits)  # autograd then rejects stale uses of the logits
        ignored = ignore_index if may_ignore else None
        want_stats = want_grad and not fused
        if t.numel():
            loss, aux = _forward(backend, x, t, x if fused else None, reduction, ignored, label_smoothing, want_stats)
        else:  # no rows: nothing to launch; a mean over no targets is nan, as PyTorch's
            empty = {"none": 0, "sum": 0.0, "mean": float("nan")}[reduction]
            loss = x.new_zeros(0) if reduction == "none" else x.new_full((), empty)
            aux = x.new_empty(0, dtype=accumulator(x.dtype))

        ctx.fused, ctx.reduction, ctx.backend = fused, reduction, backend
        ctx.ignore_index, ctx.label_smoothing, ctx.shape = ignored, label_smoothing, logits.shape
        if fused:
            ctx.grad = x if logits.dim() == 2 else x.view(logits.shape)
        elif want_grad:
            ctx.save_for_backward(x, t, aux)
        # The loss is the backend's own new tensor (a view of it for "none"), never a no-op .to() of
        # another: see the module docstring.
        return loss.view(target.shape) if reduction == "none" else loss

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
        # The kernels read the incoming gradient (and the mean's count) on the device, in its own dtype.
        grad_output = grad_output.reshape(-1) if ctx.reduction == "none" else grad_output
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
                _rescale(ctx.backend, grad if grad.dim() == 2 else grad.view(-1, grad.shape[-1]), grad_output)
            return grad, None, None, None, None, None, None, None, None
        x, t, aux = ctx.saved_tensors
        if t.numel():
            grad = _backward(ctx.backend, x, t, aux, grad_output, ctx.reduction, ctx.ignore_index, ctx.label_smoothing)
        else:
            grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return grad.view(ctx.shape), None, None, None, None, None, None, None, None


# --- the public function --------------------------------------------------------------------------


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
    backend = pick_backend(backend, logits.device, logits.numel(), inplace_grad)
    if backend == "aten":
        return _aten_cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
    if _host_checks(logits):
        may_ignore = _check_targets(logits, target, ignore_index)
    else:
        may_ignore = True
        if backend != "triton":  # the Triton kernel asserts on the targets itself, in one launch
            _assert_targets_on_device(target, logits.shape[-1], ignore_index)
    # Inside forward grad mode is always off and needs_input_grad ignores it, so decide here.
    want_grad = logits.requires_grad and torch.is_grad_enabled()
    return _CrossEntropy.apply(
        logits, target, ignore_index, may_ignore, reduction, float(label_smoothing), inplace_grad, backend, want_grad
    )


def _aten_cross_entropy(logits, target, ignore_index, reduction, label_smoothing):
    """F.cross_entropy on the (..., V) layout, with this module's error for a bad target on CPU.

    On CUDA F.cross_entropy asserts on a bad target on the device itself, without a sync; on CPU
    it raises an IndexError, which becomes the ValueError naming the target's position.
    """
    if logits.device.type not in ("cpu", "cuda") and _host_checks(logits):
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
