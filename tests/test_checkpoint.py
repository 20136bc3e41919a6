import pickle

import pytest
import torch

from makemore import checkpoint
from makemore.checkpoint import CheckpointError


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


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a readable makemore checkpoint"):
        checkpoint.load(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [(None, "no checkpoint here; train one first"), (b"garbage", "not a readable makemore checkpoint"), (pickle.dumps({"a": 1}), "not a readable")],
)
def test_missing_or_corrupt_checkpoint(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)


def test_a_foreign_torch_file_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a makemore-wavenet/2 checkpoint"):
        checkpoint.load(tmp_path / "ckpt.pt")
