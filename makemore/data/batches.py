"""Sources of batches: a data set's splits, cut into ``Batch(idx, targets)`` in the layout a recipe names.

Every model takes ``idx (N, L)`` and predicts T = L - R + 1 targets (R: its receptive field), so
one pipeline serves them all. Two layouts:

- ``windows``: one target per row (L = R), the lecture's minibatches of (context, next token).
- ``sequences``: every position of an item (lines), or of a window of the text (stream), is a
  target; line items are left-padded with R tokens 0 and right-padded to one fixed width per data
  set (the longest item), so every batch has the same shape and a compiled step never recompiles.

Evaluation always uses sequences: in eval mode every model gives the same logits either way, and
whole sequences share their nodes; line items go in batches of similar length, each padded to its
own longest. Token ids are stored compactly (uint8 up to 256 symbols) and widened to int64 per
batch; nothing is kept per window or as Python objects per item.
"""

from array import array
from dataclasses import dataclass

import torch

from .registry import resolve
from .text import (
    BOUNDARY,
    IGNORE_INDEX,
    DataError,
    Vocab,
    check_sha256,
    lecture_order,
    line_pieces,
    split_sizes,
    stream_split,
    text_pieces,
)

LAYOUTS = ("windows", "sequences")
EVAL_CHUNK = 512  # targets per evaluation row of a stream (at least the receptive field)
PIECE_ITEMS = 1 << 16  # items encoded or hashed at a time


@dataclass
class Batch:
    idx: torch.Tensor  # (N, L) int64 token ids
    targets: torch.Tensor  # (N, T) int64 next tokens, IGNORE_INDEX where there is nothing to predict

    def to(self, device) -> "Batch":
        return Batch(self.idx.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))


def load_source(
    data: str, kind: str = "auto", *, seed: int = 42, vocab: Vocab | None = None
) -> "LineSource | StreamSource":
    """The data set ``data`` (a registered name, a path or a URL) as a source;
    ``vocab``: a trained model's, to encode with.

    The file is read twice, a piece at a time: once to check it and count its characters (and,
    without ``vocab``, to find them), once to encode it into a tensor of that size, so it never
    exists whole as a str or a list of items.
    """
    path, kind, sha256 = resolve(data, kind)
    check_sha256(path, sha256)
    if kind == "lines":
        return LineSource.from_file(path, vocab, seed=seed)
    return StreamSource.from_file(path, vocab)


class LineSource:
    """Items, one per line, in the lecture's split (train / val / test, 80 / 10 / 10 after a seeded shuffle).

    Stored as one tensor of token ids, the items in split order each followed by the boundary 0
    (what the lecture's ``build_dataset`` appends), and where each item starts: 1 byte per
    character and 4 per item, where a list of str costs some 60 bytes per item. The lecture's
    (context, next character) pairs are numbered as ``build_dataset`` lists them, so pair i is
    the token at position i of its split, its context the R tokens before it within its item.
    """

    kind = "lines"

    def __init__(self, items: list[str], vocab: Vocab, *, seed: int = 42, where: str = "input"):
        """From items in memory (tests, small data); ``load_source`` builds a file's source piece by piece."""
        if any(BOUNDARY in item for item in items):
            raise DataError(f"{where}: an item contains {BOUNDARY!r}, the boundary token of line data")
        pieces = [items[i : i + PIECE_ITEMS] for i in range(0, len(items), PIECE_ITEMS)]
        expected = [(len(piece), sum(map(len, piece))) for piece in pieces]
        self._build(_lengths(items, where), expected, lambda: iter(pieces), vocab, seed, where)

    @classmethod
    def from_file(cls, path, vocab: Vocab | None = None, *, seed: int = 42) -> "LineSource":
        """A file's items, read in pieces (see ``line_pieces``); ``vocab``: a trained model's,
        else the file's characters."""
        lengths, expected, chars = array("i"), [], set()
        for items in line_pieces(path, vocab):
            piece = _lengths(items, path)
            lengths.extend(piece)
            expected.append((len(items), sum(piece)))
            if vocab is None:
                chars.update("".join(items))
        source = cls.__new__(cls)
        source._build(lengths, expected, lambda: line_pieces(path), vocab or Vocab.for_lines(chars), seed, str(path))
        return source

    def _build(
        self, lengths: array, expected: list[tuple[int, int]], pieces, vocab: Vocab, seed: int, where: str
    ) -> None:
        """Shuffle and split ``lengths`` (file order; overwritten), then encode ``pieces()`` (the items again, file
        order, each piece with the (items, characters) ``expected`` from the first reading) into split order.

        At most 12 bytes per item besides the ids: lengths (then destinations), the shuffle and starts.
        """
        self.vocab, self.where = vocab, where
        n = len(lengths)
        n_train, n_val, _ = split_sizes(n)
        if not n_train:
            raise DataError(f"{where}: {n} item(s) leave the 80% training split empty; give at least 2 lines")
        self._bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        self.splits = tuple(split for split, (a, b) in self._bounds.items() if b > a)
        sizes = torch.frombuffer(lengths, dtype=torch.int32)  # characters per item, file order
        self.max_len = int(sizes.max())
        total = int(sizes.sum(dtype=torch.int64)) + n  # every item and its boundary
        index = torch.int32 if total < 2**31 else torch.int64  # positions: 4 bytes per item where they fit
        order = lecture_order(n, seed)
        self.starts = torch.zeros(n + 1, dtype=index)  # item k (split order) is ids[starts[k] : starts[k + 1]]
        # index_select and slices of ``order``: indexing with a whole int32 tensor would copy it as int64 first
        shuffled = torch.index_select(sizes, 0, order).add_(1)
        torch.cumsum(shuffled, 0, dtype=index, out=self.starts[1:])
        del shuffled
        # Where each item (file order) starts in ids: written over the lengths, no longer needed.
        destination = sizes if index == torch.int32 else torch.empty(n, dtype=index)
        for i in range(0, n, PIECE_ITEMS):
            destination[order[i : i + PIECE_ITEMS]] = self.starts[i : min(i + PIECE_ITEMS, n)]
        del order
        self.ids = torch.empty(total, dtype=vocab.dtype)
        done = 0
        for k, items in enumerate(pieces()):
            size = (
                torch.frombuffer(_lengths(items, where), dtype=torch.int32).long()
                if items
                else torch.zeros(0, dtype=torch.int64)
            )
            if k >= len(expected) or (len(items), int(size.sum())) != expected[k]:
                raise DataError(f"{where}: the file changed while it was read; read it again when nothing writes to it")
            if not items:
                continue
            ids = vocab.encode(BOUNDARY.join(items) + BOUNDARY, where)  # every item followed by its boundary, 0
            size += 1
            shift = destination[done : done + len(items)].long() - (
                size.cumsum(0) - size
            )  # from piece to ids, per item
            self.ids.scatter_(0, torch.arange(len(ids)) + shift.repeat_interleave(size, output_size=len(ids)), ids)
            done += len(items)
        if done != n:
            raise DataError(f"{where}: the file changed while it was read; read it again when nothing writes to it")

    def _span(self, split: str) -> tuple[int, int]:
        """Positions of the split's items in ``ids``: the first and one past the last."""
        a, b = self._bounds[split]
        return int(self.starts[a]), int(self.starts[b])

    def n_items(self, split: str) -> int:
        a, b = self._bounds[split]
        return b - a

    def n_targets(self, split: str) -> int:
        """The lecture's pairs in ``split``: an item of n characters has n + 1 targets, its boundary included."""
        first, end = self._span(split)
        return end - first

    def items(self, split: str) -> list[str]:
        """The split's items as str, in order: for tests and small data."""
        first, end = self._span(split)
        return self.vocab.decode(self.ids[first:end]).split(BOUNDARY)[:-1]

    def item_set(self, split: str) -> "ItemSet":
        """The split's items for ``in`` tests (``makemore sample --unique``), without a str per item."""
        return ItemSet(self, split)

    def pairs(self, split: str, ix: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The lecture's (context (M, R), next token (M,)) pairs number ``ix`` of ``split``, in ``vocab.dtype``."""
        first, _ = self._span(split)
        at = ix + first  # the target's position in ids
        item = torch.searchsorted(self.starts, at.to(self.starts.dtype), right=True) - 1
        context = at[:, None] + torch.arange(-R, 0)
        X = self.ids[context.clamp(min=0)].masked_fill_(
            context < self.starts[item].long()[:, None], 0
        )  # '.' before the item
        return X, self.ids[at]

    def windows(self, split: str, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The lecture's ``build_dataset``: every (window (M, R), next token (M,)) of ``split``, item by item.

        Every pair at once, R + 1 bytes each: for tests and comparisons; training draws its pairs per batch.
        """
        return self.pairs(split, torch.arange(self.n_targets(split)), R)

    def rows(self, split: str, items: torch.Tensor, R: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items number ``items`` of ``split`` as rows (k, R + width): [0] * R + item + [0] * (width - len),
        and lengths (k,)."""
        a, _ = self._bounds[split]
        start = self.starts[items + a].long()
        lengths = self.starts[items + a + 1].long() - start - 1
        columns = torch.arange(width)
        at = (start[:, None] + columns).clamp_(max=len(self.ids) - 1)
        rows = self.ids[at].masked_fill_(columns > lengths[:, None], 0)  # column len is the item's own boundary
        return torch.cat([rows.new_zeros(len(items), R), rows], dim=1), lengths

    def check(self, layout: str, R: int, seq_len: int) -> None:
        """Items are left-padded to any receptive field: nothing can be too short."""

    def batch(
        self, split: str, batch_size: int, layout: str, R: int, generator: torch.Generator, seq_len: int = 0
    ) -> Batch:
        """A random batch: ``batch_size`` windows, or ``batch_size`` whole items
        (``seq_len`` unused: items are whole)."""
        if layout == "windows":
            ix = torch.randint(0, self.n_targets(split), (batch_size,), generator=generator)  # the lecture's draw
            X, Y = self.pairs(split, ix, R)
            return Batch(X.long(), Y.long()[:, None])
        ix = torch.randint(0, self.n_items(split), (batch_size,), generator=generator)
        return _item_batch(*self.rows(split, ix, R, self.max_len + 1), R)  # one width per data set: no recompiling

    def eval_batches(self, split: str, R: int, batch_tokens: int, max_tokens: int):
        """Whole items, every target once; above ``max_tokens`` targets an evenly spaced subset of about that many.

        Items go in batches of similar length (widths up to 2, 4, 8, ...), each padded to its own
        longest: a few long lines then cost their own length, not every row's.
        """
        a, b = self._bounds[split]
        keep = _evenly_spaced(b - a, max(1, max_tokens * (b - a) // self.n_targets(split)))
        targets = (self.starts[keep + a + 1] - self.starts[keep + a]).long()  # length + 1
        bucket = torch.log2(targets.double()).ceil_().long()
        for level in bucket.unique().tolist():
            chosen = keep[bucket == level]
            per_batch = max(1, batch_tokens // (R + 2**level))
            for i in range(0, len(chosen), per_batch):
                ix = chosen[i : i + per_batch]
                width = int((self.starts[ix + a + 1] - self.starts[ix + a]).max())
                yield _item_batch(*self.rows(split, ix, R, width), R)


def _lengths(items: list[str], where) -> array:
    """Characters per item, 4 bytes each."""
    try:
        return array("i", map(len, items))
    except OverflowError:
        raise DataError(
            f"{where}: a line of 2**31 characters or more; split it into lines, or read the file with --kind stream"
        ) from None


def _item_batch(rows: torch.Tensor, lengths: torch.Tensor, R: int) -> Batch:
    rows = rows.long()
    targets = rows[:, R:].masked_fill(torch.arange(rows.shape[1] - R) > lengths[:, None], IGNORE_INDEX)
    return Batch(rows[:, :-1], targets)


class ItemSet:
    """A split's items for ``in`` tests, each match confirmed on the item itself.

    One sorted int64 key per item: the high 33 bits of its hash, then its number (31 bits), sorted
    in place, so 8 bytes per item where a set of 10 million names holds about 1 GB and a sort
    with separate indices 24 bytes. A lookup reads the keys that share the hash's high bits:
    about n / 2**33 strangers per query besides the item itself.
    """

    INDEX_BITS = 31

    def __init__(self, source: LineSource, split: str):
        self.source, self.split = source, split
        a, b = source._bounds[split]
        if b - a > 2**self.INDEX_BITS:
            raise DataError(f"{source.where}: more than 2**31 items in the {split} split; --unique cannot index them")
        self.keys = torch.empty(b - a, dtype=torch.int64)
        for i in range(a, b, PIECE_ITEMS):
            j = min(i + PIECE_ITEMS, b)
            items = source.vocab.decode(source.ids[source.starts[i] : source.starts[j]]).split(BOUNDARY)[:-1]
            hashes = torch.frombuffer(array("q", map(hash, items)), dtype=torch.int64)
            self.keys[i - a : j - a] = (hashes >> self.INDEX_BITS << self.INDEX_BITS) | torch.arange(i - a, j - a)
        self.keys.numpy().sort()  # in place: torch.sort would return a copy and int64 indices

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, item: str) -> bool:
        mask = 2**self.INDEX_BITS - 1
        low = (
            hash(item) >> self.INDEX_BITS << self.INDEX_BITS
        )  # the smallest key its hash can have; low | mask the largest
        first = int(torch.searchsorted(self.keys, torch.tensor(low)))
        end = int(torch.searchsorted(self.keys, torch.tensor(low | mask), right=True))
        return any(self._item(k) == item for k in (self.keys[first:end] & mask).tolist())

    def _item(self, k: int) -> str:
        at = self.source._bounds[self.split][0] + k
        return self.source.vocab.decode(self.source.ids[self.source.starts[at] : self.source.starts[at + 1] - 1])


class StreamSource:
    """One text: the first 90% to train, the last 10% to validate."""

    kind = "stream"
    splits = ("train", "val")

    def __init__(self, ids: torch.Tensor, vocab: Vocab, *, where: str = "input"):
        self.vocab = vocab
        self.ids = dict(zip(self.splits, stream_split(ids)))
        self.where = where

    @classmethod
    def from_file(cls, path, vocab: Vocab | None = None) -> "StreamSource":
        """A file's text, read in pieces (see ``text_pieces``); ``vocab``: a trained model's,
        else the file's characters."""
        n, chars, blank = 0, set(), True
        for _, text in text_pieces(path):
            n += len(text)
            blank = blank and text.isspace()
            if vocab is None:
                chars.update(text)
        if blank:
            raise DataError(f"{path}: the file is empty; give a file with at least one non-blank line")
        vocab = vocab or Vocab.for_stream(chars)
        ids, done = torch.empty(n, dtype=vocab.dtype), 0
        for line, text in text_pieces(path):
            if done + len(text) > n:
                raise DataError(f"{path}: the file changed while it was read; read it again when nothing writes to it")
            ids[done : done + len(text)] = vocab.encode(text, str(path), first_line=line)
            done += len(text)
        if done != n:
            raise DataError(f"{path}: the file changed while it was read; read it again when nothing writes to it")
        return cls(ids, vocab, where=str(path))

    def check(self, layout: str, R: int, seq_len: int) -> None:
        """One clear error, before any training, if a split is too short for the batches or the evaluation."""
        self._check_span("train", R + (1 if layout == "windows" else seq_len))
        for split in self.splits:
            self._check_span(split, R + 1)

    def _check_span(self, split: str, span: int) -> None:
        if len(self.ids[split]) < span:
            raise DataError(
                f"{self.where}: the {split} split has {len(self.ids[split])} tokens, fewer than a window of {span}; "
                "use a shorter context or sequence, or more text"
            )

    def batch(
        self, split: str, batch_size: int, layout: str, R: int, generator: torch.Generator, seq_len: int = 1
    ) -> Batch:
        """``batch_size`` random windows of the text: R tokens of context and 1 target (windows)
        or ``seq_len`` targets."""
        T = 1 if layout == "windows" else seq_len
        ids = self.ids[split]
        self._check_span(split, R + T)
        starts = torch.randint(0, len(ids) - R - T + 1, (batch_size,), generator=generator)
        spans = ids[starts[:, None] + torch.arange(R + T)].long()  # (N, R + T)
        return Batch(spans[:, :-1], spans[:, R:])

    def eval_batches(self, split: str, R: int, batch_tokens: int, max_tokens: int):
        """Consecutive chunks that predict every token after the first R once;
        above ``max_tokens`` an evenly spaced subset of chunks."""
        ids = self.ids[split]
        self._check_span(split, R + 1)
        T = max(EVAL_CHUNK, R)
        n_chunks = -(-(len(ids) - R) // T)
        keep = _evenly_spaced(n_chunks, max(1, max_tokens // T))
        per_batch = max(1, batch_tokens // T)
        offsets = torch.arange(R + T)
        for i in range(0, len(keep), per_batch):
            positions = keep[i : i + per_batch, None] * T + offsets  # (n, R + T); past the end in the last chunk
            spans = ids[positions.clamp(max=len(ids) - 1)].long()
            targets = spans[:, R:].masked_fill(positions[:, R:] >= len(ids), IGNORE_INDEX)
            yield Batch(spans[:, :-1], targets)


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    """All of 0 .. n-1 if k >= n, else k indices spread evenly over them."""
    if k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()  # float32 would repeat indices above 2**24
