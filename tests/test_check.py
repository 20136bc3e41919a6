"""``python -m makemore.check``: every order against the reference, a table, exit 1 on any failure."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from makemore import check, reference

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "wavenet": ["--model", "wavenet", "--block-size", "8", "--n-embd", "4", "--n-hidden", "6"],
    "gated": [
        "--model",
        "gated",
        "--n-levels",
        "3",
        "--stacks",
        "2",
        "--n-embd",
        "4",
        "--n-hidden",
        "4",
        "--n-skip",
        "5",
    ],
}


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("model", ["wavenet", "gated"])
def test_every_order_passes_in_every_dtype(model, dtype, capsys):
    assert check.main(SMALL[model] + ["--dtype", dtype, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(("pass", "FAIL"))]
    orders = {line[:28].strip() for line in rows}
    expected = {"windows (window batch)", "windows", "conv", "cached steps"} | (
        {"per position (lecture loop)", "conv1d"} if model == "wavenet" else {"per window (loop)"}
    )
    assert orders == expected
    assert len(rows) == (10 if model == "wavenet" else 9) and all(line.endswith("pass") for line in rows)
    assert f"{len(rows)} of {len(rows)} passed" in out and f"math mode {dtype}" in out
    tol = check.TOLERANCES[dtype]
    assert f"{tol.logits:.0e} / {tol.loss:.0e} / {tol.grad:.0e}" in out


def test_a_disagreement_fails_with_exit_1(monkeypatch, capsys):
    """A reference with another BatchNorm eps: every row's numbers move past the float64 bounds."""
    monkeypatch.setattr(reference, "EPS", 1e-3)
    assert check.main(SMALL["wavenet"] + ["--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: per position (lecture loop) (eval)" in out


def test_bad_flags_are_one_line_errors(capsys):
    assert check.main(["--model", "wavenet", "--block-size", "6"]) == 2
    assert capsys.readouterr().err.strip() == (
        "makemore.check: error: --block-size must be a power of two >= 2 for the wavenet "
        "(the tree halves the window at each level), got 6"
    )
    assert check.main(["--model", "gated", "--block-size", "8"]) == 2
    assert "the gated model has no --block-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check.main(["--model", "mlp"])


def test_the_module_runs_as_a_command():
    done = subprocess.run(
        [sys.executable, "-m", "makemore.check", *SMALL["gated"], "--dtype", "float64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "9 of 9 passed" in done.stdout


def test_on_the_device(device, capsys):
    """The path bench/gpu.sh runs on a lent GPU: float32, and a statement of whether TF32 was on."""
    assert check.main(SMALL["gated"] + ["--device", device, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert ("TF32: " in out) == device.startswith("cuda")


def test_the_reference_shares_no_code_with_the_models():
    """makemore/reference.py imports torch and the standard library only:
    an error in the models' code cannot be in it too."""
    tree = ast.parse(Path(reference.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] if node.level == 0 else "."
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert imported <= {"torch", "math", "contextlib", "dataclasses"}, imported
