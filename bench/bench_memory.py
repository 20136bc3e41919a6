"""Peak memory and time of makemore on large text files, for both kinds of data.

    python -m bench.bench_memory                      # 100 MB per kind, every setting at its default
    python -m bench.bench_memory --mb 4 20 --then --eval-max-tokens 20000 --json out.json   # train only; other flags go to train

For each kind and size it writes a file into a temporary directory (stream: tinyshakespeare
repeated, ASCII; lines: names.txt repeated, about 14.7 million names in 100 MB), then runs each
command in a fresh process:

    makemore train --data FILE --kind KIND --max-steps 50 --out RUN --quiet   (prints 20 samples)
    makemore eval --out RUN
    makemore sample --out RUN --unique                                       (lines: skips training items)

and reports each one's peak resident memory (the child's own ru_maxrss, from wait4; with
``--device cuda`` among the train flags, also the most GPU memory held at once, ``cuda_peak_mib``),
its wall time, and the seconds it spent loading the data and in the final evaluation. The final
evaluation covers at most --eval-max-tokens targets per split (default 500,000), whatever the
file's size. With two sizes or more it also reports the growth of peak memory per MB of data.
Not a pytest suite (``python -m bench`` skips it): tests/test_memory.py runs it at small sizes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import makemore

DATA = Path(makemore.__file__).resolve().parent / "data"

# Runs one makemore command, timing the data loading and the final evaluation wherever the command calls them.
DRIVER = """
import json, sys, time
import makemore.cli as cli, makemore.train.loop as loop
phases = {}
def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return wrapper
loop.load_source = cli.load_source = timed("load_s", cli.load_source)
loop.evaluate = cli.evaluate = timed("evaluate_s", cli.evaluate)
code = cli.main(sys.argv[2:])
import torch
if torch.cuda.is_initialized():  # --device cuda: the most GPU memory the command held at once
    phases["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
with open(sys.argv[1], "w") as f:
    json.dump(phases, f)
sys.exit(code)
"""


def write_file(kind: str, mb: float, path: Path) -> int:
    """``mb`` megabytes of text of ``kind`` at ``path``; the number of lines."""
    source = (DATA / ("tinyshakespeare.txt" if kind == "stream" else "names.txt")).read_bytes()
    size = int(mb * 2**20)
    with open(path, "wb") as f:
        for _ in range(size // len(source)):
            f.write(source)
        rest = source[: size % len(source)]
        f.write(rest[: rest.rfind(b"\n") + 1])  # whole lines only
    return path.read_bytes().count(b"\n")


def run(argv: list[str], workdir: Path) -> dict:
    """``makemore ARGV`` in a fresh process: its peak RSS (MiB), wall time and phase times (seconds)."""
    phases, log = workdir / "phases.json", workdir / "stderr.log"
    phases.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "w") as err:  # a file, not a pipe: wait4 must reap the child itself, to get its own usage
        child = subprocess.Popen([sys.executable, "-c", DRIVER, str(phases), *argv], stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"makemore {' '.join(argv)} exited with {child.returncode}: {log.read_text().strip()[-2000:]}")
    result = {"command": "makemore " + " ".join(argv), "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}  # ru_maxrss: KiB on Linux
    result.update(json.loads(phases.read_text()) if phases.exists() else {})
    return result


def measure(kind: str, mb: float, workdir: Path, max_steps: int, commands: list[str], train_args: list[str]) -> list[dict]:
    """Train, then evaluate and (lines) sample with --unique, on a ``mb`` MB file of ``kind``."""
    path = workdir / f"{kind}-{mb:g}mb.txt"
    lines = write_file(kind, mb, path)
    out = workdir / f"run-{kind}-{mb:g}"
    argvs = {
        "train": ["train", "--data", str(path), "--kind", kind, "--max-steps", str(max_steps), "--out", str(out), "--quiet", "--force", *train_args],
        "eval": ["eval", "--out", str(out)],
        "sample": ["sample", "--out", str(out), "--unique"] if kind == "lines" else None,  # text has no items to skip
    }
    results = [{"kind": kind, "mb": mb, "lines": lines, **run(argvs[c], workdir)} for c in ["train", *commands] if argvs[c] is not None]
    path.unlink()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[100.0], help="file sizes in MB (default: 100)")
    parser.add_argument("--kinds", nargs="+", choices=["stream", "lines"], default=["stream", "lines"])
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--then", nargs="*", choices=["eval", "sample"], default=["eval", "sample"], help="commands run after train")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, train_args = parser.parse_known_args(argv)  # anything else goes to makemore train, e.g. --eval-max-tokens 20000
    results = []
    with tempfile.TemporaryDirectory(prefix="makemore-memory-") as tmp:
        for kind in args.kinds:
            for mb in args.mb:
                for result in measure(kind, mb, Path(tmp), args.max_steps, args.then, train_args):
                    results.append(result)
                    phases = "".join(f", {name[:-2]} {result[name]:.1f} s" for name in ("load_s", "evaluate_s") if name in result)
                    print(f"{kind} {mb:g} MB: {result['command'].split()[1]}: peak {result['peak_rss_mib']:.0f} MiB, {result['wall_s']:.1f} s{phases}"
                          + (f", GPU peak {result['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in result else ""), flush=True)
    growth = {}
    for kind in args.kinds:
        train = sorted((r["mb"], r["peak_rss_mib"]) for r in results if r["kind"] == kind and r["command"].split()[1] == "train")
        if len(train) >= 2:
            growth[kind] = (train[-1][1] - train[0][1]) / (train[-1][0] - train[0][0])
            print(f"{kind}: train's peak grows {growth[kind]:.2f} MiB per MB of data")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "growth_mib_per_mb": growth}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
