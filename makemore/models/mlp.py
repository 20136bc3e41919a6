"""Bengio et al. 2003's MLP in the lecture's form: every position of the window flattened at once."""

from dataclasses import dataclass

import torch

from ..nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh
from .base import WindowLM


@dataclass
class MLPConfig:
    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200


class MLP(WindowLM):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.block_size = config.block_size
        self.net = Sequential(
            Embedding(config.vocab_size, config.n_embd),
            FlattenConsecutive(config.block_size),
            Linear(config.n_embd * config.block_size, config.n_hidden, bias=False),
            BatchNorm1d(config.n_hidden),
            Tanh(),
            Linear(config.n_hidden, config.vocab_size),
        )
        with torch.no_grad():
            self.net[-1].weight *= 0.1  # a less confident start: logits near 0, loss near log(V)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.check_tokens(X)
        return self.net(X)  # (N, V)
