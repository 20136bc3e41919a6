"""Memory that grows with the data stays small: data loaded, batched, evaluated and (lines) indexed for
``--unique`` in fresh processes, at two sizes, so that what is fixed cancels out.

bench/bench_memory.py measures the whole commands on 100 MB per kind with every default (figures
in the README); a whole command's peak at CI's sizes is mostly the model, the optimiser and
matplotlib, so this measures the data pipeline alone, and runs the bench script once at 1 MB so
that it cannot rot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "makemore" / "data"

# Peak RSS above what the process held before loading, in MiB: ru_maxrss is the peak of the whole
# process, VmRSS what it holds now.
PIPELINE = """
import json, resource, sys, torch
from makemore.data import load_source
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
path, kind = sys.argv[1], sys.argv[2]
torch.zeros(1) + 1  # torch's own start-up allocations, before the baseline
before = rss()
source = load_source(path, kind)
g = torch.Generator().manual_seed(0)
for layout in ("windows", "sequences"):
    source.batch("train", 32, layout, 8, g, 64)
for split in source.splits:
    sum(int(b.targets.numel()) for b in source.eval_batches(split, 8, 1 << 15, 500_000))
if kind == "lines":
    train = source.item_set("train")
    assert train._item(0) in train
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before))
"""


def write(path: Path, source: Path, mb: int) -> Path:
    text = source.read_bytes()
    whole = text * (mb * 2**20 // len(text) + 1)
    path.write_bytes(whole[: whole.rfind(b"\n", 0, mb * 2**20) + 1])
    return path


def peak_mib(path: Path, kind: str) -> float:
    result = subprocess.run([sys.executable, "-c", PIPELINE, str(path), kind], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
@pytest.mark.parametrize(
    "kind, source, limit",
    [
        # Token ids: 1 byte per character; measured 1.1. Reading the text whole (bytes, then a str): 2.0.
        ("stream", DATA / "tinyshakespeare.txt", 1.5),
        # Ids, 4 bytes per item (7 characters) kept and 12 while building, 8 more for --unique's
        # keys; measured 3.0-3.9. A list of str per item and every window materialised: 40.
        ("lines", DATA / "names.txt", 6.0),
    ],
)
def test_the_data_pipeline_grows_by_a_few_bytes_per_byte_of_data(tmp_path, kind, source, limit):
    small, large = (peak_mib(write(tmp_path / f"{mb}.txt", source, mb), kind) for mb in (8, 32))
    assert (large - small) / 24 < limit, (small, large)


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="the bench reads a child's own peak memory from wait4 (Linux, macOS)")
def test_the_memory_bench_runs(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, "-m", "bench.bench_memory", "--mb", "1", "--kinds", "lines", "--max-steps", "2", "--eval-max-tokens", "2000", "--samples", "0", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["results"]
    assert [r["command"].split()[1] for r in runs] == ["train", "eval", "sample"]
    assert all(r["peak_rss_mib"] > 0 and r["load_s"] > 0 for r in runs) and runs[0]["evaluate_s"] > 0
