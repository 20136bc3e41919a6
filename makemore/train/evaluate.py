"""Losses of a model on a source: exhaustive (bounded) evaluation and nanoGPT's random-batch estimate."""

import torch

from ..data import IGNORE_INDEX
from ..kernels import cross_entropy

EVAL_BATCH_TOKENS = 1 << 15  # input positions per evaluation batch: bounds the activations' memory


@torch.no_grad()
def evaluate(model, source, *, splits=None, max_tokens: int, device="cpu") -> dict[str, float]:
    """Mean loss per split in eval mode (BatchNorm on running statistics), every target once up to ``max_tokens``."""
    was_training = model.training
    model.eval()
    result = {}
    for split in splits or source.splits:
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        for batch in source.eval_batches(split, model.receptive_field, EVAL_BATCH_TOKENS, max_tokens):
            batch = batch.to(device)
            logits, _ = model(batch.idx)
            total += cross_entropy(logits.float(), batch.targets, ignore_index=IGNORE_INDEX, reduction="sum")
            count += (batch.targets != IGNORE_INDEX).sum()
        result[split] = (total / count).item()
    model.train(was_training)
    return result


@torch.no_grad()
def estimate_loss(model, source, config, generator: torch.Generator, autocast, device) -> dict[str, float]:
    """nanoGPT's estimate_loss: the mean loss of ``config.eval_iters`` random training-layout batches per split.

    ``device``: the model's (under torchrun ``cuda`` is ``cuda:LOCAL_RANK``, not ``config.device``).
    """
    was_training = model.training
    model.eval()
    result = {}
    for split in source.splits:
        losses = torch.zeros(config.eval_iters, device=device)
        for i in range(config.eval_iters):
            batch = source.batch(
                split, config.batch_size, config.layout, model.receptive_field, generator, config.seq_len
            ).to(device)
            with autocast:
                _, losses[i] = model(batch.idx, batch.targets)
        result[split] = losses.mean().item()
    model.train(was_training)
    return result
