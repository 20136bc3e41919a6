"""What every makemore model shares: next-token logits from a window, and sampling from them."""

import torch
from torch import nn


class WindowLM(nn.Module):
    """A model that maps windows ``(N, block_size)`` of token ids to next-token logits ``(N, V)``."""

    vocab_size: int
    block_size: int

    def check_tokens(self, idx: torch.Tensor) -> None:
        """Raise one clear error for token ids outside [0, vocab_size) instead of an index error deep inside."""
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            bad = idx[(idx < 0) | (idx >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size} (valid: 0..{self.vocab_size - 1})")

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx (N, T0)`` by ``max_new_tokens`` sampled tokens: ``(N, T0 + max_new_tokens)``.

        Each step re-runs the model on the last ``block_size`` tokens, left-padded with the boundary
        token 0 while the context is shorter, as the training windows are.
        """
        for _ in range(max_new_tokens):
            window = left_pad(idx, self.block_size)[:, -self.block_size :]
            logits = self.next_token_logits(window)
            idx = torch.cat([idx, sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)], dim=1)
        return idx

    def next_token_logits(self, window: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) for the token after each window (N, block_size)."""
        return self(window)


def left_pad(idx: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """Left-pad ``idx (N, T)`` with ``value`` to at least ``length`` columns."""
    missing = length - idx.shape[1]
    if missing <= 0:
        return idx
    return torch.cat([idx.new_full((idx.shape[0], missing), value), idx], dim=1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row from ``logits (N, V)``: ``(N, 1)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
