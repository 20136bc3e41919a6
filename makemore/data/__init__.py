"""Data: the registry (packaged, registered and URL data sets), reading text into tokens, and batches.

``load_source(name_or_path)`` gives a source whose ``batch(...)`` and ``eval_batches(...)`` yield
``Batch(idx, targets)`` in the layout a recipe names; see batches.py.
"""

from .batches import LAYOUTS, Batch, ItemSet, LineSource, StreamSource, load_source
from .registry import DATASETS, KINDS, DatasetInfo, download, resolve, url_info
from .text import (
    BOUNDARY,
    IGNORE_INDEX,
    DataError,
    Vocab,
    check_sha256,
    lecture_order,
    lecture_split,
    line_pieces,
    read_lines,
    read_text,
    split_sizes,
    stream_split,
    text_pieces,
)

__all__ = [
    "LAYOUTS",
    "Batch",
    "ItemSet",
    "LineSource",
    "StreamSource",
    "load_source",
    "DATASETS",
    "KINDS",
    "DatasetInfo",
    "download",
    "resolve",
    "url_info",
    "BOUNDARY",
    "IGNORE_INDEX",
    "DataError",
    "Vocab",
    "check_sha256",
    "lecture_order",
    "lecture_split",
    "line_pieces",
    "read_lines",
    "read_text",
    "split_sizes",
    "stream_split",
    "text_pieces",
]
