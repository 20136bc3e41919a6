"""The lecture's layers as torch.nn.Modules.

They keep the lecture's semantics where those differ from torch.nn, on purpose:

- ``Linear.weight`` is (fan_in, fan_out), the transpose of ``torch.nn.Linear``'s, initialised
  ``randn / sqrt(fan_in)`` with a zero bias, so ``x @ weight`` reads like the lecture.
- ``BatchNorm1d`` normalises over every dim but the last: (N, C) and (N, T, C) input, not torch's
  (N, C, L). Training uses the unbiased batch variance for both the normalisation and the running
  estimate (``torch.var``'s default, the lecture's choice; torch.nn normalises with the biased one).
- ``FlattenConsecutive(n)`` squeezes a time dim of 1 away, as the lecture's does.

``batch_norm_tanh`` is ``tanh(BatchNorm1d(x))`` with the same statistics as one autograd Function
and a hand-written backward: about 5 passes over the activations forward and 6 backward where
autograd's composition of the lecture's ops takes about 20. Same math, different rounding, so
the ``lecture`` recipe keeps the composed ops (bit-identical to the notebook).

Parameters are created in the lecture's order with the lecture's ``torch.randn`` calls, so the
same ``torch.manual_seed`` gives the same initial weights as the lecture's notebook.
"""

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out) / fan_in**0.5)
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        fan_in, fan_out = self.weight.shape
        return f"fan_in={fan_in}, fan_out={fan_out}, bias={self.bias is not None}"


class BatchNorm1d(nn.Module):
    """Batch normalisation over every dim but the last (channels last).

    ``mask`` (x.shape[:-1], bool) restricts the training statistics to the positions where it is
    True, so padding in whole-sequence batches does not leak into them. The masked statistics are
    sums weighted by the mask, not boolean indexing: no value is read back to the host.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = _at_least_float32(x)
        if self.training:
            mean, var = self._batch_stats(x, mask)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.copy_((1 - m) * self.running_mean + m * mean)
                self.running_var.copy_((1 - m) * self.running_var + m * var)
        else:
            mean, var = self.running_mean, self.running_var
        xhat = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight * xhat + self.bias

    @staticmethod
    def _batch_stats(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            dims = tuple(range(x.ndim - 1))
            return x.mean(dims), x.var(dims)
        w = mask.to(x.dtype).unsqueeze(-1)  # (..., 1)
        dims = tuple(range(x.ndim - 1))
        n = w.sum()
        mean = (x * w).sum(dims) / n
        var = ((x - mean).square() * w).sum(dims) / (n - 1).clamp_min(1)  # unbiased, as torch.var
        return mean, var

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Statistics in float32 when autocast hands BatchNorm bfloat16 or float16 activations."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def batch_norm_tanh(x: torch.Tensor, bn: BatchNorm1d, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.tanh(bn(x, mask))``, fused: the same statistics and running-average updates."""
    if not bn.training:
        return torch.tanh(bn(x))
    shape = x.shape
    rows = _at_least_float32(x).reshape(-1, shape[-1])
    weights = (
        None if mask is None else mask.reshape(-1, 1).to(rows.dtype)
    )  # float32 at least: a bfloat16 count is off by units from 256 on
    return _BatchNormTanh.apply(
        rows, weights, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps
    ).view(shape)


class _BatchNormTanh(torch.autograd.Function):
    """out = tanh(xhat * gamma + beta), xhat = (x - mean) / sqrt(var + eps), over the rows of x (M, C).

    mean and the unbiased var are taken over the rows with weight 1 (all rows without weights).
    Backward, with dz = dout * (1 - out^2), n the counted rows and w the weights:
        dgamma = sum(dz * xhat), dbeta = sum(dz),
        dx = gamma * rstd * (dz - w * (dbeta / n + xhat * dgamma / (n - 1))).
    tanh is computed as 2 * sigmoid(2z) - 1: PyTorch's CPU tanh is several times slower than its
    sigmoid, and the two agree to float32 rounding. x and the weights are float32 (or float64) and
    autocast is off inside, so the weighted sums (GEMVs) and the count stay in x's dtype. Without
    weights n is the Python int M: no tensor made from a host value (a copy and a sync on CUDA).
    """

    @staticmethod
    def forward(ctx, x, weights, gamma, beta, running_mean, running_var, momentum, eps):
        with torch.autocast(x.device.type, enabled=False):
            if weights is None:
                n = x.shape[0]
                mean = x.mean(0)
                xc = x - mean  # (M, C)
                var = xc.square().sum(0) / max(n - 1, 1)
            else:
                n = weights.sum()
                mean = (weights.T @ x).squeeze(0) / n
                xc = x - mean
                var = (weights.T @ xc.square()).squeeze(0) / (n - 1).clamp_min(1)
            rstd = (var + eps).rsqrt()
            xhat = xc.mul_(rstd)
            # 2-D operands: a faster kernel than 1-D broadcasting. The in-place result is returned as a view, a tensor
            # of its own without a copy (docs/models.md#autograd-functions).
            out = torch.addcmul((2 * beta)[None], xhat, (2 * gamma)[None]).sigmoid_().mul_(2).sub_(1).view_as(xhat)
            with torch.no_grad():  # the lecture's running averages
                running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
                running_var.copy_((1 - momentum) * running_var + momentum * var)
        ctx.rows = n if weights is None else None
        ctx.save_for_backward(xhat, out, weights, gamma, rstd, None if weights is None else n)
        return out

    @staticmethod
    def backward(ctx, dout):
        xhat, out, weights, gamma, rstd, n = ctx.saved_tensors
        n = ctx.rows if weights is None else n
        dz = torch.ops.aten.tanh_backward(dout, out)
        dbeta = dz.sum(0)
        dgamma = (dz * xhat).sum(0)
        scale = (gamma * rstd)[None]
        if weights is None:
            dx = torch.addcmul(dz, xhat, (-dgamma / max(n - 1, 1))[None])
            dx = torch.addcmul(-(dbeta / n) * scale, dx, scale)
        else:
            stats = torch.addcmul((dbeta / n)[None], xhat, (dgamma / (n - 1).clamp_min(1))[None]).mul_(weights)
            dx = (dz - stats).mul_(scale)
        return dx, None, dgamma, dbeta, None, None, None, None


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx]


class FlattenConsecutive(nn.Module):
    """(B, T, C) -> (B, T // n, n * C): concatenates n consecutive positions, oldest first.

    A time dim of 1 is squeezed away, as in the lecture, unless ``squeeze=False``.
    """

    def __init__(self, n: int, squeeze: bool = True):
        super().__init__()
        self.n = n
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if T % self.n:
            raise ValueError(f"FlattenConsecutive({self.n}) needs a time dim divisible by {self.n}, got {T}")
        x = x.reshape(B, T // self.n, C * self.n)
        if self.squeeze and x.shape[1] == 1:
            x = x.squeeze(1)
        return x

    def extra_repr(self) -> str:
        return f"n={self.n}"


# The lecture's Sequential is torch.nn.Sequential: call each layer on the output of the last.
Sequential = nn.Sequential
