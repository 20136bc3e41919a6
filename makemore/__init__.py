"""makemore: character-level language models, from the bigram to the hierarchical WaveNet.

``makemore.kernels`` lives in the repository's top-level ``kernels/`` folder. An install (``pip install
-e .`` or a wheel) maps it into this package (pyproject.toml's ``package-dir``); in a source checkout
used without an install (``PYTHONPATH=.``, or a copy of the tree), the finder below resolves it to the
``kernels/`` folder beside this package. Why the folder is not inside the package: docs/layout.md.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Finds ``makemore.kernels`` in ``kernels/`` beside this package, where that folder exists (a source tree)."""

    def find_spec(self, name, path=None, target=None):
        if name != "makemore.kernels" or not (_KERNELS / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)]
        )


if not (Path(__file__).resolve().parent / "kernels").exists():  # an installed wheel holds makemore/kernels itself
    sys.meta_path.insert(0, _SourceTreeKernels())
