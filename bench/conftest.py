"""pytest's settings for bench/test_regression.py (``pytest bench --benchmark-only``): ``--quick`` and the device.

The tests (``pytest``, testpaths ``tests``) never collect bench/, and ``pytest bench`` collects only bench/test_*.py.
"""

import pytest
import torch

from makemore.device import resolve_device


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="bench/: tiny sizes, two rounds: a smoke run (CI's)")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The GPU where there is one, else the CPU (makemore.device's ``auto``)."""
    return resolve_device("auto")
