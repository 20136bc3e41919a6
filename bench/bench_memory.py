"""Peak memory and time of makemore on large text files, for both kinds of data.

    python -m bench.bench_memory                      # 100 MB per kind, every setting at its default
    python -m bench.bench_memory --mb 4 20 --then --eval-max-tokens 20000 --json out.json  # train only, and its flags
    python -m bench.bench_memory --pipeline lines FILE    # the data pipeline alone, in this process: JSON on stdout

For each kind and size it writes a file into a temporary directory (stream: tinyshakespeare
repeated, ASCII; lines: names.txt repeated, about 14.7 million names in 100 MB), then runs each
of these in a fresh process:

    python -m bench.bench_memory --pipeline KIND FILE   the data pipeline alone (below)
    makemore train --data FILE --kind KIND --max-steps 50 --out RUN --quiet   (prints 20 samples)
    makemore eval --out RUN
    makemore sample --out RUN --unique                                       (lines: skips training items)

and reports each one's peak resident memory (the child's own ru_maxrss, from wait4) and wall time.
The data pipeline is what grows with the data: the file loaded (``load_s``), a batch in each layout,
every split's evaluation batches up to 500,000 targets (``eval_batches_s``) and, for lines, the
training items' set for ``--unique``; ``grown_mib`` is its peak above what the process held before
loading (torch's own start-up excluded). The final evaluation covers at most --eval-max-tokens
targets per split (default 500,000), whatever the file's size. With two sizes or more it also
reports the growth of peak memory per MB of data. Not a suite of ``python -m bench``:
tests/test_memory.py runs the pipeline at two sizes and this script once at a small one.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import makemore

DATA = Path(makemore.__file__).resolve().parent / "data"
EVAL_TARGETS = 500_000  # per split, as --eval-max-tokens' default


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


def status_mib(field: str) -> float:
    """``VmRSS`` (held now) or ``VmHWM`` (the peak of this program, from its exec on) in MiB, from /proc (Linux);
    elsewhere the process's ru_maxrss, which also counts the parent's peak when this process started."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pipeline(path: Path, kind: str) -> dict:
    """The data pipeline on ``path`` in this process: seconds loading and batching for evaluation, and the
    peak memory above what the process held before loading, in MiB."""
    import torch

    from makemore.data import load_source

    torch.zeros(1) + 1  # torch's own start-up allocations, before the baseline
    before = status_mib("VmRSS")
    started = time.perf_counter()
    source = load_source(str(path), kind)
    load_s = time.perf_counter() - started
    g = torch.Generator().manual_seed(0)
    for layout in ("windows", "sequences"):
        source.batch("train", 32, layout, 8, g, 64)
    started = time.perf_counter()
    for split in source.splits:
        sum(int(b.targets.numel()) for b in source.eval_batches(split, 8, 1 << 15, EVAL_TARGETS))
    eval_batches_s = time.perf_counter() - started
    if kind == "lines":
        train = source.item_set("train")
        assert train._item(0) in train
    return {"load_s": load_s, "eval_batches_s": eval_batches_s, "grown_mib": status_mib("VmHWM") - before}


def run(command: list[str], workdir: Path) -> dict:
    """``command`` in a fresh process: its peak RSS (MiB), wall time and, where it prints JSON, that. A child's
    ru_maxrss is at least what its parent held when it started (Linux keeps the peak across exec), so this
    process stays small: it never imports torch."""
    out, log = workdir / "stdout.txt", workdir / "stderr.log"
    started = time.perf_counter()
    with open(out, "w") as stdout, open(log, "w") as err:  # files, not pipes: wait4 must reap the child itself
        child = subprocess.Popen(command, stdout=stdout, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}: {log.read_text().strip()[-2000:]}")
    result = {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}  # ru_maxrss: KiB on Linux
    text = out.read_text().strip()
    return {**result, **json.loads(text)} if text.startswith("{") else result


def measure(kind: str, mb: float, workdir: Path, max_steps: int, then: list[str], train_args: list[str]) -> list[dict]:
    """The data pipeline, then train, evaluate and (lines) sample with --unique, on a ``mb`` MB file of ``kind``."""
    path = workdir / f"{kind}-{mb:g}mb.txt"
    lines = write_file(kind, mb, path)
    out = workdir / f"run-{kind}-{mb:g}"
    argvs = {
        "train": ["train", "--data", str(path), "--kind", kind, "--max-steps", str(max_steps), "--out", str(out)],
        "eval": ["eval", "--out", str(out)],
        "sample": ["sample", "--out", str(out), "--unique"] if kind == "lines" else None,  # text has no items to skip
    }
    argvs["train"] += ["--quiet", "--force", *train_args]
    file = {"kind": kind, "mb": mb, "lines": lines}
    pipe = [sys.executable, "-m", "bench.bench_memory", "--pipeline", kind, str(path)]
    results = [{**file, "what": "pipeline", "command": "data pipeline", **run(pipe, workdir)}]
    for c in ["train", *then]:
        if argvs[c] is not None:
            measured = run([sys.executable, "-m", "makemore", *argvs[c]], workdir)
            results.append({**file, "what": c, "command": "makemore " + " ".join(argvs[c]), **measured})
    path.unlink()
    return results


def summary(r: dict) -> str:
    grown = f", {r['grown_mib']:.0f} MiB above its start" if "grown_mib" in r else ""
    phases = "".join(f", {name[:-2]} {r[name]:.1f} s" for name in ("load_s", "eval_batches_s") if name in r)
    return f"peak {r['peak_rss_mib']:.0f} MiB{grown}, {r['wall_s']:.1f} s{phases}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[100.0], help="file sizes in MB (default: 100)")
    parser.add_argument("--kinds", nargs="+", choices=["stream", "lines"], default=["stream", "lines"])
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument(
        "--then", nargs="*", choices=["eval", "sample"], default=["eval", "sample"], help="commands run after train"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--pipeline", nargs=2, metavar=("KIND", "FILE"), help="the data pipeline alone, here")
    args, train_args = parser.parse_known_args(argv)  # anything else goes to makemore train: --eval-max-tokens 20000
    if args.pipeline:
        kind, path = args.pipeline
        print(json.dumps(pipeline(Path(path), kind)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="makemore-memory-") as tmp:
        for kind in args.kinds:
            for mb in args.mb:
                for r in measure(kind, mb, Path(tmp), args.max_steps, args.then, train_args):
                    results.append(r)
                    print(f"{kind} {mb:g} MB: {r['what']}: {summary(r)}", flush=True)
    growth = {}
    for kind in args.kinds:
        for what in ("pipeline", "train"):
            peaks = sorted((r["mb"], r["peak_rss_mib"]) for r in results if r["kind"] == kind and r["what"] == what)
            if len(peaks) >= 2:
                rate = growth.setdefault(kind, {})[what] = (peaks[-1][1] - peaks[0][1]) / (peaks[-1][0] - peaks[0][0])
                print(f"{kind}: {what}'s peak grows {rate:.2f} MiB per MB of data")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "growth_mib_per_mb": growth}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
