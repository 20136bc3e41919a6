"""Training: settings (config.py), recipes (recipes.py), optimisers and schedules (optim.py), the loop
(loop.py) and evaluation (evaluate.py)."""

from .config import TrainConfig, make_configs
from .evaluate import estimate_loss, evaluate
from .loop import train
from .recipes import RECIPES
from .run import BEST, CHECKPOINT, LOSS_PLOT, METRICS

__all__ = [
    "RECIPES",
    "TrainConfig",
    "make_configs",
    "train",
    "evaluate",
    "estimate_loss",
    "BEST",
    "CHECKPOINT",
    "METRICS",
    "LOSS_PLOT",
]
