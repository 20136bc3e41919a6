"""The lecture's layers as torch.nn.Modules.

They keep the lecture's semantics where those differ from torch.nn, on purpose:

- ``Linear.weight`` is (fan_in, fan_out), the transpose of ``torch.nn.Linear``'s, initialised
  ``randn / sqrt(fan_in)`` with a zero bias, so ``x @ weight`` reads like the lecture.
- ``BatchNorm1d`` normalises over every dim but the last: (N, C) and (N, T, C) input, not torch's
  (N, C, L). Training uses the unbiased batch variance for both the normalisation and the running
  estimate (``torch.var``'s default, the lecture's choice; torch.nn normalises with the biased one).
- ``FlattenConsecutive(n)`` squeezes a time dim of 1 away, as the lecture's does.

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
    True, so padding in whole-sequence batches does not leak into them.
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
        rows = x[mask]  # (n_valid, C)
        return rows.mean(0), rows.var(0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"


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
    """(B, T, C) -> (B, T // n, n * C): concatenates n consecutive positions, oldest first."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if T % self.n:
            raise ValueError(f"FlattenConsecutive({self.n}) needs a time dim divisible by {self.n}, got {T}")
        x = x.reshape(B, T // self.n, C * self.n)
        if x.shape[1] == 1:
            x = x.squeeze(1)
        return x

    def extra_repr(self) -> str:
        return f"n={self.n}"


# The lecture's Sequential is torch.nn.Sequential: call each layer on the output of the last.
Sequential = nn.Sequential
