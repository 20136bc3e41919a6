"""Validation loss against training time for several runs, in one PNG.

    python -m bench.curves runs/lecture runs/fast --out docs/val_vs_time.png [--reference 1.993]
    python -m bench.curves runs/shakespeare-60s ... --out docs/shakespeare.png \
        --point "baby GPT (published, not run here)=66:1.886" --point "baby GPT (published, not run here)=160:1.63"

Reads each run's metrics.jsonl: the estimates logged every --eval-interval steps (random val
batches) as a line, the final exhaustive val loss as a star. Time is the training clock (steps
only: evaluation and checkpoints excluded), on a log axis so a 10-second and a 10-minute run
share one chart.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curve(run: Path) -> tuple[list[float], list[float], tuple[float, float] | None]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    points = [(r["time"], r["estimate"]["val"]) for r in records if "estimate" in r and r["time"] > 0]
    final = next(((r["time"], r["final"]["val"]) for r in reversed(records) if "final" in r), None)
    return [t for t, _ in points], [v for _, v in points], final


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--reference", type=float, help="a horizontal line, e.g. the lecture's val 1.993")
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="LABEL=SECONDS:VAL",
        help="a reference point, e.g. another model's published result (repeatable; one label, one marker)",
    )
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in args.runs:
        times, vals, final = curve(run)
        (line,) = ax.plot(times, vals, "-", lw=1.2, label=f"{run.name} (val estimates)")
        if final:
            label = f"{run.name} final val {final[1]:.4f} at {final[0]:.0f} s"
            ax.plot(*final, "*", ms=12, color=line.get_color(), label=label)
    points: dict[str, list[tuple[float, float]]] = {}
    for spec in args.point:
        label, _, at = spec.rpartition("=")
        seconds, _, val = at.partition(":")
        try:
            points.setdefault(label, []).append((float(seconds), float(val)))
        except ValueError:
            parser.error(f"--point {spec!r}: expected LABEL=SECONDS:VAL, e.g. 'baby GPT=66:1.886'")
    for label, xy in points.items():
        ax.plot(*zip(*xy), "D", ms=7, mfc="none", color="black", label=label)
    if args.reference:
        ax.axhline(args.reference, color="grey", ls="--", lw=1, label=f"reference {args.reference}")
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("val loss (nats per character)")
    ax.set_ylim(top=min(2.6, ax.get_ylim()[1]))
    ax.set_title(args.title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
