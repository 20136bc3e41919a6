"""The hierarchical WaveNet (lecture 5).

The model over a window x[t-B+1 .. t] (B = block_size = 2^L) is a binary tree: level i fuses two
children 2^(i-1) positions apart with f_i(a, b) = tanh(BN_i([a; b] @ W_i)), the left (older)
child first. ``HierarchicalWaveNet`` evaluates the tree per window, as the lecture does.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Tanh
from .base import WindowLM


@dataclass
class WaveNetConfig:
    vocab_size: int = 27
    block_size: int = 8  # a power of two: the tree has log2(block_size) levels
    n_embd: int = 24
    n_hidden: int = 128

    def __post_init__(self):
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"WaveNet block_size must be a power of two >= 2 (the tree halves the window at each level), got {self.block_size}"
            )

    @property
    def n_layers(self) -> int:
        return int(math.log2(self.block_size))


class FuseBlock(nn.Module):
    """One tree level: tanh(BN([left; right] @ W)), W (2·C_in, C_out); rows :C_in act on the left child."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c_in = c_in
        self.linear = Linear(2 * c_in, c_out, bias=False)
        self.bn = BatchNorm1d(c_out)
        self.act = Tanh()

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.linear(pairs)))  # (..., 2·C_in) -> (..., C_out)


class HierarchicalWaveNet(WindowLM):
    """Embedding -> [FlattenConsecutive(2) -> Linear -> BatchNorm1d -> Tanh] x L -> Linear."""

    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.block_size = config.block_size
        self.wte = Embedding(config.vocab_size, config.n_embd)
        widths = [config.n_embd] + [config.n_hidden] * config.n_layers
        self.blocks = nn.ModuleList(FuseBlock(c_in, c_out) for c_in, c_out in zip(widths, widths[1:]))
        self.flatten = FlattenConsecutive(2)
        self.lm_head = Linear(config.n_hidden, config.vocab_size)
        with torch.no_grad():
            self.lm_head.weight *= 0.1  # a less confident start: logits near 0, loss near log(V)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if X.ndim != 2 or X.shape[1] != self.block_size:
            raise ValueError(f"HierarchicalWaveNet takes windows (N, {self.block_size}), got shape {tuple(X.shape)}")
        self.check_tokens(X)
        x = self.wte(X)  # (N, B, n_embd)
        for block in self.blocks:
            x = block(self.flatten(x))  # (N, T, C) -> (N, T/2, n_hidden); the last level squeezes to (N, n_hidden)
        return self.lm_head(x)  # (N, V)
