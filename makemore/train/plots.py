"""The run's loss.png: training and validation loss against steps and against training time."""

import json
from pathlib import Path

import torch

POINTS = 200  # buckets of the training curve, whatever the run's length


def plot_losses(losses: torch.Tensor, times: torch.Tensor, metrics: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bucket = max(1, len(losses) // POINTS)
    n = len(losses) // bucket * bucket or len(losses)
    bucket = min(bucket, n)
    train = losses[:n].view(-1, bucket).mean(1)
    steps = torch.arange(bucket, n + 1, bucket)  # the step that ends each bucket
    seconds = times[:n].view(-1, bucket)[:, -1]
    evals = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    val = [(r["step"], r["time"], r["estimate"]["val"]) for r in evals if "estimate" in r and "val" in r["estimate"]]
    final = [(r["step"], r["time"], r["final"]["val"]) for r in evals if "final" in r and "val" in r["final"]]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x_train, column, label in ((axes[0], steps, 0, "step"), (axes[1], seconds, 1, "training time (s)")):
        ax.plot(x_train, train, label=f"train (mean of {bucket} steps)" if bucket > 1 else "train")
        if val:
            ax.plot([v[column] for v in val], [v[2] for v in val], "o-", ms=3, label="val (estimate)")
        if final:
            ax.plot(
                [v[column] for v in final], [v[2] for v in final], "r*", ms=10, label=f"val (final) {final[-1][2]:.4f}"
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per character)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
