"""Memory that grows with the data stays small: data loaded, batched, evaluated and (lines) indexed for
``--unique`` in fresh processes, at two sizes, so that what is fixed cancels out.

bench/bench_memory.py measures the whole commands on 100 MB per kind with every default (figures
in docs/data.md); a whole command's peak at CI's sizes is mostly the model, the optimiser and
matplotlib, so this measures the data pipeline alone (the bench's ``--pipeline``), and runs the
bench script once at 1 MB so that it cannot rot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "makemore" / "data"


def write(path: Path, source: Path, mb: int) -> Path:
    text = source.read_bytes()
    whole = text * (mb * 2**20 // len(text) + 1)
    path.write_bytes(whole[: whole.rfind(b"\n", 0, mb * 2**20) + 1])
    return path


def peak_mib(path: Path, kind: str) -> float:
    """The data pipeline's peak memory above what its fresh process held before loading, MiB."""
    command = [sys.executable, "-m", "bench.bench_memory", "--pipeline", kind, str(path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["grown_mib"]


# Limits in MiB per MB of data, between what the pipeline holds and what reading whole files would (docs/data.md
# has the figures).
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS and VmHWM from /proc (Linux)")
@pytest.mark.parametrize(
    "kind, source, limit",
    [
        # Token ids: 1 byte per character. Reading the text whole (bytes, then a str) holds 2 or more.
        ("stream", DATA / "tinyshakespeare.txt", 1.5),
        # Ids, 4 bytes per item (7 characters) kept and 12 while building, 8 more for --unique's keys.
        # A list of str per item and every window materialised hold tens.
        ("lines", DATA / "names.txt", 6.0),
    ],
)
def test_the_data_pipeline_grows_by_a_few_bytes_per_byte_of_data(tmp_path, kind, source, limit):
    small, large = (peak_mib(write(tmp_path / f"{mb}.txt", source, mb), kind) for mb in (8, 32))
    assert (large - small) / 24 < limit, (small, large)


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="the bench reads a child's peak memory from wait4 (Linux, macOS)")
def test_the_memory_bench_runs(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, "-m", "bench.bench_memory", "--mb", "1", "--kinds", "lines", "--max-steps", "2"]
    command += ["--eval-max-tokens", "2000", "--samples", "0", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["results"]
    assert [r["what"] for r in runs] == ["pipeline", "train", "eval", "sample"]
    assert all(r["peak_rss_mib"] > 0 and r["wall_s"] > 0 for r in runs)
    assert runs[0]["load_s"] > 0 and runs[0]["eval_batches_s"] > 0 and runs[0]["grown_mib"] > 0
    assert runs[1]["command"].startswith("makemore train --data ") and "--eval-max-tokens 2000" in runs[1]["command"]
