"""The suites: what ``python -m bench`` runs within one budget, and bench/gpu.py's steps of the same names.

Every suite is called one way, ``suite(device, budget_s, quick=quick) -> list[dict]``: entries in
pytest-benchmark's JSON shape (bench/timing.py's ``record``; ``skipped`` for a cell the budget did
not reach) that bench/report.py turns into tables and plots. ``quick``: tiny sizes, one or two
rounds, every cell once whatever the budget (a smoke run; its figures mean nothing).
"""

from bench import bench_cross_entropy, bench_gated, bench_train, bench_wavenet

# name: (the suite, its share of python -m bench's budget; each stops where its share runs out)
SUITES = {
    "orders": (bench_wavenet.orders, 0.35),
    "generation": (bench_wavenet.generation, 0.10),
    "gated": (bench_gated.sweep, 0.15),
    "cross-entropy": (bench_cross_entropy.sweep, 0.15),
    "train": (bench_train.sweep, 0.25),
}
