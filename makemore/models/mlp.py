"""Bengio et al. 2003's MLP in the lecture's form: every position of the window flattened at once."""

from dataclasses import dataclass, field

import torch

from ..data import IGNORE_INDEX
from ..nn import BatchNorm1d, Embedding, Linear
from .base import LanguageModel, sliding_windows


@dataclass
class MLPConfig:
    vocab_size: int = 27
    block_size: int = field(default=3, metadata={"help": "tokens of context per prediction"})
    n_embd: int = field(default=10, metadata={"help": "embedding width per token"})
    n_hidden: int = field(default=200, metadata={"help": "hidden layer width"})

    def __post_init__(self):
        for name in ("block_size", "n_embd", "n_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class MLP(LanguageModel):
    """Embedding -> flatten the window -> Linear -> BatchNorm1d -> tanh -> Linear, at every window of the sequence."""

    batch_statistics = True

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.receptive_field = config.block_size
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.hidden = Linear(config.n_embd * config.block_size, config.n_hidden, bias=False)
        self.bn = BatchNorm1d(config.n_hidden)
        self.lm_head = Linear(config.n_hidden, config.vocab_size)
        with torch.no_grad():
            self.lm_head.weight *= 0.1  # a less confident start: logits near 0, loss near log(V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        N, L = idx.shape
        T = self.outputs(L)
        x = sliding_windows(self.wte(idx), self.receptive_field)  # (N, T, R, n_embd)
        x = self.hidden(x.reshape(N, T, -1))  # (N, T, n_hidden)
        mask = (
            targets != IGNORE_INDEX if (self.training and targets is not None and T > 1) else None
        )  # padding stays out of the statistics
        logits = self.lm_head(torch.tanh(self.bn(x, mask)))  # (N, T, V)
        return logits, self.loss(logits, targets)
