"""Rerunning a test file's Triton cases in a fresh process that imports Triton with TRITON_INTERPRET=1.

The interpreter must be chosen before Triton is imported, and this process has imported it
already, so the cases (the tests whose names contain "triton") run in a child pytest.
"""

import os
import subprocess
import sys
from pathlib import Path


def rerun_triton_cases(test_file: str, backend_env: str) -> str:
    """Run ``test_file``'s Triton cases under the interpreter; fail unless some ran and all passed.
    Returns pytest's output."""
    path = Path(test_file).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(backend_env, None)  # the cases choose their backend themselves
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider", "-k", "triton and not interpreter"],
        cwd=path.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]
    return result.stdout
