"""The hierarchical WaveNet (lecture 5): one tree, evaluated in several orders.

Over a window x[t-B+1 .. t] (B = block_size = 2^n) the model is a binary tree. Block i (0-based)
fuses two nodes of its input level 2^i positions apart:

    h_(i+1)[s] = f_i(h_i[s - 2^i], h_i[s]),    f_i(left, right) = tanh(BN_i([left; right] @ W_i))

There is one parameter set; ``order`` chooses how the tree is evaluated, and ``_walk`` is the only
place the levels are walked:

- ``"windows"``: every output's window on its own, FlattenConsecutive(2) + Linear per level (the
  lecture's form): B - 1 nodes per output; nodes shared by neighbouring windows are recomputed.
- ``"conv"`` and ``"conv1d"``: whole sequences, block i a causal convolution of kernel 2 and
  dilation 2^i, so each node is computed once and reused by every window that contains it (about
  log2 B nodes per output). ``"conv"`` evaluates it as one matmul over the two shifted views side by
  side, ``"conv1d"`` as F.conv1d with the same weight (tap 0 = W[:C].T meets the left child).
  Levels where no two outputs share a node (2^i > T) are finished per window, which is cheaper.
- cached generation (``prefill`` / ``step``): a ring buffer of the last 2^i nodes of level i
  (base.Rings), so each new token costs one node per level, with eval-mode BatchNorm folded into
  the Linear.

A block sees its two children separately: ``mix`` is linear in [left; right] (so a level can be a
GEMM over pairs or a dilated convolution), ``activate(y, right, mask)`` is pointwise per node.

BatchNorm in training mode: a window batch (T = 1) has no padding, so its statistics are the
lecture's, bit for bit. With T > 1 the statistics cover the nodes that feed an output with a
target (``targets != -100``): right padding stays out. The orders then see different populations
(windows count shared nodes once per window), as the lecture's model and its convolution do.

Under autocast (``--dtype bfloat16``) every Linear and convolution runs in bfloat16 on float32
master weights; BatchNorm takes its statistics and count in float32 and hands tanh float32.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, batch_norm_tanh
from .base import LanguageModel, Rings, left_pad, matmul_dtype, sliding_windows

ORDERS = ("conv", "conv1d", "windows")


@dataclass
class WaveNetConfig:
    vocab_size: int = 27
    block_size: int = field(default=8, metadata={"help": "tokens of context per prediction, a power of two"})
    n_embd: int = field(default=24, metadata={"help": "embedding width per token"})
    n_hidden: int = field(default=128, metadata={"help": "width of every level of the tree"})
    order: str = field(
        default="conv",
        metadata={
            "help": "evaluation order: conv (shifted-view matmuls), conv1d (F.conv1d) "
            "or windows (per window, the lecture's form)",
            "choices": ORDERS,
        },
    )
    fused: bool = field(
        default=False,
        metadata={"help": "BatchNorm + tanh as one autograd function (faster; same math, not the notebook's rounding)"},
    )

    def __post_init__(self):
        for name in ("n_embd", "n_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ValueError(
                "--block-size must be a power of two >= 2 for the wavenet (the tree halves the window at each level), "
                f"got {self.block_size}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")

    @property
    def n_layers(self) -> int:
        return self.block_size.bit_length() - 1


class TreeBlock(nn.Module):
    """One level of the lecture's tree: tanh(BN([left; right] @ W)), W (2·C_in, C_out),
    rows :C_in for the left child."""

    def __init__(self, c_in: int, c_out: int, fused: bool = False):
        super().__init__()
        self.c_in = c_in
        self.fused = fused
        self.linear = Linear(2 * c_in, c_out, bias=False)  # no bias: BatchNorm's shift subsumes it
        self.bn = BatchNorm1d(c_out)

    def mix(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.linear(pairs)  # (..., 2·C_in) -> (..., C_out)

    def conv_weight(self) -> torch.Tensor:
        """The Linear as a Conv1d weight (C_out, C_in, 2): tap 0 meets the left child, tap 1 the right."""
        return self.linear.weight.view(2, self.c_in, -1).permute(2, 1, 0)

    def activate(self, y: torch.Tensor, right: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.fused:
            return batch_norm_tanh(y, self.bn, mask)
        return torch.tanh(self.bn(y, mask))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval mode as one affine map before the tanh: (W_left, W_right, bias), BatchNorm folded into the Linear.

        tanh(BN(x @ W)) = tanh(x @ (W * s) + (beta - mean * s)), s = gamma / sqrt(var + eps):
        the same function, rounded differently, for the cached steps of generation.
        """
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = self.linear.weight * scale  # (2·C_in, C_out)
        return weight[: self.c_in], weight[self.c_in :], bn.bias - bn.running_mean * scale

    def step(self, left: torch.Tensor, right: torch.Tensor, folded) -> torch.Tensor:
        """One node from its two children (N, C_in) each, with ``folded()``'s map: two GEMMs, no concatenation."""
        w_left, w_right, bias = folded
        dtype = matmul_dtype(left)  # under autocast addmm_ is not cast for us: operands in one dtype
        return torch.tanh(
            torch.addmm(bias.to(dtype), left.to(dtype), w_left.to(dtype)).addmm_(right.to(dtype), w_right.to(dtype))
        )


class WaveNet(LanguageModel):
    """Embedding -> n_layers TreeBlocks -> Linear, evaluated in the config's ``order`` (see the module docstring)."""

    batch_statistics = True

    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.receptive_field = self.block_size = config.block_size
        self.order = config.order
        self.wte = Embedding(config.vocab_size, config.n_embd)
        widths = [config.n_embd] + [config.n_hidden] * config.n_layers
        self.blocks = nn.ModuleList(TreeBlock(c_in, c_out, config.fused) for c_in, c_out in zip(widths, widths[1:]))
        self.flatten = FlattenConsecutive(2, squeeze=False)
        self.lm_head = Linear(config.n_hidden, config.vocab_size)
        with torch.no_grad():
            self.lm_head.weight *= 0.1  # a less confident start: logits near 0, loss near log(V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = self.outputs(idx.shape[1])
        valid = targets != IGNORE_INDEX if (self.training and targets is not None and T > 1) else None
        conv_levels = 0 if self.order == "windows" else min(len(self.blocks), T.bit_length() - 1)
        x = self._walk(self.wte(idx), T, valid, conv_levels)  # (N, T, n_hidden)
        logits = self.lm_head(x)  # (N, T, V)
        return logits, self.loss(logits, targets)

    def _walk(
        self, x: torch.Tensor, T: int, valid: torch.Tensor | None, conv_levels: int, record: list | None = None
    ) -> torch.Tensor:
        """The tree, level by level: x (N, L, n_embd) level-0 nodes -> (N, T, n_hidden) top nodes.

        The first ``conv_levels`` levels run over the whole sequence as dilated convolutions; the
        rest per output window. ``valid`` (N, T) marks the outputs whose nodes count in BatchNorm's
        statistics; ``record`` collects each convolution level's input, for ``prefill``.
        """
        N = x.shape[0]
        masks = self._node_masks(valid) if valid is not None and conv_levels else None
        for i, block in enumerate(self.blocks):
            d = 2**i
            if i == conv_levels and T > 1:  # from here on per window: (N, L - d + 1, C) -> (N·T, B / d, C)
                x = sliding_windows(x, self.block_size - d + 1)[:, :, ::d].reshape(N * T, self.block_size // d, -1)
            if i < conv_levels:
                if record is not None:
                    record.append(x[:, -d:])
                y, right = self._dilated_mix(block, x, d), x[:, d:]  # (N, L - 2d + 1, C_out): node s fuses s and s + d
                mask = None if masks is None else masks[i]
            else:
                y, right = block.mix(self.flatten(x)), x[:, 1::2]  # (N·T, K/2, C_out): neighbours within each window
                mask = None if valid is None else valid.reshape(-1, 1).expand(y.shape[:-1])
            x = block.activate(y, right, mask)
        return x.view(N, T, -1)

    def _dilated_mix(self, block: TreeBlock, x: torch.Tensor, d: int) -> torch.Tensor:
        if self.order == "conv1d":
            return F.conv1d(x.transpose(1, 2), block.conv_weight(), dilation=d).transpose(1, 2)
        x = x.to(matmul_dtype(x))  # cast before the concatenation (autocast would cast the twice-as-large result)
        return block.mix(torch.cat([x[:, :-d], x[:, d:]], dim=-1))  # the two shifted views side by side: one GEMM

    def _node_masks(self, valid: torch.Tensor) -> list[torch.Tensor]:
        """For each block i: which of its output nodes (N, L - 2^(i+1) + 1) feed a valid output, derived top down.

        Block i's node s fuses its input's nodes s and s + 2^i, so block i-1's node s is needed
        where block i's node s or s - 2^i is.
        """
        masks = [valid]  # the top block's nodes are the outputs
        for i in range(len(self.blocks) - 1, 0, -1):
            pad = valid.new_zeros(valid.shape[0], 2**i)
            masks.append(torch.cat([masks[-1], pad], 1) | torch.cat([pad, masks[-1]], 1))
        return masks[::-1]

    # Cached generation (fast WaveNet generation, Paine et al. 2016): block i needs its input at s
    # and s - 2^i, so a ring of the input level's last 2^i nodes (base.Rings) makes each new token
    # cost one node per level.

    def prefill(self, idx: torch.Tensor):
        if self.training:
            raise ValueError("cached generation uses BatchNorm's running statistics: call model.eval() first")
        window = left_pad(idx, self.block_size)[:, -self.block_size :]  # (N, B): positions 0 .. B-1
        nodes: list[torch.Tensor] = []
        x = self._walk(self.wte(window), 1, None, len(self.blocks), record=nodes)  # every level at every position
        folded = [block.folded() for block in self.blocks]
        return self.lm_head(x[:, -1]), Rings(nodes, fixed=folded)

    def step(self, token: torch.Tensor, cache: Rings):
        x = self.wte(token)  # (N, n_embd): the new position of level 0
        for i, (block, folded) in enumerate(zip(self.blocks, cache.fixed)):
            x = block.step(cache.swap(i, x), x, folded)  # its left child: the node 2^i positions back
        cache.advance()
        return self.lm_head(x), cache
