"""The contract every makemore model keeps, and generation on top of it.

``forward(idx (N, L) int64, targets (N, T) | None) -> (logits (N, T, V), loss | None)``.
A model's receptive field R slides over the sequence: T = L - R + 1 outputs, output j predicting
the token after position j + R - 1. A window batch is the special case L = R, T = 1. Targets are
``IGNORE_INDEX`` (-100) where there is nothing to predict; models that need a mask (BatchNorm's
statistics over the valid positions) derive it from ``targets``. Token ids are checked where they
are made (encoding, the CLI, ``generate``'s prompt), not in ``forward``, and nothing in
``forward`` reads a tensor value back to the host.

``generate`` is one loop over ``prefill`` / ``step``. The default cache is the last R tokens,
re-run through ``forward`` for each new token; the WaveNet overrides both with one queue per level.
"""

from functools import partial

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..kernels import cross_entropy


class LanguageModel(nn.Module):
    vocab_size: int
    receptive_field: int  # R: the tokens one prediction sees

    def outputs(self, length: int) -> int:
        """T, the number of predictions for a sequence of ``length`` tokens; a clear error below R."""
        if length < self.receptive_field:
            raise ValueError(
                f"{type(self).__name__} sees {self.receptive_field} tokens per prediction; got sequences of {length} "
                "(left-pad them with token 0)"
            )
        return length - self.receptive_field + 1

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy over the targets that are not IGNORE_INDEX (classes last)."""
        return None if targets is None else cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)

    def check_tokens(self, idx: torch.Tensor) -> None:
        """One clear error for token ids outside [0, vocab_size): for ids from outside (prompts), not per step."""
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {idx.dtype}")
        bad = (idx < 0) | (idx >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {idx[bad][0].item()} is out of range for a vocabulary of {self.vocab_size} (valid: 0..{self.vocab_size - 1})")

    # Generation: prefill the context, then one step per new token.

    def prefill(self, idx: torch.Tensor):
        """Logits (N, V) for the token after ``idx (N, T0)`` (left-padded with token 0) and a cache to continue from."""
        window = left_pad(idx, self.receptive_field)[:, -self.receptive_field :]
        return self(window)[0][:, -1], window

    def step(self, token: torch.Tensor, cache):
        """Append ``token (N,)`` to the sequence ``cache`` ends: (logits (N, V) for the next token, the new cache)."""
        window = torch.cat([cache[:, 1:], token[:, None]], dim=1)
        return self(window)[0][:, -1], window

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cached: bool = True,
    ) -> torch.Tensor:
        """Extend ``idx (N, T0)`` by ``max_new_tokens`` sampled tokens: ``(N, T0 + max_new_tokens)``.

        ``cached=False`` uses the default cache whatever the model (re-run the last R tokens per
        token), so the two can be compared: with the same generator they give the same tokens.
        """
        check_sampling(temperature, top_k)
        self.check_tokens(idx)
        if max_new_tokens == 0:
            return idx
        prefill, step = (self.prefill, self.step) if cached else (partial(LanguageModel.prefill, self), partial(LanguageModel.step, self))
        logits, cache = prefill(idx)
        new = []
        for i in range(max_new_tokens):
            new.append(sample_next(logits, temperature=temperature, top_k=top_k, generator=generator))  # (N, 1)
            if i + 1 < max_new_tokens:
                logits, cache = step(new[-1][:, 0], cache)
        return torch.cat([idx, *new], dim=1)


def sliding_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, L, ...) -> (N, L - size + 1, size, ...): window j holds positions j .. j + size - 1, oldest first."""
    return x.unfold(1, size, 1).movedim(-1, 2)


def left_pad(idx: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """Left-pad ``idx (N, T)`` with ``value`` to at least ``length`` columns."""
    missing = length - idx.shape[1]
    if missing <= 0:
        return idx
    return torch.cat([idx.new_full((idx.shape[0], missing), value), idx], dim=1)


def check_sampling(temperature: float, top_k: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row from ``logits (N, V)``: ``(N, 1)``."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
