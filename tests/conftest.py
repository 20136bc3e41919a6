import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from makemore import data

sys.path.insert(0, str(Path(__file__).parent))  # for lecture_reference

# Hypothesis: "ci" (the default) draws the same examples on every run, so CI fails only for a change
# in the code; "long" (HYPOTHESIS_PROFILE=long) draws new random examples each run, ten times as many.
# Neither has a deadline: an example's wall-clock time is no test of the code (and a busy machine fails it).
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("long", derandomize=False, deadline=None)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(HYPOTHESIS_PROFILE)
LONG_FACTOR = 10


@pytest.fixture(scope="session")
def names_path() -> Path:
    """names.txt as the package ships it (no network)."""
    path, kind, sha256 = data.resolve("names")
    assert kind == "lines" and sha256 == data.DATASETS["names"].sha256
    return path


@pytest.fixture(scope="session")
def names(names_path) -> list[str]:
    return data.read_lines(names_path)


@pytest.fixture(scope="session")
def names_vocab(names) -> data.Vocab:
    return data.Vocab.for_lines(names)


@pytest.fixture(scope="module")
def one_thread():
    """The tensors of the equivalence suites are tiny: a second thread only adds overhead,
    ~20x when other processes share the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited: what a lock or temporary file of a killed run names."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# Devices. Every test that takes a ``device`` argument runs once per device in DEVICES, collected
# everywhere: without a GPU the cuda cases show as skipped, never vanish. ``pytest --device cuda``
# runs only the cuda cases (what bench/gpu.sh runs on a lent GPU) and ends with a count of them.
DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("all",) + DEVICES,
        default="all",
        help="run the device-parametrised tests on this device only (default: all)",
    )


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "device" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("device", DEVICES)


def pytest_collection_modifyitems(config, items):
    if HYPOTHESIS_PROFILE == "long":  # a test's own settings outrank the profile's: scale and unfix them here
        for fn in {item.obj for item in items if getattr(getattr(item, "obj", None), "is_hypothesis_test", False)}:
            own = fn._hypothesis_internal_use_settings
            fn._hypothesis_internal_use_settings = settings(
                own, max_examples=own.max_examples * LONG_FACTOR, derandomize=False
            )
    only = config.getoption("--device")
    kept, dropped = [], []
    for item in items:
        device = getattr(item, "callspec", None) and item.callspec.params.get("device")
        if only != "all" and device != only:
            dropped.append(item)
            continue
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter, config):
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if report.when in ("call", "setup") and "[" in report.nodeid and "cuda" in report.nodeid.split("[", 1)[1]:
                if outcome == "passed" and report.when != "call":
                    continue
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        terminalreporter.write_line(
            "cuda cases: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        )
