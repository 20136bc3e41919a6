"""Checkpoints: written atomically, read without unpickling arbitrary objects, checked before use.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` can read it: loading a file from elsewhere cannot run code. Every file that
is not a whole, unaltered checkpoint of this format — cut short, bytes flipped, an older or newer
format, weights or a vocabulary that do not fit the model its config describes — is one
CheckpointError line naming the file, what is wrong and how to fix it.

torch's zip reader does not verify the CRC-32s of its records, so a flipped byte inside a
tensor loads silently as a wrong weight. Each checkpoint therefore carries a SHA-256 of its
contents (every tensor's dtype, shape and bytes, every other value's type and repr, in order),
which ``load`` recomputes.
"""

import hashlib
import os
import re
import secrets
import zipfile
from pathlib import Path

import torch

FORMAT = "makemore-wavenet/3"
# /2 is /3 without the checksum: still readable, so that runs trained before it can be sampled and resumed.
READABLE = ("makemore-wavenet/2", FORMAT)
_FORMAT_TAG = re.compile(r"makemore-wavenet/(\d+)")
BOUNDARY = "."  # line data's token 0 (makemore.data.BOUNDARY; not imported, so that this module stays torch-only)


class CheckpointError(Exception):
    """A missing or unusable checkpoint; the message is one line saying what, which file and how to fix it."""


def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one, whole.

    The temporary file is created with mode 0o666 and the process's umask applies, as for any file
    the user writes (mkstemp's 0o600 would hide checkpoints from a group sharing a run directory).
    Its name carries this process's id, so a later save can tell a dead writer's leftover from a
    live one's file in progress.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    payload = {"format": FORMAT, **state}
    payload["sha256"] = _digest(payload)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete ``path``'s temporary files left by writers that died mid-write (SIGKILL, power loss); return them.

    A temporary file of a process still alive on this machine is kept: it may be writing now.
    (One training writes a run directory at a time, see train/lock.py, so no live writer on another
    machine shares it.)
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f"{_glob_escape(path.name)}.*.tmp"):
        match = re.fullmatch(re.escape(path.name) + r"\.(\d+)\.[0-9a-f]+\.tmp", tmp.name)
        if match and not pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (True where that cannot be told:
    never take a live writer's file)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load(path: Path) -> dict:
    """The checkpoint at ``path``, checked whole: format, checksum and vocabulary (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here; train one first with `makemore train --out {path.parent}`")
    fix = f"restore it from a backup or retrain with `makemore train --out {path.parent} --force`"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip archive's first record, without the directory that ends one
            raise CheckpointError(
                f"{path}: truncated ({path.stat().st_size:,} bytes, its end is missing: "
                f"a copy or write was cut short); {fix}"
            )
        raise CheckpointError(f"{path}: not a readable makemore checkpoint (not a torch.save zip archive); {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch raise: one line
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:  # code in the file, or a corrupt name: either way nothing was imported or run
            raise CheckpointError(
                f"{path}: not a readable makemore checkpoint: it refers to {unsafe.group(1)}, "
                "which loading would have to import and run "
                "(refused; a makemore checkpoint holds only tensors and plain data): "
                f"the file holds code or is corrupt; {fix}"
            ) from None
        raise CheckpointError(f"{path}: corrupt, not a readable makemore checkpoint ({_reason(e)}); {fix}") from None
    tag = state.get("format") if isinstance(state, dict) else None
    well_formed = isinstance(tag, str) and _FORMAT_TAG.fullmatch(tag)
    # A checksum written by this format is checked first, so that a flipped byte in the format tag
    # itself reads as corruption; an older or newer format's file is judged by its tag alone.
    if tag == FORMAT or (not well_formed and isinstance(state, dict) and "sha256" in state):
        stored = state.pop("sha256", None)
        try:
            actual = _digest(state)
        except TypeError as e:
            raise CheckpointError(f"{path}: corrupt ({e}); {fix}") from None
        if stored != actual:
            raise CheckpointError(
                f"{path}: corrupt: its contents do not match the SHA-256 saved with them "
                f"(changed on disk or in a copy); {fix}"
            )
    if tag not in READABLE:
        raise CheckpointError(f"{path}: {_format_problem(tag, path)}")
    _check_vocab(state, path)
    return state


def load_weights(model: torch.nn.Module, weights, path: Path) -> None:
    """``model.load_state_dict(weights)``, or one line naming what does not fit
    (load_state_dict's own error spans many lines)."""
    path = Path(path)
    expected = model.state_dict()
    problems = []
    if not isinstance(weights, dict):
        problems.append(f"the weights are a {type(weights).__name__}, not a dict of tensors")
        weights = {}
    for name, value in expected.items():
        given = weights.get(name)
        if given is None:
            problems.append(f"{name} is missing")
        elif not isinstance(given, torch.Tensor):
            problems.append(f"{name} is a {type(given).__name__}, not a tensor")
        elif given.shape != value.shape:
            problems.append(f"{name} is {tuple(given.shape)} in the file, {tuple(value.shape)} in the model")
    problems += [f"{name} is not in the model" for name in weights if name not in expected]
    if problems:
        more = f", and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise CheckpointError(
            f"{path}: its weights do not fit the {type(model).__name__} its config describes "
            f"({'; '.join(problems[:2])}{more}); "
            "the file was edited or comes from another program: "
            f"restore it or retrain with `makemore train --out {path.parent} --force`"
        )
    model.load_state_dict(weights)


def _check_vocab(state: dict, path: Path) -> None:
    """The vocabulary must be distinct single characters, as many as the model's vocab_size,
    line data's starting with '.'."""
    if "vocab" not in state:
        return
    vocab = state["vocab"]
    fix = f"the file was edited or damaged: restore it or retrain with `makemore train --out {path.parent} --force`"
    if not isinstance(vocab, list) or not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise CheckpointError(f"{path}: its vocabulary is not a list of single characters; {fix}")
    if len(set(vocab)) != len(vocab):
        twice = next(ch for i, ch in enumerate(vocab) if ch in vocab[:i])
        raise CheckpointError(f"{path}: its vocabulary lists {twice!r} twice; {fix}")
    if state.get("kind") == "lines" and vocab[:1] != [BOUNDARY]:
        raise CheckpointError(
            f"{path}: its vocabulary for line data does not start with the boundary {BOUNDARY!r}; {fix}"
        )
    model_config = state.get("model_config")
    if isinstance(model_config, dict) and "vocab_size" in model_config and model_config["vocab_size"] != len(vocab):
        raise CheckpointError(
            f"{path}: its vocabulary has {len(vocab)} characters "
            f"but its model has {model_config['vocab_size']} embedding rows; {fix}"
        )


def _format_problem(tag, path: Path) -> str:
    match = _FORMAT_TAG.fullmatch(tag) if isinstance(tag, str) else None
    if match is None:
        return (
            f"not a makemore checkpoint (no {FORMAT} format tag: another program's torch file?); "
            f"train one with `makemore train --out {path.parent}`"
        )
    version, ours = int(match.group(1)), int(_FORMAT_TAG.fullmatch(FORMAT).group(1))
    if version > ours:
        return (
            f"written by a newer makemore (format {tag}; this one reads {', '.join(READABLE)}): "
            "upgrade makemore to use it"
        )
    return (
        f"written by an older makemore (format {tag}; this one reads {', '.join(READABLE)}): "
        f"retrain with `makemore train --out {path.parent} --force`"
    )


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Hash ``obj`` unambiguously: a type tag and a length before every value."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"d%d:" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d:" % (b"l" if isinstance(obj, list) else b"t", len(obj)))
        for value in obj:
            _feed(h, value)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = f"{type(obj).__name__}:{obj!r}".encode()
        h.update(b"v%d:" % len(text) + text)
    else:
        raise TypeError(
            f"a checkpoint holds only tensors, numbers, strings, lists and dicts, not a {type(obj).__name__}"
        )


def _reason(e: Exception) -> str:
    """The informative line of torch.load's error (its weights-only errors open with paragraphs of advice)."""
    text = str(e)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    lines = [line.strip() for line in (detail.group(1) if detail else text).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:160]
