"""Data: the data-set registry, reading and checking text files, the vocabulary, the lecture's split,
and the three shapes the models eat (windows, padded whole names, random windows of a stream).

Two kinds of data set:
- lines: one item per line (makemore's contract, e.g. names). Token 0 is '.', the boundary that
  starts and ends every item, so '.' may not occur inside an item.
- stream: one long text (e.g. tinyshakespeare); every character is an ordinary token.
"""

import hashlib
import os
import random
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

BOUNDARY = "."
IGNORE_INDEX = -100
DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data"


class DataError(Exception):
    """Bad or missing input data; the message is one line saying what, where and how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    file: str
    url: str
    sha256: str
    kind: str  # "lines" or "stream"


DATASETS = {
    "names": DatasetInfo(
        "names.txt",
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
        "lines",
    ),
    "tinyshakespeare": DatasetInfo(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "stream",
    ),
}


def resolve(name_or_path: str, data_dir: Path = DATA_DIR, kind: str = "auto") -> tuple[Path, str]:
    """Return (path, kind) for a registered data-set name or a path to a text file.

    A registered name resolves to ``data_dir/<file>`` if present, else it is downloaded there and
    its SHA-256 checked. Anything else is taken as a path. ``kind`` "auto" is the registry's kind,
    or "lines" for a path; "lines" or "stream" overrides it.
    """
    if kind not in ("auto", "lines", "stream"):
        raise ValueError(f"unknown data kind {kind!r}; choose auto, lines or stream")
    info = DATASETS.get(name_or_path)
    if info is None:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(DATASETS)
            raise DataError(f"{name_or_path}: no such file (and not a registered data set: {known})")
        return path, "lines" if kind == "auto" else kind
    path = Path(data_dir) / info.file
    if not path.is_file():
        download(info, path)
    return path, info.kind if kind == "auto" else kind


def download(info: DatasetInfo, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(info.url, timeout=60) as response:
            payload = response.read()
    except OSError as e:
        raise DataError(
            f"could not download {info.url} ({e}); place the file at {path} by hand (SHA-256 {info.sha256})"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != info.sha256:
        raise DataError(f"{info.url}: SHA-256 {digest} does not match the expected {info.sha256}; nothing was saved")
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, path)


def read_text(path: Path) -> str:
    """The file's text, with one clear error for a missing, empty, binary or non-UTF-8 file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise DataError(f"{path}:{line}: NUL byte: this looks like a binary file; give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); convert the file to UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; give a file with at least one non-blank line")
    return text


def read_lines(path: Path, vocab: "Vocab | None" = None) -> list[str]:
    """Stripped non-blank lines; '.' inside a line is an error since it is the boundary token.

    With ``vocab`` (a trained model's), a character outside it is an error naming its line.
    """
    allowed = set(vocab.chars) if vocab else None
    items = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if BOUNDARY in line:
            raise DataError(
                f"{path}:{number}: {line[:40]!r} contains {BOUNDARY!r}, the boundary token of line data; "
                "remove it, or read the file as one text with --kind stream"
            )
        if allowed is not None and not allowed.issuperset(line):
            raise _unknown_character(f"{path}:{number}", next(ch for ch in line if ch not in allowed), len(allowed))
        items.append(line)
    return items


def _unknown_character(where: str, char: str, vocab_size: int) -> DataError:
    return DataError(
        f"{where}: character {char!r} is not in the model's vocabulary of {vocab_size} characters; "
        "remove it or train a model on data that has it"
    )


class Vocab:
    """Characters <-> token ids. Line data: '.' is 0 and the rest sorted after it; stream data: sorted."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars):
            raise ValueError("a vocabulary may not list a character twice")
        # Encoding maps code points through a sorted table: no Python loop over characters.
        points = torch.tensor([ord(ch) for ch in self.chars], dtype=torch.int64)
        self._sorted_points, self._ids = torch.sort(points)

    @classmethod
    def for_lines(cls, items: list[str]) -> "Vocab":
        return cls([BOUNDARY] + sorted(set("".join(items))))

    @classmethod
    def for_stream(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, where: str = "input") -> torch.Tensor:
        """int64 ids of ``text``; a character outside the vocabulary is a DataError naming it and ``where``."""
        points = _code_points(text)
        pos = torch.searchsorted(self._sorted_points, points).clamp_(max=len(self.chars) - 1)
        unknown = self._sorted_points[pos] != points
        if unknown.any():
            first = int(unknown.nonzero()[0])
            raise _unknown_character(f"{where}:{text.count(chr(10), 0, first) + 1}", text[first], len(self))
        return self._ids[pos]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def _code_points(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).to(torch.int64)


def lecture_split(items: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split: ``random.seed(42); random.shuffle(words)``, then 80% / 10% / 10%."""
    items = list(items)
    random.Random(seed).shuffle(items)  # a private Random(seed) shuffles exactly as random.seed(seed) would
    n1, n2 = int(0.8 * len(items)), int(0.9 * len(items))
    return items[:n1], items[n1:n2], items[n2:]


def encode_items(items: list[str], vocab: Vocab, where: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """All items' ids concatenated (int64) and each item's length."""
    lengths = torch.tensor([len(item) for item in items], dtype=torch.int64)
    return vocab.encode("".join(items), where), lengths


def build_windows(items: list[str], vocab: Vocab, block_size: int, where: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's ``build_dataset``: X (N, block_size) left-padded with '.', Y (N,) the next character.

    Each item of n characters gives n + 1 windows, the last one predicting '.'.
    """
    ids, lengths = encode_items(items, vocab, where)
    # One stream of [0] * block_size + item + [0] per item; every window lies inside one item's span.
    span = lengths + block_size + 1
    starts = torch.cumsum(span, 0) - span  # (n_items,)
    stream = torch.zeros(int(span.sum()), dtype=torch.int64)
    item_offset = starts + block_size - (torch.cumsum(lengths, 0) - lengths)  # where each item's first id lands
    stream[torch.arange(len(ids)) + torch.repeat_interleave(item_offset, lengths)] = ids
    n_windows = lengths + 1
    first = torch.repeat_interleave(starts, n_windows)
    offset = torch.arange(int(n_windows.sum())) - torch.repeat_interleave(torch.cumsum(n_windows, 0) - n_windows, n_windows)
    window_start = first + offset  # (N,)
    X = stream.unfold(0, block_size, 1)[window_start]
    Y = stream[window_start + block_size]
    return X, Y


def padded_sequences(items: list[str], vocab: Vocab, block_size: int, where: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Whole items for the convolutional WaveNet: S (N, block_size + T) and targets (N, T + 1).

    Row i is ``[0] * block_size + item_i``, right-padded with 0; its targets are ``item_i + [0]``,
    right-padded with IGNORE_INDEX. T is the longest item's length.
    """
    ids, lengths = encode_items(items, vocab, where)
    n, longest = len(lengths), int(lengths.max()) if len(lengths) else 0
    col = torch.arange(longest)
    inside = col < lengths[:, None]  # (N, T): True where the item has a character
    chars = torch.zeros(n, longest, dtype=torch.int64)
    chars[inside] = ids
    S = torch.cat([torch.zeros(n, block_size, dtype=torch.int64), chars], dim=1)
    targets = torch.full((n, longest + 1), IGNORE_INDEX, dtype=torch.int64)
    targets[:, :longest][inside] = ids
    targets[torch.arange(n), lengths] = 0
    return S, targets


def stream_split(ids: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% to train, last 10% to validate, as char-rnn and nanoGPT do."""
    n = int(train_fraction * len(ids))
    return ids[:n], ids[n:]


def random_windows(ids: torch.Tensor, batch_size: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch_size`` random windows of ``length`` consecutive tokens: (batch_size, length)."""
    if len(ids) < length:
        raise DataError(f"the text has {len(ids)} tokens, fewer than a window of {length}; use a shorter context or more text")
    starts = torch.randint(0, len(ids) - length + 1, (batch_size,), generator=generator)
    return ids[starts[:, None] + torch.arange(length)]
