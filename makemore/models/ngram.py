"""Count-based n-gram models and the one-layer neural bigram (lecture 1)."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from .base import LanguageModel, sliding_windows

MAX_COUNTS = 1 << 26  # count-table entries: 256 MiB of float32 counts (27^5 fits, 27^6 does not)


@dataclass
class NGramConfig:
    vocab_size: int = 27
    n: int = field(default=2, metadata={"help": "predict from the previous n - 1 tokens (2: bigram, 3: trigram)"})
    smoothing: float = field(default=1.0, metadata={"help": "add-k smoothing of the counts"})

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"--n must be >= 2 (a bigram or longer), got {self.n}")
        if not 0 <= self.smoothing < float("inf"):  # nan and inf fail too
            raise ValueError(f"--smoothing must be a finite number >= 0, got {self.smoothing}")
        # The count table has vocab_size ** n entries (and fit's bincount as many int64s): past the
        # bound it would not fit in memory. min() keeps the power small for an absurd --n.
        entries = self.vocab_size ** min(self.n, 64)
        if entries > MAX_COUNTS:
            raise ValueError(
                f"--n {self.n} needs a count table of {self.vocab_size}^{self.n} entries "
                f"for a vocabulary of {self.vocab_size}, "
                f"above the limit of {MAX_COUNTS:,} (256 MiB of counts); use a smaller --n"
            )


class NGram(LanguageModel):
    """P(next | previous n-1 tokens) from counts with add-k smoothing; ``fit`` replaces training.

    Logits are log-probabilities.
    """

    fitted = True

    def __init__(self, config: NGramConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.receptive_field = config.n - 1
        self.register_buffer("counts", torch.zeros(config.vocab_size**self.receptive_field, config.vocab_size))

    def _context_index(self, idx: torch.Tensor) -> torch.Tensor:
        # Mixed-radix number of each window's tokens: one row of the count table each.
        windows = sliding_windows(idx, self.receptive_field)  # (N, T, R)
        index = torch.zeros(windows.shape[:2], dtype=torch.int64, device=idx.device)
        for column in windows.unbind(-1):
            index = index * self.vocab_size + column
        return index  # (N, T)

    @torch.no_grad()
    def fit(self, batches) -> "NGram":
        """Count every (context, next token) pair of ``batches`` (an iterable of Batch)."""
        self.counts.zero_()
        for batch in batches:
            index, targets = self._context_index(batch.idx).flatten(), batch.targets.flatten()
            keep = targets != IGNORE_INDEX
            flat = index[keep] * self.vocab_size + targets[keep]
            self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)
        return self

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        self.outputs(idx.shape[1])
        counts = self.counts[self._context_index(idx)] + self.config.smoothing  # (N, T, V)
        logits = counts.log() - counts.sum(-1, keepdim=True).log()
        return logits, self.loss(logits, targets)


@dataclass
class NeuralBigramConfig:
    vocab_size: int = 27


class NeuralBigram(LanguageModel):
    """The bigram as a network: logits = W[previous token], i.e. one_hot(x) @ W without the one-hot."""

    fitted = True

    def __init__(self, config: NeuralBigramConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.receptive_field = 1
        self.weight = nn.Parameter(torch.randn(config.vocab_size, config.vocab_size))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        self.outputs(idx.shape[1])
        logits = self.weight[idx]  # (N, L, V): R = 1, so T = L
        return logits, self.loss(logits, targets)

    def fit(self, batches, *, steps: int = 200, lr: float = 50.0, weight_decay: float = 0.01) -> "NeuralBigram":
        """The lecture's full-batch gradient descent over every pair of ``batches``,
        with its (W**2).mean() regulariser."""
        batches = list(batches)
        prev = torch.cat(
            [b.idx[:, -b.targets.shape[1] :].flatten() for b in batches]
        )  # R = 1: the token before each target
        targets = torch.cat([b.targets.flatten() for b in batches])
        keep = targets != IGNORE_INDEX
        prev, targets = prev[keep], targets[keep]
        for _ in range(steps):
            loss = F.cross_entropy(self.weight[prev], targets) + weight_decay * (self.weight**2).mean()
            self.weight.grad = None
            loss.backward()
            with torch.no_grad():
                self.weight -= lr * self.weight.grad
        return self
