import sys
from pathlib import Path

import pytest

from makemore import data

sys.path.insert(0, str(Path(__file__).parent))  # for lecture_reference


@pytest.fixture(scope="session")
def names_path() -> Path:
    """names.txt through the registry: data/names.txt (.ci/run copies it there) or a download."""
    path, kind = data.resolve("names")
    assert kind == "lines"
    return path


@pytest.fixture(scope="session")
def names(names_path) -> list[str]:
    return data.read_lines(names_path)


@pytest.fixture(scope="session")
def names_vocab(names) -> data.Vocab:
    return data.Vocab.for_lines(names)
