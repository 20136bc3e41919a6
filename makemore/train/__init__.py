"""Training: settings (config.py), recipes (below), optimisers and schedules (optim.py), the loop
(loop.py) and evaluation (evaluate.py)."""

from .config import TrainConfig, make_configs
from .evaluate import estimate_loss, evaluate
from .loop import CHECKPOINT, LOSS_PLOT, METRICS, train

_SHAKESPEARE = dict(
    data="tinyshakespeare", model="gated", layout="sequences", batch_size=2, optimizer="adamw", min_lr=1e-4, schedule="cosine",
    warmup=0.02, weight_decay=0.1, max_steps=1_000_000, eval_interval=250, eval_iters=10, log_interval=50, checkpoint_interval=10_000_000,
)  # fmt: skip

# Recipes: named overrides of the defaults (TrainConfig's and the model's), as flat settings.
RECIPES = {
    # Lecture 5's run: hierarchical WaveNet, n_embd 24, n_hidden 128, 76,579 parameters, SGD 200k steps: val 1.993.
    "lecture": {},
    # The same model to the lecture's val loss in seconds: AdamW, large batches, the fused BatchNorm + tanh.
    "fast": dict(
        optimizer="adamw", lr=2e-2, min_lr=1e-3, schedule="cosine", warmup=0.02, weight_decay=0.1, batch_size=1024,
        max_steps=100_000, max_seconds=10.0, fused=True, log_interval=50, checkpoint_interval=100_000,
    ),  # fmt: skip
    # Long contexts on tinyshakespeare (first 90% train, last 10% val), each stopping at its time budget:
    # the WaveNet paper's gated residual block through the convolution, AdamW, long training sequences.
    "shakespeare-60s": dict(_SHAKESPEARE, max_seconds=60.0, seq_len=1024, n_embd=64, n_hidden=64, n_skip=128, n_levels=8, lr=6e-3),
    "shakespeare-3m": dict(_SHAKESPEARE, max_seconds=180.0, seq_len=1024, n_embd=96, n_hidden=96, n_skip=192, n_levels=8, lr=6e-3, dropout=0.1),
    "shakespeare-15m": dict(_SHAKESPEARE, max_seconds=900.0, seq_len=2048, n_embd=96, n_hidden=96, n_skip=192, n_levels=9, lr=5e-3, dropout=0.25),
    # The best names model we could train in 10 minutes on our 2-core CPU: the gated block over whole names (context 16).
    "names-best": dict(
        model="gated", layout="sequences", n_levels=4, n_embd=96, n_hidden=96, n_skip=192, dropout=0.3, batch_size=64,
        optimizer="adamw", lr=3e-3, min_lr=1e-5, schedule="cosine", warmup=0.02, weight_decay=0.1, max_steps=1_000_000,
        max_seconds=600.0, eval_interval=500, eval_iters=20, log_interval=100, checkpoint_interval=10_000_000,
    ),  # fmt: skip
    # Earlier rows of lecture 5's log (val loss the lecture reports).
    "mlp3": dict(model="mlp", block_size=3, n_embd=10, n_hidden=200),  # 12K params: 2.105
    "mlp8": dict(model="mlp", block_size=8, n_embd=10, n_hidden=200),  # 22K params: 2.027
    "wavenet22k": dict(n_embd=10, n_hidden=68),  # 22K params, with the 3-D BatchNorm: 2.022
    # Lectures 1 and 2: counts, and the bigram as one linear layer.
    "bigram": dict(model="ngram", n=2, max_steps=0),
    "trigram": dict(model="ngram", n=3, max_steps=0),
    "bigram-nn": dict(model="neural-bigram", max_steps=0),
}

__all__ = ["RECIPES", "TrainConfig", "make_configs", "train", "evaluate", "estimate_loss", "CHECKPOINT", "METRICS", "LOSS_PLOT"]
