"""The hierarchical WaveNet (lecture 5), per window and as a dilated causal convolution.

The model over a window x[t-B+1 .. t] (B = block_size = 2^n) is a binary tree: level i fuses two
children 2^(i-1) positions apart with f_i(a, b) = tanh(BN_i([a; b] @ W_i)), the left (older)
child first. ``HierarchicalWaveNet`` evaluates the tree per window, as the lecture does.
``ConvWaveNet`` has the same parameters and layer code but evaluates whole sequences: level i is
a causal convolution of kernel size 2 and dilation 2^(i-1), so a node shared by several windows
is computed once. It also generates incrementally, one node per level for each new token.
"""

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Tanh
from .base import WindowLM, left_pad, sample_next


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
    """One tree level: tanh(BN([left; right] @ W)), W (2·C_in, C_out); rows :C_in act on the left child.

    ``forward`` fuses pairs laid out side by side (the per-window tree); ``dilated`` fuses every
    pair of a sequence that lie ``dilation`` positions apart (the convolution). Both use the same
    weight, BatchNorm and Tanh; ``mask`` restricts BatchNorm's training statistics.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c_in = c_in
        self.linear = Linear(2 * c_in, c_out, bias=False)  # no bias: BatchNorm's shift subsumes it
        self.bn = BatchNorm1d(c_out)
        self.act = Tanh()

    def forward(self, pairs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalize(self.linear(pairs), mask)  # (..., 2·C_in) -> (..., C_out)

    def dilated(self, x: torch.Tensor, dilation: int, mask: torch.Tensor | None = None, impl: str = "matmul") -> torch.Tensor:
        """Node t fuses x[:, t] (left) with x[:, t + dilation] (right): (N, T, C_in) -> (N, T - dilation, C_out).

        Only the nodes with both children in x are computed: a causal convolution without padding.
        """
        if impl == "matmul":  # the shifted views side by side, then the per-window code path
            return self(torch.cat([x[:, :-dilation], x[:, dilation:]], dim=-1), mask)
        if impl == "conv1d":
            # Conv1d weight (C_out, C_in, 2): tap 0 = W[:C_in].T meets x[t], tap 1 = W[C_in:].T meets x[t + dilation].
            taps = self.linear.weight.view(2, self.c_in, -1).permute(2, 1, 0)
            y = F.conv1d(x.transpose(1, 2), taps, dilation=dilation)  # (N, C_out, T - dilation)
            return self._normalize(y.transpose(1, 2), mask)
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")

    def _normalize(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.act(self.bn(y, mask))


class _WaveNet(WindowLM):
    """Parameters and the per-window tree shared by both forms, created in the lecture's order."""

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

    def _tree(self, x: torch.Tensor, blocks, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse neighbours level by level, oldest first: (M, K, C) -> (M, n_hidden) after log2(K) blocks.

        ``rows`` (M,) bool: the windows whose nodes count in BatchNorm's training statistics.
        """
        for block in blocks:
            pairs = self.flatten(x)  # (M, K/2, 2·C); the top level squeezes to (M, 2·C)
            mask = None if rows is None else rows.view(-1, *[1] * (pairs.ndim - 2)).expand(pairs.shape[:-1])
            x = block(pairs, mask)
        return x

    def _as(self, cls, **kwargs) -> "_WaveNet":
        """This model's weights and buffers, copied exactly into a new ``cls``, without touching the global RNG."""
        with torch.device("meta"):  # no random init to throw away
            other = cls(self.config, **kwargs)
        other.load_state_dict({k: v.clone() for k, v in self.state_dict().items()}, assign=True)
        return other.train(self.training)


class HierarchicalWaveNet(_WaveNet):
    """Embedding -> [FlattenConsecutive(2) -> Linear -> BatchNorm1d -> Tanh] x L -> Linear."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if X.ndim != 2 or X.shape[1] != self.block_size:
            raise ValueError(f"HierarchicalWaveNet takes windows (N, {self.block_size}), got shape {tuple(X.shape)}")
        self.check_tokens(X)
        x = self.wte(X)  # (N, B, n_embd)
        return self.lm_head(self._tree(x, self.blocks))  # (N, V)


IMPLS = ("auto", "conv1d", "matmul")
# "auto": the faster implementation per device. bench/bench_wavenet.py, training-mode forward +
# backward of 8 sequences x 64 outputs, lecture widths, median ms on an idle 2-core CPU (torch 2.13):
# block 8: conv1d 9.1, matmul 6.6; block 64: 21.7, 17.8; block 256: 50.3, 41.4. mkldnn's dilated
# conv1d loses to one GEMM over the two shifted views side by side, in either memory layout.
# CUDA is not measured yet (no GPU here): matmul until `--device cuda` says otherwise.
AUTO_IMPL = {"cpu": "matmul", "cuda": "matmul"}


class ConvWaveNet(_WaveNet):
    """The hierarchical WaveNet over whole sequences: ``model(S)`` with S (N, L) gives logits
    (N, L - block_size + 1, V), output j being the hierarchical model's on ``S[:, j : j + block_size]``.

    Level i is computed as a causal convolution of kernel 2 and dilation 2^(i-1) (``impl``:
    "conv1d" uses F.conv1d, "matmul" matmuls over shifted views, "auto" the faster per device),
    and only at the positions the levels above need: every position while neighbouring outputs
    share its nodes, and above that, where no two outputs share a node, per output window.
    """

    def __init__(self, config: WaveNetConfig, impl: str = "auto"):
        super().__init__(config)
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
        self.impl = impl

    @classmethod
    def from_hierarchical(cls, model: HierarchicalWaveNet, impl: str = "auto") -> "ConvWaveNet":
        """The same weights (copied) as a ConvWaveNet: each Linear weight's two row halves are the two conv taps."""
        return model._as(cls, impl=impl)

    def to_hierarchical(self) -> HierarchicalWaveNet:
        return self._as(HierarchicalWaveNet)

    def forward(self, S: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, T, V), T = L - block_size + 1, for token ids S (N, L).

        ``valid`` (N, T) bool marks the outputs that have a target; in training mode BatchNorm's
        statistics at every level are taken over the nodes that feed at least one valid output,
        so right padding does not leak into them. Eval mode uses the running statistics.
        """
        B, n = self.block_size, len(self.blocks)
        if S.ndim != 2 or S.shape[1] < B:
            raise ValueError(
                f"ConvWaveNet takes sequences (N, L) with L >= block_size = {B} (left-pad with token 0), got shape {tuple(S.shape)}"
            )
        self.check_tokens(S)
        N, L = S.shape
        T = L - B + 1
        if valid is not None and (valid.shape != (N, T) or valid.dtype != torch.bool):
            raise ValueError(
                f"valid must be a bool tensor (N, L - block_size + 1) = {(N, T)} like the logits, got {valid.dtype} {tuple(valid.shape)}"
            )
        if not self.training or (valid is not None and bool(valid.all())):
            valid = None  # the statistics then cover every node: skip the masked gathers
        impl = self._resolved_impl(S.device)

        # Levels 1..dense have 2^i <= T: outputs share their nodes, and every position is needed.
        dense = min(n, T.bit_length() - 1)
        masks = self._node_masks(valid)[:dense] if valid is not None else [None] * dense
        x = self.wte(S)  # (N, L, n_embd)
        for i, (block, mask) in enumerate(zip(self.blocks[:dense], masks)):
            x = block.dilated(x, 2**i, mask, impl)  # (N, L - 2^(i+1) + 1, n_hidden)
        if dense == n:
            return self.lm_head(x)  # (N, T, V)

        # Above, no node feeds two outputs: gather each output's K inputs (2^dense apart) and finish per window.
        K, step = B >> dense, 1 << dense
        C = x.shape[-1]
        x = x.unfold(1, T, step)  # (N, K, C, T), a view: slice k holds input k of every output
        x = x.permute(0, 3, 1, 2).reshape(N * T, K, C)
        x = self._tree(x, self.blocks[dense:], None if valid is None else valid.reshape(-1))  # (N·T, n_hidden)
        return self.lm_head(x.view(N, T, -1))  # (N, T, V)

    def _node_masks(self, valid: torch.Tensor) -> list[torch.Tensor]:
        """For each level i: which of its nodes (N, L - 2^i + 1) feed a valid output, derived top down.

        blocks[i]'s node t fuses nodes t and t + 2^i of its input, so an input node t is needed
        where the output node t or t - 2^i is.
        """
        masks = [valid]  # the top level's nodes are the outputs
        for i in range(len(self.blocks) - 1, 0, -1):  # from the mask of blocks[i]'s output to blocks[i-1]'s
            pad = valid.new_zeros(valid.shape[0], 2**i)
            masks.append(torch.cat([masks[-1], pad], 1) | torch.cat([pad, masks[-1]], 1))
        return masks[::-1]

    def _resolved_impl(self, device: torch.device) -> str:
        return AUTO_IMPL.get(device.type, "matmul") if self.impl == "auto" else self.impl

    def next_token_logits(self, window: torch.Tensor) -> torch.Tensor:
        return self(window)[:, -1]  # (N, 1, V): a window of block_size tokens has one output

    # Cached incremental generation (fast WaveNet generation, Paine et al. 2016): level i + 1 needs
    # level i at t and t - 2^i, so a queue of level i's last 2^i nodes makes each new token cost one
    # node per level. The queues are plain deques of (N, C) tensors, so the steps stay differentiable.

    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[deque]]:
        """Logits (N, V) for the token after ``idx (N, T0)`` (left-padded with 0 as in generate) and the queues to continue from."""
        if self.training:
            raise ValueError("cached generation uses BatchNorm's running statistics: call model.eval() first")
        self.check_tokens(idx)
        impl = self._resolved_impl(idx.device)
        x = self.wte(left_pad(idx, self.block_size)[:, -self.block_size :])  # (N, B, n_embd)
        cache = []
        for i, block in enumerate(self.blocks):
            cache.append(deque(x[:, -(2**i) :].unbind(1), maxlen=2**i))  # the left children of level i+1's next 2^i nodes
            x = block.dilated(x, 2**i, impl=impl)  # (N, B - 2^(i+1) + 1, n_hidden)
        return self.lm_head(x[:, -1]), cache

    def step(self, token: torch.Tensor, cache: list[deque]) -> torch.Tensor:
        """Append ``token (N,)`` to the sequence that ``cache`` ends; return the logits (N, V) for the token after it."""
        self.check_tokens(token)
        x = self.wte(token)  # (N, n_embd)
        for block, queue in zip(self.blocks, cache):
            pair = torch.cat([queue[0], x], dim=-1)  # (N, 2·C): the node 2^i back, then this one
            queue.append(x)  # maxlen drops queue[0], no longer needed
            x = block(pair)  # (N, n_hidden)
        return self.lm_head(x)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cached: bool = False,
    ) -> torch.Tensor:
        """Extend ``idx (N, T0)`` by ``max_new_tokens`` sampled tokens: ``(N, T0 + max_new_tokens)``.

        ``cached=False`` re-runs the model on the last ``block_size`` tokens (left-padded with 0)
        for each token (``WindowLM.generate``); ``cached=True`` (eval mode) computes one node per
        level instead. Both sample through ``sample_next``, so with the same generator they give
        the same tokens.
        """
        sample = dict(temperature=temperature, top_k=top_k, generator=generator)
        if not cached:
            return super().generate(idx, max_new_tokens, **sample)
        if max_new_tokens == 0:
            return idx
        logits, cache = self.prefill(idx)
        new = [sample_next(logits, **sample)]
        for _ in range(max_new_tokens - 1):
            new.append(sample_next(self.step(new[-1][:, 0], cache), **sample))
        return torch.cat([idx, *new], dim=1)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
