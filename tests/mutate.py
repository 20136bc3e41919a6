"""The mutation check: small, named changes to the source that the test suite must catch.

    python tests/mutate.py           # every mutation; exit 1 if one survives or a snippet is gone
    python tests/mutate.py --list    # their names, files and the tests meant to catch each
    python tests/mutate.py NAME ...  # only these

Each mutation replaces one expression or statement inside one function of one file, found by its
syntax tree (so a formatter pass or an edited comment cannot move it; it must occur exactly once in
that function), in a fresh copy of the repository in a temporary directory (the working tree is
never written), then runs only the
tests named for it there (pytest -x, CPU cases, the "ci" hypothesis profile; the Triton kernel's
under TRITON_INTERPRET=1). A mutation is killed when a test fails; a copy whose tests cannot be
collected, or whose named tests are not found, is an error, not a kill. First the same tests run
on an unmutated copy and must pass, so that a kill means the mutation, not a broken test.
A mutation whose code is no longer in its function stops the check with its name: the source moved
on and the mutation must be rewritten to match it.
"""

import argparse
import ast
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = importlib.import_module("torch")  # imported once here, before the forks (see Job)

ROOT = Path(__file__).resolve().parents[1]
JOBS = min(4, os.cpu_count() or 1)  # mutations tested side by side
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", "runs", "docs", ".hypothesis", "__pycache__", ".pytest_cache", "*.egg-info", ".benchmarks"
)

EQ = "tests/test_equivalence.py::"
GATED = "tests/test_gated.py::"
WAVENET_8 = EQ + "test_every_order_is_the_reference_in_eval_and_training_mode[cpu-block8-f64]"
WAVENET_64 = EQ + "test_every_order_is_the_reference_in_eval_and_training_mode[cpu-block64-f64]"
GATED_3 = GATED + "test_every_order_is_the_reference[cpu-levels3x1-f64]"
GATED_STACKS = GATED + "test_every_order_is_the_reference[cpu-levels4x2-f64]"
CE = "tests/test_cross_entropy.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    scope: str  # the function that holds the code: "name" or "Class.method"
    old: str  # a Python expression or statement, found by its syntax tree: formatting and comments do not matter
    new: str  # the source that takes its place
    tests: tuple[str, ...]
    interpret: bool = False  # run the tests with TRITON_INTERPRET=1 (Triton kernels on the CPU)


M = Mutation
MUTATIONS = [
    # The lecture's WaveNet, each order.
    M(
        "wavenet conv: children swapped",
        "makemore/models/wavenet.py",
        "WaveNet._dilated_mix",
        "torch.cat([x[:, :-d], x[:, d:]], dim=-1)",
        "torch.cat([x[:, d:], x[:, :-d]], dim=-1)",
        (WAVENET_8,),
    ),
    M(
        "wavenet conv1d: taps swapped",
        "makemore/models/wavenet.py",
        "WaveNet._dilated_mix",
        "block.conv_weight()",
        "block.conv_weight().flip(-1)",
        (WAVENET_8,),
    ),
    M(
        "wavenet windows: padding counted in BatchNorm",
        "makemore/models/wavenet.py",
        "WaveNet._walk",
        "mask = None if valid is None else valid.reshape(-1, 1).expand(y.shape[:-1])",
        "mask = None",
        (WAVENET_8,),
    ),
    M(
        "wavenet conv: node mask misses left children",
        "makemore/models/wavenet.py",
        "WaveNet._node_masks",
        "torch.cat([masks[-1], pad], 1) | torch.cat([pad, masks[-1]], 1)",
        "torch.cat([masks[-1], pad], 1)",
        (WAVENET_8,),
    ),
    M(
        "wavenet cached: eps dropped from folded BatchNorm",
        "makemore/models/wavenet.py",
        "TreeBlock.folded",
        "torch.sqrt(bn.running_var + bn.eps)",
        "torch.sqrt(bn.running_var)",
        (WAVENET_8,),
    ),
    M(
        "cached steps: ring slot off by one",
        "makemore/models/base.py",
        "Rings.swap",
        "torch.remainder(self.pos, ring.shape[1])",
        "torch.remainder(self.pos + 1, ring.shape[1])",
        (WAVENET_8, GATED_3),
    ),
    # The lecture's layers: shared by every order, caught only by the reference.
    M("BatchNorm: eps 1e-3 in every order", "makemore/nn.py", "BatchNorm1d.__init__", "1e-5", "1e-3", (WAVENET_8,)),
    M(
        "BatchNorm masked: biased variance",
        "makemore/nn.py",
        "BatchNorm1d._batch_stats",
        "((x - mean).square() * w).sum(dims) / (n - 1).clamp_min(1)",
        "((x - mean).square() * w).sum(dims) / n",
        (WAVENET_8,),
    ),
    M(
        "fused BatchNorm masked: biased variance",
        "makemore/nn.py",
        "_BatchNormTanh.forward",
        "(weights.T @ xc.square()).squeeze(0) / (n - 1).clamp_min(1)",
        "(weights.T @ xc.square()).squeeze(0) / n",
        (EQ + "test_every_order_is_the_reference_in_eval_and_training_mode[cpu-block8-fused-f64]",),
    ),
    # The gated WaveNet, each order.
    M(
        "gated conv: filter taps swapped",
        "makemore/models/gated.py",
        "_DilatedGated.forward",
        "torch.addmm(bias.to(dtype), xc[:-d], w[:C]).addmm_(xc[d:], w[C:])",
        "torch.addmm(bias.to(dtype), xc[:-d], w[:C]).addmm_(xc[d:], w[:C])",
        (GATED_3,),
    ),
    M(
        "gated conv backward: residual dropped",
        "makemore/models/gated.py",
        "_DilatedGated.backward",
        "dx[d:] += dx_next",
        "pass",
        (GATED_3,),
    ),
    M(
        "gated windows: children swapped in the tree",
        "makemore/models/gated.py",
        "GatedWaveNet._walk",
        "layer.gate(x[0::2], right)",
        "layer.gate(right, x[0::2])",
        (GATED_STACKS,),
    ),
    M(
        "gated: dilation schedule rotated",
        "makemore/models/gated.py",
        "GatedWaveNet.__init__",
        "2 ** (k % config.n_levels)",
        "2 ** ((k + 1) % config.n_levels)",
        (GATED_3,),
    ),
    M(
        "gated cached: children swapped",
        "makemore/models/gated.py",
        "GatedWaveNet.step",
        "layer.gate(cache.swap(i, x), x)",
        "layer.gate(x, cache.swap(i, x))",
        (GATED_3,),
    ),
    # The cross-entropy: fallback, dispatch, Triton kernel (interpreted).
    M(
        "cross-entropy fallback: ignored rows keep their gradient",
        "kernels/_torch.py",
        "_row_weights",
        "torch.where(ignored, 0.0, scale)",
        "scale",
        (CE + "test_matches_torch[some-0.0-mean-7-65-torch]",),
    ),
    M(
        "cross-entropy auto: dispatch inverted",
        "kernels/loss.py",
        "pick_backend",
        '"aten" if numel < ATEN_BELOW and not inplace_grad else "torch"',
        '"torch" if numel < ATEN_BELOW and not inplace_grad else "aten"',
        (CE + "test_auto_on_cpu_takes_f_cross_entropy_below_the_crossover",),
    ),
    M(
        "cross-entropy Triton: loss sign",
        "kernels/_triton.py",
        "_forward_kernel",
        "(m - x_target) + log_d",
        "(x_target - m) + log_d",
        (CE + "test_matches_torch[some-0.0-mean-7-65-triton]",),
        interpret=True,
    ),
    M(
        "cross-entropy Triton: gradient of ignored rows",
        "kernels/_triton.py",
        "_grad",
        "g * weight[:, None]",
        "g * tl.where(weight[:, None] == 0, 1.0, weight[:, None])",
        (CE + "test_matches_torch[some-0.0-mean-7-65-triton]",),
        interpret=True,
    ),
    M(
        "cross-entropy Triton: flat block's gradient reads the wrong row's target",
        "kernels/_triton.py",
        "_grad_flat",
        "col == tl.gather(cls, row, 0)",
        "col == tl.gather(cls, tl.maximum(row - 1, 0), 0)",
        (CE + "test_matches_torch_on_a_full_batch[0.0-mean-65-triton]",),
        interpret=True,
    ),
    M(
        "cross-entropy Triton: mean over one target too many",
        "kernels/_triton.py",
        "_finish",
        "total / count.to(tl.float64)",
        "total / (count + 1).to(tl.float64)",
        (CE + "test_matches_torch[some-0.0-mean-7-65-triton]",),
        interpret=True,
    ),
    M(
        "cross-entropy Triton: in-place count misses the last target",
        "kernels/_triton.py",
        "_count_targets",
        "tl.load(target_ptr + rows * target_stride, mask=rows < n_rows, other=ignore_index)",
        "tl.load(target_ptr + rows * target_stride, mask=rows < n_rows - 1, other=ignore_index)",
        (CE + "test_float64_is_computed_in_float64[True-mean-27-triton]",),
        interpret=True,
    ),
    # The data windows and the training loop.
    M(
        "data: item's first character masked as padding",
        "makemore/data/batches.py",
        "LineSource.pairs",
        "context < self.starts[item].long()[:, None]",
        "context <= self.starts[item].long()[:, None]",
        ("tests/test_data.py::test_windows_match_the_lectures_character_loop",),
    ),
    M(
        "data: sequences lose the final boundary target",
        "makemore/data/batches.py",
        "_item_batch",
        "torch.arange(rows.shape[1] - R) > lengths[:, None]",
        "torch.arange(rows.shape[1] - R) >= lengths[:, None]",
        ("tests/test_data.py::test_sequence_batches_hold_exactly_the_windows",),
    ),
    M(
        "loop: accumulated gradients not averaged",
        "makemore/train/loop.py",
        "_train",
        "loss / config.grad_accum",
        "loss / 1",
        ("tests/test_train.py::test_gradient_accumulation_equals_the_step_on_the_concatenated_batch",),
    ),
]


class SnippetMissing(Exception):
    pass


def _shape(code: str) -> str:
    """The syntax tree of an expression or a single statement, without positions: what ``old`` is matched by."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        node = ast.parse(code.strip()).body[0]
    return ast.dump(node)


def _scope(tree: ast.AST, path: list[str]) -> ast.AST | None:
    """The function or class ``path`` names ("Class", "method"), or None."""
    for name in path:
        tree = next((n for n in ast.iter_child_nodes(tree) if getattr(n, "name", None) == name), None)
        if tree is None:
            return None
    return tree


def locate(source: str, m: Mutation) -> tuple[int, int]:
    """The byte span of ``source`` (UTF-8) that holds the one node of ``m.scope`` whose syntax tree is ``m.old``'s."""
    scope = _scope(ast.parse(source), m.scope.split("."))
    if scope is None:
        raise SnippetMissing(
            f"mutation {m.name!r}: {m.file} has no {m.scope}: rewrite the mutation for the current source"
        )
    want = _shape(m.old)
    found = [n for n in ast.walk(scope) if isinstance(n, (ast.expr, ast.stmt)) and ast.dump(n) == want]
    if len(found) != 1:
        where = "is not in" if not found else f"occurs {len(found)} times in"
        raise SnippetMissing(
            f"mutation {m.name!r}: {m.old!r} {where} {m.file}'s {m.scope}: rewrite the mutation for the current source"
        )
    starts = [0]
    for line in source.encode().splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    node = found[0]
    return starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset


def apply(repo: Path, m: Mutation) -> None:
    path = repo / m.file
    source = path.read_text() if path.is_file() else ""
    start, end = locate(source, m)
    data = source.encode()
    path.write_text((data[:start] + m.new.encode() + data[end:]).decode())


def fresh_copy(dest: Path) -> Path:
    """The repository's sources and tests under ``dest``; makemore.kernels resolves to the copy's kernels/
    (makemore/__init__.py finds it beside the package)."""
    repo = dest / "repo"  # dest/repo: the copies of parallel jobs live side by side
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE, symlinks=True)
    return repo


class Job:
    """pytest on ``tests`` in a copy, running. A forked child of this process, which has imported torch
    and pytest once already (a fresh interpreter spends seconds on that) and nothing of the project,
    so the child imports the copy's sources; a subprocess where there is no fork."""

    def __init__(self, repo: Path, tests, interpret: bool, tag=None):
        self.tag, self.began = tag, time.perf_counter()
        self.out = tempfile.TemporaryFile("w+")
        env = {
            "HYPOTHESIS_PROFILE": "ci",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "TRITON_INTERPRET": "1" if interpret else None,
        }
        args = ["-x", "-q", "-p", "no:cacheprovider", *tests]
        self.popen = None
        if not hasattr(os, "fork"):
            full = {k: v for k, v in {**os.environ, **env, "PYTHONPATH": str(repo)}.items() if v is not None}
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pytest", *args], cwd=repo, env=full, stdout=self.out, stderr=subprocess.STDOUT
            )
            return
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 3
            try:
                os.dup2(self.out.fileno(), 1)
                os.dup2(self.out.fileno(), 2)
                signal.alarm(600)
                for k, v in env.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                torch.set_num_threads(1)  # jobs run side by side, one per core
                os.chdir(repo)
                sys.path.insert(0, str(repo))
                import makemore.kernels  # noqa: F401 - the copy's, or this is no test of the mutation

                if not Path(makemore.kernels.__file__).resolve().is_relative_to(repo.resolve()):
                    raise SystemExit(f"mutate: the copy imported {makemore.kernels.__file__}, not its own sources")
                code = int(pytest.main(args))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        """pytest's exit code once it has finished, else None."""
        if self.popen is not None:
            return self.popen.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid else None

    def output(self) -> str:
        self.out.seek(0)
        text = self.out.read()
        self.out.close()
        return text


def run_all(jobs: list, limit: int):
    """Start the jobs (callables returning a Job), at most ``limit`` at a time; yield (Job, exit code) as each ends."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < limit:
            running.append(pending.pop(0)())
        for job in list(running):
            code = job.poll()
            if code is not None:
                running.remove(job)
                yield job, code
        time.sleep(0.05)


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return found[1] if found else "?"


def baseline(mutations) -> None:
    """The named tests pass on an unmutated copy that imports its own sources."""
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        repo = fresh_copy(Path(tmp))
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import makemore, makemore.kernels; print(makemore.__file__); print(makemore.kernels.__file__)",
            ],
            cwd=repo,
            env=dict(os.environ, PYTHONPATH=str(repo)),
            capture_output=True,
            text=True,
        )
        paths = probe.stdout.split()
        if (
            probe.returncode
            or len(paths) != 2
            or not all(Path(p).resolve().is_relative_to(Path(tmp).resolve()) for p in paths)
        ):
            raise SystemExit(
                "mutate: the copy does not import its own makemore "
                f"({probe.stdout.strip()} {probe.stderr.strip()[-300:]})"
            )
        groups = [
            (interpret, sorted({t for m in mutations if m.interpret == interpret for t in m.tests}))
            for interpret in (False, True)
        ]
        starts = [lambda i=i, t=t: Job(repo, t, i, tag=(i, t)) for i, t in groups if t]
        for job, code in run_all(starts, JOBS):
            interpret, tests = job.tag
            out = job.output()
            passed = re.search(r"(\d+) passed", out)
            if code != 0 or not passed or int(passed[1]) < len(tests) or re.search(r"skipped|deselected", out):
                raise SystemExit(
                    "mutate: the tests fail before any mutation "
                    f"({'TRITON_INTERPRET=1, ' if interpret else ''}exit {code}):\n{out[-4000:]}"
                )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}  [{m.file}, {m.scope}]  <- {', '.join(m.tests)}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"mutate: unknown mutation(s): {', '.join(sorted(unknown))} (see --list)", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:  # every snippet checked before anything runs
            repo = fresh_copy(Path(tmp))
            for m in chosen:
                apply(repo, m)
    except SnippetMissing as e:
        print(f"mutate: error: {e}", file=sys.stderr)
        return 1
    baseline(chosen)
    survived, errors = [], []
    print(f"mutate: the named tests pass unmutated ({time.perf_counter() - start:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:

        def start_job(i: int, m: Mutation) -> Job:
            repo = fresh_copy(Path(tmp) / str(i))
            apply(repo, m)
            return Job(repo, m.tests, m.interpret, tag=m)

        for job, code in run_all([lambda i=i, m=m: start_job(i, m) for i, m in enumerate(chosen)], JOBS):
            m, out, seconds = job.tag, job.output(), time.perf_counter() - job.began
            if code == 1:
                print(f"killed    {m.name}  by {first_failure(out)}  ({seconds:.0f} s)", flush=True)
            elif code == 0:
                survived.append(m.name)
                print(f"SURVIVED  {m.name}  ({', '.join(m.tests)} passed)", flush=True)
            else:  # 2: interrupted or not collected, 4: a test id not found, 5: nothing collected
                errors.append(m.name)
                print(f"ERROR     {m.name}  (pytest exit {code}: the tests did not run)\n{out[-3000:]}", flush=True)
    killed = len(chosen) - len(survived) - len(errors)
    print(
        f"mutate: {killed} of {len(chosen)} mutations killed in {time.perf_counter() - start:.0f} s"
        + (f"; survived: {', '.join(survived)}" if survived else "")
        + (f"; errors: {', '.join(errors)}" if errors else "")
    )
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    raise SystemExit(main())
