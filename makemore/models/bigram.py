"""Count-based n-gram models and the one-layer neural bigram (lecture 1)."""

import torch
import torch.nn.functional as F
from torch import nn

from .base import WindowLM


class NGram(WindowLM):
    """P(next | previous n-1 tokens) from counts with add-k smoothing; ``fit`` replaces training.

    ``order=2`` is the lecture's bigram, ``order=3`` the trigram. Logits are log-probabilities.
    """

    def __init__(self, vocab_size: int, order: int = 2, smoothing: float = 1.0):
        super().__init__()
        if order < 2:
            raise ValueError(f"an n-gram needs order >= 2, got {order}")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.vocab_size = vocab_size
        self.block_size = order - 1
        self.smoothing = smoothing
        self.register_buffer("counts", torch.zeros(vocab_size**self.block_size, vocab_size))

    def _context_index(self, X: torch.Tensor) -> torch.Tensor:
        # Mixed-radix number of the last block_size tokens: one row of the count table each.
        index = torch.zeros(X.shape[0], dtype=torch.int64, device=X.device)
        for column in X[:, -self.block_size :].unbind(1):
            index = index * self.vocab_size + column
        return index

    @torch.no_grad()
    def fit(self, X: torch.Tensor, Y: torch.Tensor) -> "NGram":
        flat = self._context_index(X) * self.vocab_size + Y
        self.counts.copy_(torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts).float())
        return self

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.check_tokens(X)
        counts = self.counts[self._context_index(X)] + self.smoothing  # (N, V)
        return counts.log() - counts.sum(1, keepdim=True).log()


class NeuralBigram(WindowLM):
    """The bigram as a network: logits = W[previous token], i.e. one_hot(x) @ W without the one-hot."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = 1
        self.weight = nn.Parameter(torch.randn(vocab_size, vocab_size))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.check_tokens(X)
        return self.weight[X[:, -1]]

    def fit(self, X: torch.Tensor, Y: torch.Tensor, *, steps: int = 200, lr: float = 50.0, weight_decay: float = 0.01) -> "NeuralBigram":
        """The lecture's full-batch gradient descent, with its (W**2).mean() regulariser."""
        for _ in range(steps):
            loss = F.cross_entropy(self(X), Y) + weight_decay * (self.weight**2).mean()
            self.weight.grad = None
            loss.backward()
            with torch.no_grad():
                self.weight -= lr * self.weight.grad
        return self
