"""Data: the registry (packaged and downloaded data sets), reading text into tokens, and batches.

``load_source(name_or_path)`` gives a source whose ``batch(...)`` and ``eval_batches(...)`` yield
``Batch(idx, targets)`` in the layout a recipe names; see batches.py.
"""

from .batches import LAYOUTS, Batch, LineSource, StreamSource, load_source
from .registry import DATASETS, KINDS, DatasetInfo, download, resolve
from .text import BOUNDARY, IGNORE_INDEX, DataError, Vocab, lecture_split, read_lines, read_text, stream_split

__all__ = [
    "LAYOUTS", "Batch", "LineSource", "StreamSource", "load_source", "DATASETS", "KINDS", "DatasetInfo", "download",
    "resolve", "BOUNDARY", "IGNORE_INDEX", "DataError", "Vocab", "lecture_split", "read_lines", "read_text", "stream_split",
]  # fmt: skip
