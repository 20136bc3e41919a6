"""Optimisers and learning-rate schedules.

The schedule is a function of the run's progress p in [0, 1]: the larger of step / max_steps and
elapsed / max_seconds, so a run with a time budget decays to its floor exactly when time is up.
"""

import math

import torch

from .config import TrainConfig


class SGD(torch.optim.Optimizer):
    """Plain SGD written as the lecture writes it, ``p += -lr * grad``.

    torch.optim.SGD computes ``p.add_(grad, alpha=-lr)``, which rounds differently (a fused
    multiply-add), so its run drifts from the lecture's by float noise from the second step on.
    """

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p += -group["lr"] * p.grad


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return SGD(params, lr=config.lr)
    # Decay the matrices (Linear weights, embeddings), not the vectors (biases, BatchNorm's gain and shift).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    on_cpu_or_cuda = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=on_cpu_or_cuda)


def learning_rate(config: TrainConfig, progress: float) -> float:
    if config.schedule == "step":  # the lecture's: 0.1, then 0.01 from step 150,000 of 200,000
        return config.lr if progress < config.decay_at else config.min_lr
    if progress < config.warmup:
        return config.lr * progress / config.warmup
    decay = min(1.0, (progress - config.warmup) / max(1e-12, 1 - config.warmup))
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * decay))
