"""A GPT as nanoGPT has it (pre-LayerNorm blocks, causal self-attention, MLP, dropout, tied
embeddings), kept to the model contract: every prediction sees exactly its last R tokens.

How a GPT keeps the contract. nanoGPT's GPT sees 1 .. block_size tokens depending on where a
position falls in its training block; here every output must see exactly its last R tokens, and
one forward over a sequence (N, L) must give all T = L - R + 1 of them. Attention restricted to
the last W_k positions in layer k (a sliding window; Longformer's and Mistral's local attention)
does both: layer k's output at position s depends on its input at s - W_k + 1 .. s, so the layers
stack like the WaveNet's convolutions, R = 1 + sum_k (W_k - 1), and ``block_size`` (R) is split
over the layers, each window about R / n_layer. Like a "valid" convolution, layer k keeps only
the positions whose whole window lies inside its input (the sequence shortens by W_k - 1 per
layer), so no position is computed from a partial window and the last layer leaves exactly the T
outputs. A window batch is the case L = R: one output that sees the whole window.

Cost: the queries go in blocks of Q = max(W / 2, MIN_BLOCK) positions, each block against the
Q + W - 1 keys it can see (a band mask, the same for every block), so a layer's attention costs
about 2 (Q + W - 1) C, about 3 W C, multiply-adds per position where full causal attention over
the sequence would cost 2 L C: linear in L, linear in W. The key and value blocks overlap by
W - 1 positions and are copied (``unfold``, then a 4-D layout for SDPA's fast kernels), (Q + W - 1) / Q
times the keys' memory. The projections and the MLP cost 12 C^2 per position and layer as in any
GPT, and dominate up to W of a few C.

Why rotary positions (RoPE, Su et al. 2021), not nanoGPT's learned absolute ones: with a sliding
window the same token is at a different absolute offset in every window that contains it, so
with absolute positions a prediction would depend on where its window starts, and a rolling KV
cache, which keeps keys computed at earlier offsets, would no longer equal re-running the last R
tokens. Rotary angles enter the scores only through the distance between query and key, so the
output is a function of the last R tokens alone and a cache of keys is exact. The forward rotates
each layer's queries and keys by their positions in that layer's input (0 .. L - 1); the cached
step stores keys unrotated and rotates them in a frame of its own (the query at W - 1, the key d
tokens older at W - 1 - d), so its angles stay below W however long the text grows. Both tables
are computed in float64 and rounded once, so the two agree to float32 rounding.

Cached generation: per layer, a ring of its input's last W keys and values (before rotation),
(N, H, W, D), and one position counter, a 0-dim int64 tensor on the model's device updated in
place, so a step has static shapes, reads nothing back to the host and can be compiled with
fullgraph=True or captured in a CUDA graph. A step costs one position per layer: the projections
and W keys per head.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import LanguageModel, left_pad

# Query positions per attention block: W / 2, at least MIN_BLOCK. Each block reads Q + W - 1 keys, so
# smaller blocks waste fewer scores, but below this many a block's matmuls are too small to run
# fast (docs/models.md, "The Transformer baseline").
MIN_BLOCK = 32
ROPE_BASE = 10_000.0  # the RoPE paper's (and Llama's) base of the rotation frequencies


@dataclass
class TransformerConfig:
    vocab_size: int = 65
    block_size: int = field(
        default=64, metadata={"help": "the receptive field R, split over the layers' attention windows"}
    )
    n_layer: int = field(default=4, metadata={"help": "blocks (attention + MLP)"})
    n_head: int = field(
        default=4, metadata={"help": "attention heads per block; n_embd / n_head must be even (rotary positions)"}
    )
    n_embd: int = field(default=128, metadata={"help": "width of the residual stream"})
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the embeddings, attention weights and residual branches while training"},
    )
    tie_weights: bool = field(default=True, metadata={"help": "the output layer shares the token embedding's weights"})

    def __post_init__(self):
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"--n-embd ({self.n_embd}) must be a multiple of 2 x --n-head ({self.n_head}): "
                "rotary positions rotate pairs of each head's channels"
            )
        if self.block_size > 1 << 20:  # each window's rotation table and mask are tabled whole
            raise ValueError(f"--block-size must be <= {1 << 20} for the transformer, got {self.block_size}")

    @property
    def windows(self) -> list[int]:
        """Each layer's attention window W_k, sum (W_k - 1) = R - 1,
        as equal as they can be (the later layers the larger)."""
        base, extra = divmod(self.block_size - 1, self.n_layer)
        return [1 + base + (k >= self.n_layer - extra) for k in range(self.n_layer)]


class SlidingWindowAttention(nn.Module):
    """Causal self-attention over the last W positions: (N, L, C) -> (N, L - W + 1, C), one output per full window."""

    def __init__(self, config: TransformerConfig, window: int):
        super().__init__()
        C, H = config.n_embd, config.n_head
        self.n_head, self.window, self.dropout = H, window, config.dropout
        self.block = max(window // 2, MIN_BLOCK)
        self.c_attn = nn.Linear(C, 3 * C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        Q, W = self.block, window
        i, j = torch.arange(Q)[:, None], torch.arange(Q + W - 1)
        self.register_buffer(
            "band", (j >= i) & (j <= i + W - 1), persistent=False
        )  # query i of a block sees its keys i .. i+W-1
        cos, sin = rotary_table(W, C // H, torch.device("cpu"))
        self.register_buffer(
            "cos", cos, persistent=False
        )  # (W, D / 2): the cached step's angles, frame positions 0 .. W-1
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, record: list | None = None
    ) -> torch.Tensor:
        """x (N, L, C), the rotation of positions 0 .. L-1 (L, 1, D/2) -> (N, L - W + 1, C)."""
        N, L, C = x.shape
        H, W, Q = self.n_head, self.window, self.block
        D = C // H
        T = L - W + 1
        q, k, v = self.c_attn(x).view(N, L, 3, H, D).unbind(2)  # (N, L, H, D) each
        if record is not None:  # the last W keys and values (before rotation), heads first, for the cache
            record.append(tuple(t[:, L - W :].transpose(1, 2) for t in (k, v)))  # (N, H, W, D)
        q = _rotate(q[:, W - 1 :], cos[W - 1 :], sin[W - 1 :])  # only the positions whose window is whole ask
        k = _rotate(k, cos, sin)
        nb = -(-T // Q)  # query blocks; the last one padded at the end (its padding never reaches a kept output)
        pad = nb * Q - T
        q = F.pad(q, (0, 0, 0, 0, 0, pad)).view(N, nb, Q, H, D).transpose(2, 3).reshape(N * nb, H, Q, D)
        # block b's keys: positions bQ .. bQ + Q + W - 2
        # (overlapping windows, copied: SDPA's fast kernels take 4-D tensors)
        k, v = (
            F.pad(t, (0, 0, 0, 0, 0, pad)).unfold(1, Q + W - 1, Q).transpose(-1, -2).reshape(N * nb, H, Q + W - 1, D)
            for t in (k, v)
        )
        y = _attention(q, k, v, self.band, self.dropout if self.training else 0.0)  # (N·nb, H, Q, D)
        y = y.view(N, nb, H, Q, D).transpose(2, 3).reshape(N, nb * Q, C)[:, :T]  # (N, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (N, C) at position ``pos`` -> (N, C);
        writes its key and value into the rings (N, H, W, D), slot pos mod W."""
        N, C = x.shape
        H, W = self.n_head, self.window
        q, k, v = self.c_attn(x).view(N, 3, H, 1, C // H).unbind(1)  # (N, H, 1, D) each
        slot = (pos % W).view(1)
        keys.index_copy_(2, slot, k.to(keys.dtype))
        values.index_copy_(2, slot, v.to(values.dtype))
        frame = (
            W - 1 - (pos - torch.arange(W, device=pos.device)) % W
        )  # slot j holds the key (pos - j) mod W tokens back
        q = _rotate(q, self.cos[W - 1 : W], self.sin[W - 1 : W])
        k = _rotate(keys.to(q.dtype), self.cos[frame], self.sin[frame])
        y = _attention(q, k, values.to(q.dtype))  # (N, H, 1, D)
        return self.c_proj(y.reshape(N, C))


def _attention(q, k, v, mask=None, dropout: float = 0.0) -> torch.Tensor:
    """SDPA; on the CPU in float32 even under bf16 autocast: PyTorch's CPU flash-attention kernel is
    slower in bf16 than in float32, while the projections around it, most of the FLOPs, gain from bf16
    and keep it (docs/models.md, "The Transformer baseline")."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout
            ).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def rotary_table(positions: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles p / base^(2i / dim), p < positions, i < dim / 2: (positions, dim / 2) float32.

    Computed in float64 (on the CPU for MPS, which has none): in float32 the angle p·f would be off
    by up to p·2^-24 radians, 1e-4 at p = 2000, and the cached step, which uses small frame
    positions, would drift from the forward by as much.
    """
    at = device if device.type != "mps" else torch.device("cpu")
    inv_freq = ROPE_BASE ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=at) / dim)
    angles = torch.arange(positions, dtype=torch.float64, device=at)[:, None] * inv_freq  # (positions, dim / 2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (i, i + D/2) of ``x (..., D)`` by the angles ``cos, sin (..., D/2)`` (broadcast)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast: keep the attention's matmuls in bf16
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLPBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x)); the residual keeps the positions whose window is whole."""

    def __init__(self, config: TransformerConfig, window: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = SlidingWindowAttention(config, window)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLPBlock(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, record: list | None = None
    ) -> torch.Tensor:
        x = x[:, self.attn.window - 1 :] + self.attn(self.ln_1(x), cos, sin, record)  # (N, L - W + 1, C)
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.step(self.ln_1(x), keys, values, pos)  # (N, C)
        return x + self.mlp(self.ln_2(x))


class Transformer(LanguageModel):
    """Token embedding -> n_layer Blocks with sliding-window attention
    -> LayerNorm -> Linear (tied to the embedding)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.receptive_field = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, w) for w in config.windows)
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # nanoGPT's initialisation: N(0, 0.02), the residual projections scaled by 1 / sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / (2 * config.n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        self.outputs(idx.shape[1])  # one clear error below R
        x = F.dropout(self.wte(idx), self.config.dropout, self.training)  # (N, L, C)
        x = self._blocks(x)  # (N, T, C)
        logits = self.lm_head(self.ln_f(x))  # (N, T, V): the sequence has shortened by R - 1
        return logits, self.loss(logits, targets)

    def _blocks(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """(N, L, C) -> (N, L - R + 1, C); each block shortens the sequence by its W - 1."""
        cos, sin = rotary_table(x.shape[1], self.config.n_embd // self.config.n_head, x.device)  # (L, D/2)
        cos, sin = cos[:, None], sin[:, None]  # (L, 1, D/2): the same angle for every head
        for block in self.blocks:
            L = x.shape[1]  # only differences of positions matter: each layer counts its own from 0
            x = block(x, cos[:L], sin[:L], record)
        return x

    def prefill(self, idx: torch.Tensor):
        R = self.receptive_field
        window = left_pad(idx, R)[:, -R:]  # (N, R)
        record: list = []
        x = self._blocks(self.wte(window), record)  # (N, 1, C)
        logits = self.lm_head(self.ln_f(x[:, -1]))  # (N, V)
        # Slot j of a ring holds the position p = j mod W: the last W positions R-W .. R-1 rolled by R mod W.
        keys = [k.roll(R % b.attn.window, dims=2).contiguous() for (k, _), b in zip(record, self.blocks)]
        values = [v.roll(R % b.attn.window, dims=2).contiguous() for (_, v), b in zip(record, self.blocks)]
        return logits, KVCache(keys, values, idx.new_full((), R, dtype=torch.int64))

    def step(self, token: torch.Tensor, cache: "KVCache"):
        x = self.wte(token)  # (N, C)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block.step(x, keys, values, cache.pos)
        cache.pos += 1
        return self.lm_head(self.ln_f(x)), cache


class KVCache:
    """Per layer its input's last W keys (before rotation) and values, rings (N, H, W, D);
    ``pos``, the next position (0-dim int64)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos: torch.Tensor):
        self.keys, self.values, self.pos = keys, values, pos
