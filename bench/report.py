"""pytest-benchmark's JSON output as a Markdown table (results.md) and a plot (results.png).

    python -m bench.report RESULTS.json [--out DIR]

One table and one panel per benchmark group. Within a group each row shows the timing
statistics, its speed against the group's baseline (the entry whose extra_info says
``baseline: true``, else the slowest one), and every extra_info field the suite recorded
(peak memory and the like).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

UNITS = [("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)]
HIDDEN_EXTRA = {"baseline"}  # shown through the speedup column instead


def load(path: Path) -> tuple[dict[str, list[dict]], dict]:
    """Benchmarks by group, in the order the suite ran them, and the machine they ran on."""
    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"] or bench["fullname"], []).append(bench)
    return groups, data.get("machine_info", {})


def label(bench: dict, group: list[dict]) -> str:
    """The parameters that tell this entry apart from the rest of its group, else its name."""
    varying = [k for k in bench.get("params") or {} if len({str(b["params"].get(k)) for b in group}) > 1]
    return ", ".join(str(bench["params"][k]) for k in varying) or bench["name"]


def baseline(group: list[dict]) -> dict:
    marked = [b for b in group if b["extra_info"].get("baseline")]
    return marked[0] if marked else max(group, key=lambda b: b["stats"]["median"])


def unit_for(seconds: float) -> tuple[str, float]:
    return next((name, scale) for name, scale in UNITS if seconds >= scale)


def markdown(groups: dict[str, list[dict]], machine: dict) -> str:
    cpu = machine.get("cpu", {})
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
        f"Python {machine.get('python_version', '?')}. Times are per call; speedup is the baseline's "
        "median over this median.",
    ]
    for name, group in groups.items():
        base = baseline(group)
        unit, scale = unit_for(min(b["stats"]["median"] for b in group))
        extras = list(dict.fromkeys(k for b in group for k in b["extra_info"] if k not in HIDDEN_EXTRA))
        header = ["", f"median ({unit})", f"min ({unit})", f"mean ± sd ({unit})", "rounds", f"speedup vs {label(base, group)}"]
        lines += ["", f"## {name}", "", "| " + " | ".join(header + extras) + " |", "|" + "---|" * (len(header) + len(extras))]
        for bench in group:
            s = bench["stats"]
            cells = [
                label(bench, group),
                f"{s['median'] / scale:.3g}",
                f"{s['min'] / scale:.3g}",
                f"{s['mean'] / scale:.3g} ± {s['stddev'] / scale:.2g}",
                str(s["rounds"]),
                f"{base['stats']['median'] / s['median']:.2f}×",
            ] + [str(bench["extra_info"].get(k, "")) for k in extras]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: dict[str, list[dict]], path: Path) -> None:
    """One panel per group: median time per entry, whiskers from the first to the third quartile."""
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.5 * sum(len(g) + 1 for g in groups.values())), squeeze=False)
    for ax, (name, group) in zip(axes[:, 0], groups.items()):
        unit, scale = unit_for(min(b["stats"]["median"] for b in group))
        medians = [b["stats"]["median"] / scale for b in group]
        spread = [
            [m - b["stats"]["q1"] / scale for m, b in zip(medians, group)],
            [b["stats"]["q3"] / scale - m for m, b in zip(medians, group)],
        ]
        ax.barh(range(len(group)), medians, xerr=spread, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(group)), [label(b, group) for b in group])
        ax.invert_yaxis()
        ax.set_xlabel(f"median time per call ({unit})")
        ax.set_title(name, fontsize=10)
        for i, bench in enumerate(group):
            if "peak_mib" in bench["extra_info"]:
                end = medians[i] + spread[1][i]
                ax.annotate(f"  peak {bench['extra_info']['peak_mib']:g} MiB", (end, i), va="center", fontsize=8)
        ax.margins(x=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a pytest --benchmark-json file")
    parser.add_argument("--out", type=Path, help="folder for results.md and results.png (default: beside RESULTS)")
    args = parser.parse_args(argv)
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    groups, machine = load(args.results)
    (out / "results.md").write_text(markdown(groups, machine))
    plot(groups, out / "results.png")
    print(f"wrote {out / 'results.md'} and {out / 'results.png'}")


if __name__ == "__main__":
    main()
