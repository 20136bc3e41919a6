"""pytest-benchmark's JSON as Markdown tables (results.md) and PNG plots.

    python -m bench.report RESULTS.json [--out DIR]

Two kinds of group:
- sweeps, whose entries carry ``path`` and an axis, ``block_size`` or ``v``, in ``extra_info`` (the
  WaveNet orders, generation, cross-entropy against V): one table with a row per axis value and a
  column per path, each cell the rate (positions or tokens per second, else calls per second), the
  speed-up over the group's baseline path at that axis value and the path's recorded shares (% of
  the matmul peak, % of the node-count ideal, of the copy bandwidth); and time per unit of work and
  speed-up against the axis, both on log scales, in a PNG.
- the rest: one table per group (median, spread, speed-up over the baseline entry, every
  ``extra_info`` field) and one horizontal bar panel per group in ``other.png``.

Sweep groups of one family (the group's first word; every generation group together) share one
PNG, a row of panels per group, so a run writes at most MAX_PNGS plots. Entries that were not
measured (``stats`` null: out of the time budget, or not available) are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

UNITS = [("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)]
RATES = ("positions_per_s", "tokens_per_s", "logits_per_s")  # the first one an entry records is its rate
SHARES = {"pct_of_matmul_peak": "% peak", "pct_of_node_ideal": "% ideal", "pct_of_copy_bandwidth": "% copy GB/s"}
AXES = {"block_size": "block size", "v": "V (classes)", "case": "case"}  # what a sweep's entries vary, in extra_info
HIDDEN_EXTRA = {"baseline"}  # shown through the speedup column instead
MAX_PNGS = 5  # a run's files: results.json, results.md and at most this many plots


def by_group(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """The measured entries by group, in the order the suites ran them."""
    groups: dict[str, list[dict]] = {}
    for bench in benchmarks:
        if bench.get("stats"):
            groups.setdefault(bench["group"] or bench["fullname"], []).append(bench)
    return groups


def axis(group: list[dict]) -> str | None:
    """The sweep's x key (one of AXES) if every entry has it and a ``path``, else None."""
    return next((key for key in AXES if all("path" in b["extra_info"] and key in b["extra_info"] for b in group)), None)


def numeric(group: list[dict]) -> bool:
    return all(isinstance(b["extra_info"][axis(group)], (int, float)) for b in group)


def family(name: str) -> str:
    """The PNG a sweep group is drawn in: generation groups together, else by the group's first word."""
    return "generation" if "generation" in name else slug(name.split()[0])


def rate(bench: dict) -> tuple[float, str]:
    """(work per second, its unit): the recorded rate, else calls per second."""
    extra = bench["extra_info"]
    for name in RATES:
        if name in extra:
            return extra[name], name.removesuffix("_per_s") + "/s"
    return 1.0 / bench["stats"]["median"], "calls/s"


def baseline(group: list[dict]) -> dict | None:
    """The entry the group's speed-ups are over: the one marked ``baseline``."""
    return next((b for b in group if b["extra_info"].get("baseline")), None)


def si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def unit_for(group: list[dict]) -> tuple[str, float]:
    """The time unit that shows the group's fastest median with no leading zeros, and its scale."""
    seconds = min(b["stats"]["median"] for b in group)
    return next(((name, scale) for name, scale in UNITS if seconds >= scale), UNITS[-1])


class Sweep:
    """A sweep group seen as a grid: its axis, its paths (columns), its axis values (rows) and the baseline path."""

    def __init__(self, group: list[dict]):
        self.x = axis(group)
        self.paths = list(dict.fromkeys(b["extra_info"]["path"] for b in group))
        self.sizes = list(dict.fromkeys(b["extra_info"][self.x] for b in group))
        if numeric(group):
            self.sizes.sort()
        self.cell = {(b["extra_info"]["path"], b["extra_info"][self.x]): b for b in group}
        marked = baseline(group)
        self.base = marked["extra_info"]["path"] if marked else None
        self.unit = rate(group[0])[1]

    def speedup(self, path: str, size) -> float | None:
        """The rate of ``path`` over the baseline's at ``size``, where both were measured."""
        if path == self.base or (self.base, size) not in self.cell or (path, size) not in self.cell:
            return None
        return rate(self.cell[path, size])[0] / rate(self.cell[self.base, size])[0]


def sweep_table(name: str, group: list[dict], level: int = 2) -> list[str]:
    s = Sweep(group)
    over = f", speed-up over `{s.base}` at the same {AXES[s.x]}" if s.base else ""
    lines = [
        "",
        f"{'#' * level} {name}",
        "",
        f"Each cell: {s.unit} (± the interquartile range over the median){over}, and the recorded shares.",
        "",
        f"| {AXES[s.x]} | " + " | ".join(s.paths) + " |",
        "|---|" + "---|" * len(s.paths),
    ]
    for size in s.sizes:
        row = [str(size)]
        for path in s.paths:
            bench = s.cell.get((path, size))
            if bench is None:
                row.append("–")
                continue
            extra = bench["extra_info"]
            parts = [si(rate(bench)[0]) + (f" ±{extra['spread_pct']:g}%" if "spread_pct" in extra else "")]
            speedup = s.speedup(path, size)
            if speedup is not None:
                parts.append(f"{speedup:.2f}×")
            parts += [f"{extra[k]:g}{label}" for k, label in SHARES.items() if k in extra]
            row.append(" · ".join(parts))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def label(bench: dict, group: list[dict]) -> str:
    """The parameters that tell this entry apart from the rest of its group, else its name."""
    varying = [k for k in bench.get("params") or {} if len({str(b["params"].get(k)) for b in group}) > 1]
    return ", ".join(str(bench["params"][k]) for k in varying) or bench["name"]


def plain_table(name: str, group: list[dict], level: int = 2) -> list[str]:
    base = baseline(group) or max(group, key=lambda b: b["stats"]["median"])
    unit, scale = unit_for(group)
    extras = list(dict.fromkeys(k for b in group for k in b["extra_info"] if k not in HIDDEN_EXTRA))
    header = ["", f"median ({unit})", f"min ({unit})", f"mean ± sd ({unit})", "rounds"]
    header += [f"speedup vs {label(base, group)}", *extras]
    lines = ["", f"{'#' * level} {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
    return lines


def tables(groups: dict[str, list[dict]], level: int = 2) -> list[str]:
    """A table per group, its heading at Markdown ``level``: a sweep's grid, else one row per entry."""
    lines = []
    for name, group in groups.items():
        lines += (sweep_table if axis(group) else plain_table)(name, group, level)
    return lines


def sweep_plot(named: list[tuple[str, list[dict]]], path: Path) -> None:
    """One row per group: time per unit of work and speed-up over the baseline against the sweep's axis, log-log."""
    fig, rows = plt.subplots(len(named), 2, figsize=(11, 4.2 * len(named)), squeeze=False)
    for (name, group), (time_ax, speed_ax) in zip(named, rows):
        s = Sweep(group)
        unit = s.unit.removesuffix("/s").rstrip("s")
        for i, p in enumerate(s.paths):
            color = f"C{i}"  # one colour per path in both panels
            sizes = [size for size in s.sizes if (p, size) in s.cell]
            time_ax.plot(sizes, [1e6 / rate(s.cell[p, size])[0] for size in sizes], "o-", color=color, label=p)
            pairs = [(size, s.speedup(p, size)) for size in sizes if s.speedup(p, size) is not None]
            if pairs:
                speed_ax.plot(*zip(*pairs), "o-", color=color, label=p)
        ideals = {b["extra_info"][s.x]: b["extra_info"]["node_ideal"] for b in group if "node_ideal" in b["extra_info"]}
        if ideals:
            speed_ax.plot(*zip(*sorted(ideals.items())), "k--", label="node-count ideal (B-1)/log2 B")
        for ax in (time_ax, speed_ax):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(AXES[s.x])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        time_ax.set_ylabel(f"µs per {unit}")
        time_ax.set_title(f"{name}: time per {unit}", fontsize=10)
        speed_ax.set_ylabel(f"speed-up over {s.base}")
        speed_ax.set_title(f"{name}: speed-up over {s.base}", fontsize=10)
    save(fig, path)


def bar_plot(groups: dict[str, list[dict]], path: Path) -> None:
    """One panel per group: median time per entry, whiskers from the first to the third quartile."""
    height = 1.2 + 0.5 * sum(len(g) + 1 for g in groups.values())
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, height), squeeze=False)
    for ax, (name, group) in zip(axes[:, 0], groups.items()):
        unit, scale = unit_for(group)
        medians = [b["stats"]["median"] / scale for b in group]
        below = [m - b["stats"]["q1"] / scale for m, b in zip(medians, group)]
        above = [b["stats"]["q3"] / scale - m for m, b in zip(medians, group)]
        ax.barh(range(len(group)), medians, xerr=[below, above], color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(group)), [label(b, group) for b in group])
        ax.invert_yaxis()
        ax.set_xlabel(f"median time per call ({unit})")
        ax.set_title(name, fontsize=10)
        for i, bench in enumerate(group):
            if "peak_mib" in bench["extra_info"]:
                peak = f"  peak {bench['extra_info']['peak_mib']:g} MiB"
                ax.annotate(peak, (medians[i] + above[i], i), va="center", fontsize=8)
        ax.margins(x=0.3)
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: Path, out: Path, note: str = "") -> list[Path]:
    """results.md and the PNGs (at most MAX_PNGS) for ``results`` in ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(results.read_text())
    groups = by_group(data["benchmarks"])
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
        f"Python {machine.get('python_version', '?')}. {note}".rstrip(),
    ]
    lines += tables(groups)
    families: dict[str, list[tuple[str, list[dict]]]] = {}
    for name, group in groups.items():
        if axis(group) and numeric(group):
            families.setdefault(family(name), []).append((name, group))
    others = {name: group for name, group in groups.items() if not axis(group)}
    written = [out / "results.md"]
    for fam, named in list(families.items())[: MAX_PNGS - (1 if others else 0)]:
        sweep_plot(named, out / f"{fam}.png")
        lines += ["", f"![{fam}]({fam}.png)"]
        written.append(out / f"{fam}.png")
    if others:
        bar_plot(others, out / "other.png")
        lines += ["", "![other groups](other.png)"]
        written.append(out / "other.png")
    not_measured = [b for b in data["benchmarks"] if not b.get("stats")]
    if not_measured:
        lines += ["", "## Not measured", ""]
        lines += [f"- {b['fullname']}: {b['extra_info'].get('skipped', '?')}" for b in not_measured]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="python -m bench's results.json, or pytest's --benchmark-json")
    parser.add_argument("--out", type=Path, help="folder for results.md and the PNGs (default: beside RESULTS)")
    args = parser.parse_args(argv)
    for path in write(args.results, args.out or args.results.parent):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
