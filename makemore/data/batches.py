"""Sources of batches: a data set's splits, cut into ``Batch(idx, targets)`` in the layout a recipe names.

Every model takes ``idx (N, L)`` and predicts T = L - R + 1 targets (R: its receptive field), so
one pipeline serves them all. Two layouts:

- ``windows``: one target per row (L = R), the lecture's minibatches of (context, next token).
- ``sequences``: every position of an item (lines), or of a window of the text (stream), is a
  target; line items are left-padded with R tokens 0 and right-padded to one fixed width per data
  set (the longest item), so every batch has the same shape and a compiled step never recompiles.

Evaluation always uses sequences: in eval mode every model gives the same logits either way, and
whole sequences share their nodes. Token ids are stored compactly (uint8 up to 256 symbols) and
widened to int64 per batch.
"""

from dataclasses import dataclass

import torch

from .registry import resolve
from .text import IGNORE_INDEX, DataError, Vocab, lecture_split, read_lines, read_text, stream_split

LAYOUTS = ("windows", "sequences")
EVAL_CHUNK = 512  # targets per evaluation row of a stream (at least the receptive field)


@dataclass
class Batch:
    idx: torch.Tensor  # (N, L) int64 token ids
    targets: torch.Tensor  # (N, T) int64 next tokens, IGNORE_INDEX where there is nothing to predict

    def to(self, device) -> "Batch":
        return Batch(self.idx.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))


def load_source(data: str, kind: str = "auto", *, seed: int = 42, vocab: Vocab | None = None) -> "LineSource | StreamSource":
    """The data set ``data`` (a registered name or a path) as a source; ``vocab``: a trained model's, to encode with."""
    path, kind, sha256 = resolve(data, kind)
    if kind == "lines":
        items = read_lines(path, vocab, sha256)
        return LineSource(items, vocab or Vocab.for_lines(items), seed=seed, where=str(path))
    text = read_text(path, sha256)
    vocab = vocab or Vocab.for_stream(text)
    return StreamSource(vocab.encode(text, where=str(path)), vocab, where=str(path))


class LineSource:
    """Items, one per line, in the lecture's split (train / val / test, 80 / 10 / 10 after a seeded shuffle)."""

    kind = "lines"

    def __init__(self, items: list[str], vocab: Vocab, *, seed: int = 42, where: str = "input"):
        self.vocab = vocab
        self.items = dict(zip(("train", "val", "test"), lecture_split(items, seed)))
        if not self.items["train"]:
            raise DataError(f"{where}: {len(items)} item(s) leave the 80% training split empty; give at least 2 lines")
        self.max_len = max(len(item) for item in items)
        self.splits = tuple(split for split, split_items in self.items.items() if split_items)
        self._encoded = {split: self._encode(split_items, where) for split, split_items in self.items.items()}
        self._shaped: dict = {}

    def _encode(self, items: list[str], where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (n, max_len + 1): each item right-padded with 0, the first 0 being its end '.'; and lengths (n,)."""
        lengths = torch.tensor([len(item) for item in items], dtype=torch.int64)
        rows = torch.zeros(len(items), self.max_len + 1, dtype=self.vocab.dtype)
        rows[torch.arange(self.max_len + 1) < lengths[:, None]] = self.vocab.encode("".join(items), where)
        return rows, lengths

    def sequences(self, split: str, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (n, R + max_len + 1): [0] * R + item + [0] * (max_len + 1 - len), and lengths (n,)."""
        rows, lengths = self._encoded[split]
        return torch.cat([rows.new_zeros(len(rows), R), rows], dim=1), lengths

    def windows(self, split: str, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The lecture's ``build_dataset``: every (window (M, R), next token (M,)) of ``split``, item by item."""
        key = (split, R)
        if key not in self._shaped:
            rows, lengths = self.sequences(split, R)
            spans = rows.unfold(1, R + 1, 1)  # (n, max_len + 1, R + 1): window j of each row and its next token
            pairs = spans[torch.arange(self.max_len + 1) <= lengths[:, None]]  # an item of n characters: n + 1 targets
            self._shaped[key] = pairs[:, :R], pairs[:, R]
        return self._shaped[key]

    def n_targets(self, split: str) -> int:
        return int(self._encoded[split][1].sum()) + len(self.items[split])

    def check(self, layout: str, R: int, seq_len: int) -> None:
        """Items are left-padded to any receptive field: nothing can be too short."""

    def batch(self, split: str, batch_size: int, layout: str, R: int, generator: torch.Generator, seq_len: int = 0) -> Batch:
        """A random batch: ``batch_size`` windows, or ``batch_size`` whole items (``seq_len`` unused: items are whole)."""
        if layout == "windows":
            X, Y = self.windows(split, R)
            ix = torch.randint(0, X.shape[0], (batch_size,), generator=generator)  # the lecture's draw
            return Batch(X[ix].long(), Y[ix].long()[:, None])
        rows, lengths = self.sequences(split, R)
        ix = torch.randint(0, rows.shape[0], (batch_size,), generator=generator)
        return _item_batch(rows[ix], lengths[ix], R)

    def eval_batches(self, split: str, R: int, batch_tokens: int, max_tokens: int):
        """Whole items, every target once; above ``max_tokens`` targets an evenly spaced subset of items."""
        rows, lengths = self.sequences(split, R)
        keep = _evenly_spaced(len(rows), max(1, max_tokens // (self.max_len + 1)))
        per_batch = max(1, batch_tokens // (self.max_len + 1))
        for i in range(0, len(keep), per_batch):
            ix = keep[i : i + per_batch]
            yield _item_batch(rows[ix], lengths[ix], R)


def _item_batch(rows: torch.Tensor, lengths: torch.Tensor, R: int) -> Batch:
    rows = rows.long()
    targets = rows[:, R:].masked_fill(torch.arange(rows.shape[1] - R) > lengths[:, None], IGNORE_INDEX)
    return Batch(rows[:, :-1], targets)


class StreamSource:
    """One text: the first 90% to train, the last 10% to validate."""

    kind = "stream"
    splits = ("train", "val")

    def __init__(self, ids: torch.Tensor, vocab: Vocab, *, where: str = "input"):
        self.vocab = vocab
        self.ids = dict(zip(self.splits, stream_split(ids)))
        self.where = where

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

    def batch(self, split: str, batch_size: int, layout: str, R: int, generator: torch.Generator, seq_len: int = 1) -> Batch:
        """``batch_size`` random windows of the text: R tokens of context and 1 target (windows) or ``seq_len`` targets."""
        T = 1 if layout == "windows" else seq_len
        ids = self.ids[split]
        self._check_span(split, R + T)
        starts = torch.randint(0, len(ids) - R - T + 1, (batch_size,), generator=generator)
        spans = ids[starts[:, None] + torch.arange(R + T)].long()  # (N, R + T)
        return Batch(spans[:, :-1], spans[:, R:])

    def eval_batches(self, split: str, R: int, batch_tokens: int, max_tokens: int):
        """Consecutive chunks that predict every token after the first R once; above ``max_tokens`` an evenly spaced subset of chunks."""
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
    return torch.linspace(0, n - 1, k).round().long()
