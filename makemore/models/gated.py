"""The WaveNet paper's model (van den Oord et al. 2016): gated residual layers with skip connections.

Layer k (0-based) of each stack has dilation d = 2^(k mod n_levels). On its input level x (width
C = n_embd) it computes, for every position s,

    z[s]      = tanh(W_f [x[s-d]; x[s]] + b_f) * sigmoid(W_g [x[s-d]; x[s]] + b_g)   (gate width G = n_hidden)
    x'[s]     = x[s] + W_res z[s]                                                   (residual: the right child)
    skip[s]  += W_skip z[s]                                                         (skip width S = n_skip)

and the head is ReLU -> Linear(S, S) -> ReLU -> Linear(S, V) on the skip sum. ``stacks`` repeats
the dilations 1 .. 2^(n_levels-1), so the receptive field is R = stacks * (2^n_levels - 1) + 1.
No normalisation: nothing depends on the batch, so every order below computes the same function
in training (without dropout) and in evaluation, and nothing needs synchronising across processes.

``_walk`` is the only walk over the layers; ``order`` chooses where each layer's two children come
from (its "dilate" step):

- ``"conv"``: whole sequences as one flat (rows, C) buffer. The children of every node are two
  contiguous row slices, ``x[:-d]`` and ``x[d:]``: a dilated causal convolution as two GEMMs with
  no copies, each node computed once and reused by every output window that contains it. Rows
  that straddle two sequences are computed and never used by a valid output.
- ``"windows"``: every output's window on its own (N·T windows of R tokens). The first
  stacks - 1 stacks are convolutions inside the window (the last stack needs all their nodes);
  the last stack is the per-window tree: level k is needed only at t - j·2^k, so it computes just
  those nodes, the children are neighbours ``x[0::2]``, ``x[1::2]``, the residual takes the right
  one and the skip each level's rightmost node.
- cached generation (``prefill`` / ``step``): a ring of each layer's last d input nodes
  (base.Rings), so a new token costs one node per layer.

Under autocast (``--dtype bfloat16``) every GEMM runs in bfloat16 on float32 master weights, and
the long sums stay float32: the residual stream (x + z @ W_res) and the skip sum (over every
layer), each adding a bfloat16 GEMM's result to a float32 accumulator (``add_matmul``).

Why the residual 1x1 has no bias: a constant added to the residual stream is absorbed by the
next layer's gate bias and, through the skips, by ``skip_bias``; one bias on the skip sum stands
for the paper's per-layer skip biases for the same reason.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Embedding, Linear
from .base import LanguageModel, Rings, left_pad, matmul_dtype, sliding_windows

GATED_ORDERS = ("conv", "windows")


@dataclass
class GatedWaveNetConfig:
    vocab_size: int = 65
    n_embd: int = field(default=64, metadata={"help": "width of the residual stream (the embedding)"})
    n_hidden: int = field(default=64, metadata={"help": "width of each layer's gate"})
    n_skip: int = field(default=128, metadata={"help": "width of the skip connections and of the output head"})
    n_levels: int = field(default=8, metadata={"help": "dilated layers per stack, dilations 1, 2, ..., 2^(n-1)"})
    stacks: int = field(default=1, metadata={"help": "stacks of layers; receptive field stacks * (2^n_levels - 1) + 1"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on each layer's gated activation while training"})
    order: str = field(default="conv", metadata={"help": "evaluation order: conv or windows (per window)"})

    def __post_init__(self):
        for name in ("n_embd", "n_hidden", "n_skip", "n_levels", "stacks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.n_levels > 16:
            raise ValueError(f"--n-levels must be <= 16 (a receptive field of 65536 per stack), got {self.n_levels}")
        if self.stacks > 16:  # each stack builds n_levels layers at once: a huge count would fill memory with modules
            raise ValueError(
                f"--stacks must be <= 16 (at most 256 layers, a receptive field of about a million), got {self.stacks}"
            )
        if self.order not in GATED_ORDERS:
            raise ValueError(
                f"--order must be one of {', '.join(GATED_ORDERS)} for the gated model, got {self.order!r}"
            )

    @property
    def receptive_field(self) -> int:
        return self.stacks * (2**self.n_levels - 1) + 1


class GatedLayer(nn.Module):
    """One dilated layer: the gated activation of its two children, a residual and a skip 1x1."""

    def __init__(self, c: int, g: int, s: int, dilation: int, n_layers: int, last: bool, dropout: float = 0.0):
        super().__init__()
        self.c, self.dilation, self.dropout = c, dilation, dropout
        self.conv = Linear(2 * c, 2 * g)  # rows :C meet the left (older) child; columns :G the filter, G: the gate
        self.skip = Linear(g, s, bias=False)
        self.res = None if last else Linear(g, c, bias=False)  # the last layer's residual would feed nothing
        with torch.no_grad():  # sums over n_layers terms: keep the residual stream and the skip sum at unit scale
            self.skip.weight /= n_layers**0.5
            if self.res is not None:
                self.res.weight /= (2 * n_layers) ** 0.5

    def gate(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(M, C) children, row for row -> (M, G): two GEMMs into one output, no concatenation."""
        dtype = matmul_dtype(left)  # autocast does not cast addmm_'s operands: cast them all alike
        w, b = self.conv.weight.to(dtype), self.conv.bias.to(dtype)
        y = torch.addmm(b, left.to(dtype), w[: self.c]).addmm_(right.to(dtype), w[self.c :])  # (M, 2G)
        f, g = y.chunk(2, dim=-1)
        return F.dropout(torch.tanh(f) * torch.sigmoid(g), self.dropout, self.training)

    def residual(self, right: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return add_matmul(right, z, self.res.weight)  # (M, C)

    def dilated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer over a flat level x (M, C), children d rows apart: (z (M - d, G), x' (M - d, C) or None).

        The same function as ``gate`` and ``residual`` on ``x[:-d]``, ``x[d:]``, with the backward
        written by hand (``_DilatedGated``).
        """
        res = None if self.res is None else self.res.weight
        p = self.dropout if self.training else 0.0
        return _DilatedGated.apply(x, self.dilation, self.conv.weight, self.conv.bias, res, p)


class _DilatedGated(torch.autograd.Function):
    """z = dropout(tanh(y_f) * sigmoid(y_g)), y = x[:-d] @ W[:C] + x[d:] @ W[C:] + b, and x' = x[d:] + z @ W_res.

    Autograd's composition materialises the gradient of each row slice of x (``x[:-d]``, ``x[d:]``
    twice) as a zero-filled copy of x and sums them; here dx is written once, by two GEMMs into
    overlapping row ranges. (dy's two halves are concatenated, not written in place through ``out=``
    views: dynamo traces no ``out=`` into a strided view, and this backward is traced by
    ``torch.compile``.)

    The GEMMs and the gate run in ``matmul_dtype`` (bfloat16 under autocast, on bfloat16 copies of
    x and the float32 master weights, as autocast's own GEMMs do); x' stays in x's dtype (float32:
    the residual stream is a sum over layers), and so do dx and the weights' gradients.
    """

    @staticmethod
    def forward(ctx, x, d: int, weight, bias, res_weight, p: float):
        dtype = matmul_dtype(x)  # read before autocast is turned off below
        with torch.autocast(x.device.type, enabled=False):  # every operand is cast here, once
            xc, w = x.to(dtype), weight.to(dtype)
            res = None if res_weight is None else res_weight.to(dtype)
            C, G = x.shape[1], weight.shape[1] // 2
            y = torch.addmm(bias.to(dtype), xc[:-d], w[:C]).addmm_(xc[d:], w[C:])  # (M - d, 2G)
            t, s = torch.tanh(y[:, :G]), torch.sigmoid(y[:, G:])
            keep = torch.empty_like(t).bernoulli_(1 - p) if p else None  # dropout: 0 or 1, then 1 / (1 - p)
            z = (
                t * s if keep is None else torch.mul(t * s, keep.mul_(1 / (1 - p)))
            )  # a fresh tensor: docs/models.md#autograd-functions
            x_next = None if res is None else add_matmul(x[d:], z, res)
        ctx.d, ctx.dtypes = d, (x.dtype, weight.dtype, bias.dtype)
        ctx.save_for_backward(xc, w, res, t, s, z, keep)
        return z, x_next

    @staticmethod
    def backward(ctx, dz, dx_next):
        x, weight, res_weight, t, s, z, keep = ctx.saved_tensors  # x, weights, activations in the GEMMs' dtype
        d, (M, C), dtype = ctx.d, x.shape, z.dtype
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        with torch.autocast(x.device.type, enabled=False):
            dz = torch.zeros_like(z) if dz is None else dz.to(dtype)
            d_res = None
            if res_weight is not None and dx_next is not None:
                dxn = dx_next.to(dtype)
                d_res = (z.T @ dxn).to(w_dtype)  # (G, C)
                dz = torch.addmm(dz, dxn, res_weight.T)
            if keep is not None:
                dz = dz * keep  # keep holds 0 or 1 / (1 - p)
            dy_f = torch.ops.aten.tanh_backward(dz * s, t)  # * (1 - t^2)
            dy_g = torch.ops.aten.sigmoid_backward(dz * t, s)  # * s (1 - s)
            dy = torch.cat([dy_f, dy_g], dim=1)  # (M - d, 2G)
            d_weight = torch.cat([x[:-d].T @ dy, x[d:].T @ dy]).to(w_dtype)  # (2C, 2G)
            dx = torch.empty(M, C, dtype=x_dtype, device=x.device)
            if dtype == x_dtype:  # the two GEMMs write straight into dx
                torch.mm(dy, weight[:C].T, out=dx[:-d])  # the left children: rows 0 .. M-d-1
                dx[M - d :].zero_()
                dx[d:].addmm_(dy, weight[C:].T)  # the right children: rows d .. M-1
            else:  # bfloat16 GEMMs, summed in x's dtype
                dx[:-d] = dy @ weight[:C].T
                dx[M - d :].zero_()
                dx[d:] += dy @ weight[C:].T
            if dx_next is not None:
                dx[d:] += dx_next  # the residual passes the right child through
            d_bias = dy.sum(0, dtype=b_dtype)
        return dx, None, d_weight, d_bias, d_res, None


def add_matmul(acc: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``acc + a @ w`` in acc's dtype: one addmm where the dtypes agree; else a GEMM in a's dtype
    (bfloat16 under autocast) added to the float32 accumulator, which autocast's addmm would round."""
    if a.dtype == acc.dtype:
        return torch.addmm(acc, a, w)
    return acc + a @ w.to(a.dtype)


class GatedWaveNet(LanguageModel):
    """Embedding -> stacks x n_levels GatedLayers -> ReLU, Linear, ReLU, Linear on the skip sum."""

    def __init__(self, config: GatedWaveNetConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.receptive_field = config.receptive_field
        self.order = config.order
        n_layers = config.stacks * config.n_levels
        C, G, S = config.n_embd, config.n_hidden, config.n_skip
        self.wte = Embedding(config.vocab_size, C)
        self.layers = nn.ModuleList(
            GatedLayer(C, G, S, 2 ** (k % config.n_levels), n_layers, last=k == n_layers - 1, dropout=config.dropout)
            for k in range(n_layers)
        )
        self.skip_bias = nn.Parameter(torch.zeros(S))
        self.head = Linear(S, S)
        self.lm_head = Linear(S, config.vocab_size)
        with torch.no_grad():
            self.lm_head.weight *= 0.1  # a less confident start: logits near 0, loss near log(V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        N, L = idx.shape
        T = self.outputs(L)
        x = self.wte(idx)  # (N, L, C)
        if self.order == "windows":  # every output's window on its own: N·T sequences of R tokens, one output each
            N, L = N * T, self.receptive_field
            x = sliding_windows(x, L)  # (N·T, R, C) once reshaped below
        skip = self._walk(x.reshape(N * L, -1), N, L, per_window=self.order == "windows")  # (N·T or N, S)
        logits = self._logits(skip).view(idx.shape[0], T, -1)  # (N, T, V)
        return logits, self.loss(logits, targets)

    def _walk(self, x: torch.Tensor, N: int, L: int, per_window: bool, record: list | None = None) -> torch.Tensor:
        """x (N·L, C), N sequences of L level-0 rows -> the skip sum at their last L - R + 1 positions (N·T, S).

        ``shift`` counts the rows dropped from the front so far: row r of a level is position r +
        shift of the flat input. Skips are summed over rows aligned with the outputs: row r of
        ``skip`` is flat position r + R - 1, so sequence n's outputs are rows n·L .. n·L + T - 1.
        ``per_window``: the sequences are single windows (L = R) and the last stack walks as a tree.
        ``record`` collects each layer's last d input nodes per sequence, for ``prefill``.
        """
        R, T = self.receptive_field, L - self.receptive_field + 1
        n_levels = self.config.n_levels
        tree_from = len(self.layers) - n_levels if per_window else len(self.layers)
        skip, shift = None, 0
        for k, layer in enumerate(self.layers):
            d = layer.dilation
            if k == tree_from:  # the last stack per window: each window's last 2^n nodes; skip so far at its output
                x = _unflat(x, N, L, shift)[:, L - shift - 2**n_levels : L - shift].reshape(-1, x.shape[-1])
                skip = _unflat(skip, N, L, R - 1)[:, 0] if skip is not None else self.skip_bias.expand(N, -1)
            if record is not None:
                record.append(_unflat(x, N, L, shift)[:, L - shift - d : L - shift])
            if k >= tree_from:  # adjacent rows are the children: (N·K, C) -> (N·K/2, G), K nodes per window
                right = x[1::2]
                z = layer.gate(x[0::2], right)
                skip = add_matmul(skip, z.view(N, -1, z.shape[-1])[:, -1], layer.skip.weight)  # the rightmost node
                x = None if layer.res is None else layer.residual(right, z)
            else:  # rows d apart are the children: (M, C) -> (M - d, G)
                z, x = layer.dilated(x)
                shift += d
                outputs = z[R - 1 - shift :]  # rows aligned with the outputs
                skip = add_matmul(self.skip_bias if skip is None else skip, outputs, layer.skip.weight)
        if tree_from == len(self.layers):
            skip = _unflat(skip, N, L, R - 1)[:, :T].reshape(N * T, -1)
        return skip

    # Cached generation (fast WaveNet generation, Paine et al. 2016): a layer needs its input at s
    # and s - d, so a ring of its input's last d nodes (base.Rings) makes each new token cost one
    # node per layer.

    def prefill(self, idx: torch.Tensor):
        R = self.receptive_field
        window = left_pad(idx, R)[:, -R:]  # (N, R)
        N = window.shape[0]
        nodes: list[torch.Tensor] = []
        skip = self._walk(self.wte(window).reshape(N * R, -1), N, R, per_window=False, record=nodes)  # (N, S)
        return self._logits(skip), Rings(nodes)

    def step(self, token: torch.Tensor, cache: Rings):
        x = self.wte(token)  # (N, C): the new position of level 0
        skip = self.skip_bias
        for i, layer in enumerate(self.layers):
            z = layer.gate(cache.swap(i, x), x)  # its left child: the node d positions back
            skip = add_matmul(skip, z, layer.skip.weight)
            if layer.res is not None:
                x = layer.residual(x, z)
        cache.advance()
        return self._logits(skip), cache

    def _logits(self, skip: torch.Tensor) -> torch.Tensor:
        return self.lm_head(F.relu(self.head(F.relu(skip))))


def _unflat(x: torch.Tensor, N: int, L: int, shift: int) -> torch.Tensor:
    """Rows of a level that has lost ``shift`` rows from the front, as (N, L, ...):
    [n, j] is position j + shift of sequence n."""
    return F.pad(x, (0, 0, 0, shift)).view(N, L, *x.shape[1:])
