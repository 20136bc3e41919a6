"""Sampling from a trained model: many samples as one batch, not one Python loop per sample."""

from collections.abc import Container

import torch

from .data import Vocab


def sample_items(
    model,
    vocab: Vocab,
    n: int,
    max_len: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    exclude: Container[str] = frozenset(),
    max_rounds: int = 50,
    device="cpu",
    prompt: str = "",
) -> list[str]:
    """``n`` items (e.g. names), each generated from an empty context until it emits the boundary '.'
    (or reaches ``max_len`` characters, the longest training item).

    Items in ``exclude`` (e.g. the training split's ``item_set``) are skipped; batches are drawn
    until ``n`` new ones are found or ``max_rounds`` batches have been drawn. With ``prompt``, every
    item starts with it (the model continues it after the boundary, as the item's first characters).
    """
    start = vocab.encode(prompt, where="--prompt").to(device, torch.int64)
    if (start == 0).any():
        raise ValueError(
            f"--prompt {prompt!r} holds {vocab.decode([0])!r}, the boundary between items: give the start of one item"
        )
    found: list[str] = []
    for _ in range(max_rounds):
        context = start.expand(n, -1)
        rows = model.generate(
            context, max(max_len + 1 - len(prompt), 1), temperature=temperature, top_k=top_k, generator=generator
        )
        rows = rows[:, len(prompt) :].cpu()
        # Each row up to its first boundary, found on the tensor: a row is as long as the longest
        # training item, and a list of Python ints per row would cost 28 bytes per token.
        ended = rows == 0
        ends = torch.where(ended.any(1), ended.int().argmax(1), rows.shape[1]).tolist()
        for row, end in zip(rows, ends, strict=True):
            item = prompt + vocab.decode(row[:end])
            if item and item not in exclude:
                found.append(item)
        if len(found) >= n:  # else draw again: empty items (an immediate boundary) and excluded ones are replaced
            break
    return found[:n]


def sample_text(
    model,
    vocab: Vocab,
    length: int,
    prompt: str = "",
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    device="cpu",
) -> str:
    """``prompt`` continued by ``length`` sampled characters, for models of stream data."""
    idx = vocab.encode(prompt, where="--prompt")[None, :].to(device, torch.int64)
    out = model.generate(idx, length, temperature=temperature, top_k=top_k, generator=generator)
    return vocab.decode(out[0].cpu())
