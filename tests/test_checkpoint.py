"""Checkpoints: written atomically with the user's file mode; any file that is not a whole, unaltered
checkpoint of this format is one CheckpointError line naming the file, what is wrong and how to fix it."""

import os
import pickle
import random

import pytest
import torch

from makemore import checkpoint
from makemore.checkpoint import CheckpointError
from makemore.cli import load_model, main
from makemore.train import CHECKPOINT, make_configs, train


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "vocab": [".", "a"], "config": {"lr": 0.1}}
    checkpoint.save(state, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(tmp_path / "ckpt.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7 and loaded["vocab"] == [".", "a"] and loaded["config"] == {"lr": 0.1}


def test_a_failed_save_keeps_the_old_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_the_write_is_synced_then_renamed_then_the_rename_synced(tmp_path, monkeypatch):
    """The order that makes a crash at any moment leave the old file or the new one:
    data on disk before the rename, the rename on disk after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    checkpoint.save({"step": 1}, tmp_path / "ckpt.pt")
    assert events == [("fsync", False), ("replace", str(tmp_path / "ckpt.pt")), ("fsync", True)]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_users_file_mode(tmp_path, umask, mode):
    """0o666 less the umask, as any file the user writes; mkstemp's 0o600 would hide it from the user's group."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"an older checkpoint")
    path.chmod(0o600)
    saved = os.umask(umask)
    try:
        checkpoint.save({"step": 1}, path)
    finally:
        os.umask(saved)
    assert path.stat().st_mode & 0o777 == mode


def test_a_killed_writers_temporary_file_is_removed_at_the_next_save(tmp_path, dead_pid):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path)
    stale = tmp_path / f"ckpt.pt.{dead_pid}.0badf00d.tmp"
    live = tmp_path / f"ckpt.pt.{os.getppid()}.0badf00d.tmp"  # a writer still alive: maybe writing now
    other = tmp_path / "other.pt.1.0badf00d.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert checkpoint.load(path)["step"] == 1  # a leftover never affects loading
    checkpoint.save({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", live.name, other.name])
    assert checkpoint.load(path)["step"] == 2


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": Exploit()}, path)
    message = one_line(path)
    assert (
        "not a readable makemore checkpoint: it refers to print, which loading would have to import and run" in message
    )
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no checkpoint here; train one first"),
        (b"", "not a readable makemore checkpoint (not a torch.save zip archive)"),
        (b"garbage", "not a readable makemore checkpoint (not a torch.save zip archive)"),
        (pickle.dumps({"a": 1}), "not a readable makemore checkpoint"),
    ],
)
def test_missing_or_corrupt_checkpoint(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    assert message in one_line(path)


def test_a_foreign_torch_file_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "ckpt.pt")
    assert "not a makemore checkpoint (no makemore-wavenet/3 format tag" in one_line(tmp_path / "ckpt.pt")


def one_line(path, load=checkpoint.load) -> str:
    """The CheckpointError that loading ``path`` raises: one line, starting with the file."""
    with pytest.raises(CheckpointError) as raised:
        load(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


# A real checkpoint: a tiny WaveNet trained for a few steps.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    config, model_config = make_configs(
        dict(data="names", n_embd=8, n_hidden=16, max_steps=20, log_interval=10, eval_max_tokens=1000)
    )
    train(config, model_config, out, progress=False)
    return out


@pytest.fixture
def real(run, tmp_path):
    """A copy of the real checkpoint in a fresh run directory, and its bytes."""
    raw = (run / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(raw)
    return tmp_path / CHECKPOINT, raw


def test_a_real_checkpoint_loads_into_its_model(real):
    model, state = load_model(real[0].parent)
    assert state["step"] == 20 and state["format"] == checkpoint.FORMAT and "sha256" not in state
    assert torch.equal(model.state_dict()["lm_head.weight"], state["model"]["lm_head.weight"])


@pytest.mark.parametrize("kept", [0.5, 0.1, 0.9, -1])
def test_a_truncated_checkpoint_is_one_line(real, kept):
    """A copy or a write cut short (the first half, ..., all but the last byte)."""
    path, raw = real
    path.write_bytes(raw[: int(len(raw) * kept)] if kept > 0 else raw[:kept])
    message = one_line(path)
    assert "truncated" in message and "its end is missing" in message and f"--out {path.parent} --force" in message


def test_a_flipped_byte_anywhere_is_one_line_or_harmless(real):
    """torch's zip reader does not check its CRC-32s: a flipped byte inside a tensor would load as a wrong weight.
    The checksum catches it; a flip anywhere else is unreadable, or lands on bytes nothing reads (zip timestamps,
    padding) and loads the same contents."""
    path, raw = real
    original = checkpoint.load(path)
    rng = random.Random(0)
    caught = harmless = 0
    for position in sorted(rng.sample(range(len(raw)), 300)):
        flipped = bytearray(raw)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            state = checkpoint.load(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), (position, str(e))
            caught += 1
        else:
            assert checkpoint._digest(state) == checkpoint._digest(original), position
            harmless += 1
    assert caught > 200  # most of the file is tensor data and the pickle


def test_a_flipped_weight_is_caught_by_the_checksum(real):
    path, _ = real
    state = torch.load(path, weights_only=True)
    state["model"]["lm_head.weight"][0, 0] += (
        1e-3  # what a flipped mantissa bit does, written through torch.save (CRC-32s fixed)
    )
    torch.save(state, path)
    assert "corrupt: its contents do not match the SHA-256 saved with them" in one_line(path)


@pytest.mark.parametrize(
    "tag, message",
    [
        (
            "makemore-wavenet/1",
            "written by an older makemore (format makemore-wavenet/1; "
            "this one reads makemore-wavenet/2, makemore-wavenet/3): retrain",
        ),
        (
            "makemore-wavenet/4",
            "written by a newer makemore (format makemore-wavenet/4; "
            "this one reads makemore-wavenet/2, makemore-wavenet/3): upgrade makemore",
        ),
        ("something/1", "not a makemore checkpoint (no makemore-wavenet/3 format tag"),
        (None, "not a makemore checkpoint (no makemore-wavenet/3 format tag"),
    ],
)
def test_another_format_version_is_one_line(real, tag, message):
    path, _ = real
    state = torch.load(path, weights_only=True)
    state["format"] = tag
    if not str(tag).startswith("makemore-wavenet/"):
        del state["sha256"]  # another program's file (with the checksum, a mangled tag reads as corruption: below)
    torch.save(state, path)
    assert message in one_line(path)


def test_a_mangled_format_tag_reads_as_corruption(real):
    path, _ = real
    state = torch.load(path, weights_only=True)
    state["format"] = "makemore-wavenet/\x13"
    torch.save(state, path)
    assert "corrupt: its contents do not match the SHA-256" in one_line(path)


def test_the_previous_format_without_a_checksum_still_loads(real):
    path, _ = real
    state = torch.load(path, weights_only=True)
    del state["sha256"]
    state["format"] = "makemore-wavenet/2"
    torch.save(state, path)
    _, loaded = load_model(path.parent)
    assert loaded["step"] == 20


def rewrite(path, change) -> None:
    """Edit a checkpoint's contents and save it properly (a consistent file whose contents do not fit)."""
    state = checkpoint.load(path)
    del state["format"]
    change(state)
    checkpoint.save(state, path)


def load_and_resume_refuse(path, capsys, *expected) -> None:
    """Sampling (cli.load_model), `makemore sample` and `makemore train --resume` each refuse with the same one line."""
    message = one_line(path.parent, load=load_model)
    for part in expected:
        assert part in message, message
    for argv in (
        ["sample", "--out", str(path.parent)],
        ["train", "--resume", "--out", str(path.parent), "--quiet", "--samples", "0"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda s: s["model"].update({"lm_head.weight": torch.zeros(16, 5)}),
            ["lm_head.weight is (16, 5) in the file, (16, 27) in the model"],
        ),
        (lambda s: s["model"].pop("wte.weight"), ["wte.weight is missing"]),
        (lambda s: s["model"].update({"extra.weight": torch.zeros(2)}), ["extra.weight is not in the model"]),
        (
            lambda s: s["model_config"].update(n_hidden=32),
            ["blocks.0.linear.weight is (16, 16) in the file, (16, 32) in the model", "and 14 more"],
        ),
        (lambda s: s.update(model=[1, 2]), ["the weights are a list, not a dict of tensors"]),
    ],
    ids=["shape", "missing", "extra", "config", "not-a-dict"],
)
def test_weights_that_do_not_fit_the_model_are_one_line(real, capsys, change, expected):
    path, _ = real
    rewrite(path, change)
    load_and_resume_refuse(
        path,
        capsys,
        "its weights do not fit the WaveNet its config describes",
        *expected,
        f"--out {path.parent} --force",
    )


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s["vocab"].pop(), "its vocabulary has 26 characters but its model has 27 embedding rows"),
        (lambda s: s["vocab"].__setitem__(5, "a"), "its vocabulary lists 'a' twice"),
        (lambda s: s["vocab"].__setitem__(5, "ab"), "its vocabulary is not a list of single characters"),
        (lambda s: s.update(vocab="abc"), "its vocabulary is not a list of single characters"),
        (lambda s: s["vocab"].reverse(), "its vocabulary for line data does not start with the boundary '.'"),
        (
            lambda s: (s["vocab"].append("#"), s["model_config"].update(vocab_size=28)),
            "wte.weight is (27, 8) in the file, (28, 8) in the model",
        ),
    ],
    ids=["short", "twice", "two-characters", "not-a-list", "no-boundary", "more-rows-than-weights"],
)
def test_a_vocabulary_that_does_not_fit_is_one_line(real, capsys, change, expected):
    path, _ = real
    rewrite(path, change)
    load_and_resume_refuse(path, capsys, expected, f"--out {path.parent} --force")


def test_an_optimiser_state_that_does_not_fit_is_one_line(real, capsys):
    path, _ = real
    rewrite(path, lambda s: s["optimizer"]["param_groups"][0]["params"].pop())
    assert main(["train", "--resume", "--out", str(path.parent), "--quiet", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its optimiser or random-number state does not fit this run" in err, err
