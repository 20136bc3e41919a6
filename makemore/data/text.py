"""Reading text files into tokens: one clear error for every bad input, and the vocabulary.

Two kinds of data set:
- lines: one item per line (makemore's contract, e.g. names). Token 0 is '.', the boundary that
  starts and ends every item, so '.' may not occur inside an item.
- stream: one long text (e.g. tinyshakespeare); every character is an ordinary token.
"""

import hashlib
import random
from pathlib import Path

import torch

BOUNDARY = "."
IGNORE_INDEX = -100
ENCODE_CHUNK = 1 << 20  # characters encoded at a time: a 100 MB text never exists as int64 ids


class DataError(Exception):
    """Bad or missing input data; the message is one line saying what, where and how to fix it."""


def read_text(path: Path, sha256: str | None = None) -> str:
    """The file's text, with one clear error for a missing, empty, binary, non-UTF-8 or altered file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{path}: SHA-256 does not match the registered {sha256}; the file was altered: reinstall or re-download it")
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


def read_lines(path: Path, vocab: "Vocab | None" = None, sha256: str | None = None) -> list[str]:
    """Stripped non-blank lines; '.' inside a line is an error since it is the boundary token.

    With ``vocab`` (a trained model's), a character outside it is an error naming its line.
    """
    allowed = set(vocab.chars) if vocab else None
    items = []
    for number, line in enumerate(read_text(path, sha256).splitlines(), start=1):
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
        points = torch.tensor([ord(ch) for ch in self.chars], dtype=torch.int32)
        self._sorted_points, self._ids = torch.sort(points)

    @classmethod
    def for_lines(cls, items: list[str]) -> "Vocab":
        return cls([BOUNDARY] + sorted(set("".join(items))))

    @classmethod
    def for_stream(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> torch.dtype:
        """The smallest integer type that holds every id: stream data is kept compact, and widened per batch."""
        return torch.uint8 if len(self.chars) <= 256 else torch.int32

    def encode(self, text: str, where: str = "input") -> torch.Tensor:
        """Ids of ``text`` in ``self.dtype``; a character outside the vocabulary is a DataError naming it and ``where``."""
        ids = torch.empty(len(text), dtype=self.dtype)
        for start in range(0, len(text), ENCODE_CHUNK):
            points = _code_points(text[start : start + ENCODE_CHUNK])
            pos = torch.searchsorted(self._sorted_points, points).clamp_(max=len(self.chars) - 1)
            unknown = self._sorted_points[pos] != points
            if unknown.any():
                first = start + int(unknown.nonzero()[0])
                raise _unknown_character(f"{where}:{text.count(chr(10), 0, first) + 1}", text[first], len(self))
            ids[start : start + len(points)] = self._ids[pos]
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def _code_points(text: str) -> torch.Tensor:
    if not text:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int32)
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


def lecture_split(items: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split: ``random.seed(42); random.shuffle(words)``, then 80% / 10% / 10%."""
    items = list(items)
    random.Random(seed).shuffle(items)  # a private Random(seed) shuffles exactly as random.seed(seed) would
    n1, n2 = int(0.8 * len(items)), int(0.9 * len(items))
    return items[:n1], items[n1:n2], items[n2:]


def stream_split(ids: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% to train, last 10% to validate, as char-rnn and nanoGPT do."""
    n = int(train_fraction * len(ids))
    return ids[:n], ids[n:]
