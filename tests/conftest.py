import subprocess
import sys
from pathlib import Path

import pytest
import torch

from makemore import data

sys.path.insert(0, str(Path(__file__).parent))  # for lecture_reference


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
    """The tensors of the equivalence suites are tiny: a second thread only adds overhead, ~20x when other processes share the cores."""
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
