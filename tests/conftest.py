import sys
from pathlib import Path

import pytest

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
