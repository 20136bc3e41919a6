"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` can read it: loading a file from elsewhere cannot run code.
"""

import os
import tempfile
from pathlib import Path

import torch

FORMAT = "makemore-wavenet/2"


class CheckpointError(Exception):
    """A missing or unreadable checkpoint; the message is one line saying what and how to fix it."""


def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here; train one first with `makemore train --out {path.parent}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable makemore checkpoint ({reason}); retrain or restore it from a backup") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint; retrain with this version of makemore")
    return state
