"""Reading text files into tokens: one clear error for every bad input, and the vocabulary.

Two kinds of data set:
- lines: one item per line (makemore's contract, e.g. names). Token 0 is '.', the boundary that
  starts and ends every item, so '.' may not occur inside an item.
- stream: one long text (e.g. tinyshakespeare); every character is an ordinary token.

A file is read in pieces of about ``READ_CHUNK`` bytes, never as one str: Python keeps 1 to 4
bytes per character, so a 100 MB file decoded at once costs 100-400 MB more than its token ids.
What every reader sees is the same: UTF-8, a UTF-8 byte-order mark dropped (Windows editors
write one; it is no character of the text), and CRLF and lone CR line ends turned into LF, so a
file gives the same items and the same text whichever platform saved it.
"""

import codecs
import hashlib
import random
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

BOUNDARY = "."
IGNORE_INDEX = -100
READ_CHUNK = 1 << 20  # bytes decoded at a time
ENCODE_CHUNK = 1 << 20  # characters encoded at a time: a 100 MB text never exists as int64 ids


class DataError(Exception):
    """Bad or missing input data; the message is one line saying what, where and how to fix it."""


def read_text(path: Path, sha256: str | None = None) -> str:
    """The file's text, with one clear error for a missing, empty, binary, non-UTF-8 or altered file.

    The whole text as one str: for small files and tests; ``load_source`` reads large ones in pieces.
    """
    check_sha256(path, sha256)
    text = "".join(piece for _, piece in text_pieces(path))
    if not text.strip():
        raise _empty(path)
    return text


def read_lines(path: Path, vocab: "Vocab | None" = None, sha256: str | None = None) -> list[str]:
    """Stripped non-blank lines; '.' inside a line is an error since it is the boundary token.

    With ``vocab`` (a trained model's), a character outside it is an error naming its line. A list
    of every item: for small files and tests; ``load_source`` keeps large ones as token ids.
    """
    check_sha256(path, sha256)
    return [item for items in line_pieces(path, vocab) for item in items]


def check_sha256(path: Path, sha256: str | None) -> None:
    """An altered registered file is one clear error, before anything else is said about its contents."""
    if sha256 is None:
        return
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_CHUNK):
                digest.update(block)
    except OSError as e:
        raise _unreadable(path, e) from None
    if digest.hexdigest() != sha256:
        raise DataError(
            f"{path}: SHA-256 does not match the registered {sha256}; the file was altered: "
            "reinstall makemore (a packaged data set) or delete the file to download it again"
        )


def text_pieces(path: Path, lines: bool = False) -> Iterator[tuple[int, str]]:
    """Consecutive pieces of the file's text, each with the number of the line it starts on.

    Each piece ends at a character boundary and never between a CR and its LF (``lines``: right
    after a line end), so joined they are exactly the file decoded at once, and each line lies
    within one piece. The first NUL byte or invalid UTF-8 is a DataError naming its line.
    """
    try:
        with open(path, "rb") as f:
            buf, scanned, line, first = bytearray(), 0, 1, True
            while True:
                block = f.read(READ_CHUNK)
                at_end = not block
                if first:  # READ_CHUNK >= 4 bytes: enough for any byte-order mark
                    _check_byte_order_mark(path, block)
                    block, first = block.removeprefix(codecs.BOM_UTF8), False
                buf += block
                cut = len(buf) if at_end else _cut(buf, scanned, lines)
                if cut:
                    text = _decode(path, buf, cut, line)
                    del buf[:cut]
                    yield line, text
                    line += text.count("\n")
                if at_end:
                    return
                scanned = max(len(buf) - 1, 0)  # a final CR may still be waiting for its LF
    except OSError as e:
        raise _unreadable(path, e) from None


def line_pieces(path: Path, vocab: "Vocab | None" = None) -> Iterator[list[str]]:
    """The file's items, a piece at a time: lines stripped, blank ones skipped, each checked.

    An item may not contain the boundary '.', nor, with ``vocab``, a character outside it; a file
    without any item is an error too. Items are ended by LF, CRLF or a lone CR, nothing else.
    """
    allowed = frozenset(vocab.chars) if vocab else None
    found = False
    for first_line, text in text_pieces(path, lines=True):
        lines = text.split("\n")
        items = [item for item in map(str.strip, lines) if item]
        joined = "".join(items)
        if BOUNDARY in joined or (allowed is not None and not allowed.issuperset(joined)):
            # Checked on the whole piece at C speed; only a bad piece is searched line by line, for the first bad line.
            number, line = _first_line(
                lines, lambda item: BOUNDARY in item or (allowed is not None and not allowed.issuperset(item))
            )
            if BOUNDARY in line:
                raise DataError(
                    f"{path}:{first_line + number}: {line[:40]!r} contains {BOUNDARY!r}, "
                    "the boundary token of line data; remove it, or read the file as one text with --kind stream"
                )
            raise _unknown_character(
                f"{path}:{first_line + number}", next(ch for ch in line if ch not in allowed), len(allowed)
            )
        found = found or bool(items)
        yield items
    if not found:
        raise _empty(path)


def _check_byte_order_mark(path: Path, head: bytes) -> None:
    # Without this, UTF-16 text fails as "not valid UTF-8 (byte 0xff)" or "NUL byte", true but
    # not what the user needs to hear: which encoding it is and what to convert it to.
    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32"),
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if head.startswith(bom):
            raise DataError(
                f"{path}:1: starts with a {name} byte-order mark: the file is {name} text; convert it to UTF-8"
            )


def _cut(buf: bytearray, scanned: int, lines: bool) -> int:
    """Where the next piece of ``buf`` ends (0: not within ``buf`` yet); ``buf[:scanned]`` holds no line end (lines)."""
    if lines:
        # After the last LF, or the last CR known not to be the first half of a CRLF.
        end = max(buf.rfind(b"\n", scanned), buf.rfind(b"\r", scanned, len(buf) - 1))
        return end + 1
    # Step back over UTF-8 continuation bytes (10xxxxxx) and off a CRLF's middle: valid UTF-8
    # finds a boundary within 3 steps; in invalid bytes any cut does, as decoding fails there anyway.
    cut, steps = max(len(buf) - 1, 0), 0  # a buffer may be empty: the first block was only a BOM
    while cut > 0 and steps < 4 and (0x80 <= buf[cut] < 0xC0 or buf[cut - 1 : cut + 1] == b"\r\n"):
        cut, steps = cut - 1, steps + 1
    return cut


def _decode(path: Path, buf: bytearray, cut: int, line: int) -> str:
    """``buf[:cut]`` as text with LF line ends; ``line``: the number of the line it starts on, for errors."""
    nul = buf.find(b"\0")  # all that was read, not only this piece: a binary file is named as such, not as bad UTF-8
    if nul >= 0:
        raise DataError(
            f"{path}:{line + _line_ends(buf, nul)}: NUL byte: this looks like a binary file; give a UTF-8 text file"
        )
    try:
        with memoryview(buf) as view:
            text = str(view[:cut], "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{line + _line_ends(buf, e.start)}: not valid UTF-8 (byte 0x{buf[e.start]:02x}); "
            "convert the file to UTF-8"
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _line_ends(buf: bytearray, end: int) -> int:
    """Line ends in ``buf[:end]``: LF, CRLF (counted at its CR) and lone CR."""
    return buf.count(b"\n", 0, end) + buf.count(b"\r", 0, end) - buf.count(b"\r\n", 0, end)


def _first_line(lines: list[str], bad) -> tuple[int, str]:
    """(index, stripped line) of the first line ``bad`` holds for."""
    return next((number, line.strip()) for number, line in enumerate(lines) if bad(line.strip()))


def _empty(path: Path) -> DataError:
    return DataError(f"{path}: the file is empty; give a file with at least one non-blank line")


def _unreadable(path: Path, e: OSError) -> DataError:
    if isinstance(e, FileNotFoundError):
        return DataError(f"{path}: no such file")
    return DataError(f"{path}: cannot read ({e.strerror or e}); check the path and its permissions")


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
        # Encoding looks code points up in a table of ids (-1: not in the vocabulary), decoding
        # looks ids up in their code points: no Python loop over characters either way. The table
        # is as long as the largest code point, at most 4.5 MB, and a lookup is 30x faster than
        # a binary search through the sorted code points.
        self._points = torch.tensor([ord(ch) for ch in self.chars], dtype=torch.int32)
        self._table = torch.full(((int(self._points.max()) if self.chars else 0) + 2,), -1, dtype=torch.int32)
        self._table[self._points.long()] = torch.arange(len(self.chars), dtype=torch.int32)

    @classmethod
    def for_lines(cls, items: Iterable[str]) -> "Vocab":
        """'.' then every character of ``items`` (strings, or a set of characters), sorted."""
        return cls([BOUNDARY] + sorted(set("".join(items))))

    @classmethod
    def for_stream(cls, text: Iterable[str]) -> "Vocab":
        """Every character of ``text`` (a str, or a set of characters), sorted."""
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> torch.dtype:
        """The smallest integer type that holds every id: data is kept compact, and widened per batch."""
        return torch.uint8 if len(self.chars) <= 256 else torch.int32

    def encode(self, text: str, where: str = "input", first_line: int = 1) -> torch.Tensor:
        """Ids of ``text`` in ``self.dtype``; a character outside the vocabulary is a DataError naming it and
        ``where``:line (``text`` starting on line ``first_line``)."""
        ids = torch.empty(len(text), dtype=self.dtype)
        for start in range(0, len(text), ENCODE_CHUNK):
            points = _code_points(text[start : start + ENCODE_CHUNK]).clamp_(
                max=len(self._table) - 1
            )  # the last entry is -1
            found = self._table.index_select(0, points)
            if len(found) and int(found.min()) < 0:
                first = start + int((found < 0).nonzero()[0])
                raise _unknown_character(
                    f"{where}:{first_line + text.count(chr(10), 0, first)}", text[first], len(self)
                )
            ids[start : start + len(points)] = found
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids`` (a sequence or tensor of ids)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.numel() == 0:
            return ""
        return self._points[ids].numpy().tobytes().decode("utf-32-le")


def _code_points(text: str) -> torch.Tensor:
    if not text:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int32)
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


def lecture_order(n: int, seed: int = 42) -> torch.Tensor:
    """The lecture's shuffle of ``n`` items as a permutation: item ``order[k]`` goes to place k.

    ``random.shuffle`` looks only at the length, so shuffling the indices 0 .. n-1 moves them
    exactly as it moves the items; an array of machine ints instead of a list of Python ints
    keeps 10 million indices at 40 MB rather than 360 MB.
    """
    order = array("i" if n < 2**31 else "q", range(n))
    random.Random(seed).shuffle(order)  # a private Random(seed) shuffles exactly as random.seed(seed) would
    if not order:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(order, dtype=torch.int32 if order.typecode == "i" else torch.int64)


def split_sizes(n: int) -> tuple[int, int, int]:
    """The lecture's 80% / 10% / 10% of ``n`` items."""
    n1, n2 = int(0.8 * n), int(0.9 * n)
    return n1, n2 - n1, n - n2


def lecture_split(items: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split: ``random.seed(42); random.shuffle(words)``, then 80% / 10% / 10%."""
    shuffled = [items[i] for i in lecture_order(len(items), seed).tolist()]
    n1, n2, _ = split_sizes(len(items))
    return shuffled[:n1], shuffled[n1 : n1 + n2], shuffled[n1 + n2 :]


def stream_split(ids: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% to train, last 10% to validate, as char-rnn and nanoGPT do."""
    n = int(train_fraction * len(ids))
    return ids[:n], ids[n:]
