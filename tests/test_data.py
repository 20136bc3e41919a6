import hashlib
import io
import random
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from makemore import data
from makemore.data import IGNORE_INDEX, DataError, Vocab


def lecture_build_dataset(words, stoi, block_size):
    """The lecture's build_dataset, one character at a time."""
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X), torch.tensor(Y)


def test_names_file_is_the_published_one(names_path):
    assert hashlib.sha256(names_path.read_bytes()).hexdigest() == data.DATASETS["names"].sha256


def test_vocab_is_boundary_then_sorted_characters(names_vocab):
    assert names_vocab.chars == ["."] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def test_lecture_split_is_random_seed_42_shuffle(names):
    words = list(names)
    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    assert data.lecture_split(names) == (words[:n1], words[n1:n2], words[n2:])
    assert len(names) == 32033


@pytest.mark.parametrize("block_size, sizes", [(8, (182625, 22655, 22866)), (3, (182625, 22655, 22866))])
def test_split_window_counts(names, names_vocab, block_size, sizes):
    splits = data.lecture_split(names)
    got = tuple(data.build_windows(split, names_vocab, block_size)[0].shape[0] for split in splits)
    assert got == sizes


@pytest.mark.parametrize("block_size", [1, 3, 8, 16])
def test_windows_match_the_lectures_character_loop(names, names_vocab, block_size):
    words = data.lecture_split(names)[1]
    X, Y = data.build_windows(words, names_vocab, block_size)
    X_ref, Y_ref = lecture_build_dataset(words, names_vocab.stoi, block_size)
    assert torch.equal(X, X_ref) and torch.equal(Y, Y_ref)
    assert X.dtype == Y.dtype == torch.int64


def test_padded_sequences_hold_exactly_the_windows(names, names_vocab):
    block_size = 8
    words = names[:50]
    S, targets = data.padded_sequences(words, names_vocab, block_size)
    X, Y = data.build_windows(words, names_vocab, block_size)
    valid = targets != IGNORE_INDEX
    assert S.shape == (50, block_size + max(map(len, words)))
    assert targets.shape == (50, S.shape[1] - block_size + 1)
    assert torch.equal(S.unfold(1, block_size, 1)[valid], X)
    assert torch.equal(targets[valid], Y)
    assert valid.sum(1).tolist() == [len(w) + 1 for w in words]


def test_stream_split_and_random_windows():
    ids = torch.arange(1000)
    train, val = data.stream_split(ids)
    assert len(train) == 900 and torch.equal(torch.cat([train, val]), ids)
    w = data.random_windows(train, 16, 33, torch.Generator().manual_seed(0))
    assert w.shape == (16, 33)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(16, 32, dtype=torch.int64))
    assert int(w.max()) < 900
    with pytest.raises(DataError, match="fewer than a window"):
        data.random_windows(train[:10], 1, 11)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="."), min_size=1), min_size=1))
def test_vocab_round_trips_any_unicode(items):
    vocab = Vocab.for_lines(items)
    text = "".join(items)
    ids = vocab.encode(text)
    assert vocab.decode(ids.tolist()) == text
    assert int(ids.min()) >= 1  # '.' (0) is the boundary and never inside an item


def test_stream_vocab_is_sorted_and_keeps_dots():
    vocab = Vocab.for_stream("To be. Or not.\n")
    assert vocab.chars == sorted(set("To be. Or not.\n"))


def test_unknown_character_in_a_stream_names_it_and_the_line():
    vocab = Vocab.for_stream("ab\nc")
    with pytest.raises(DataError, match=r"eval.txt:2: character 'z' is not in the model's vocabulary of 4 characters"):
        vocab.encode("ab\nz", where="eval.txt")


def test_unknown_character_in_lines_names_the_file_line(tmp_path):
    path = write(tmp_path, b"anna\n\nbob\nzo\xc3\xab\n")
    with pytest.raises(DataError, match=r"items.txt:4: character 'ë' is not in the model's vocabulary of 27"):
        data.read_lines(path, Vocab.for_lines(["abcdefghijklmnopqrstuvwxyz"]))


# Bad input: one clear error each, naming the file and, where there is one, the line.


def write(tmp_path, content: bytes, name="items.txt"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file.*not a registered data set: names, tinyshakespeare"):
        data.resolve(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_empty_file(tmp_path, content):
    with pytest.raises(DataError, match="items.txt: the file is empty"):
        data.read_lines(write(tmp_path, content))


def test_binary_file(tmp_path):
    with pytest.raises(DataError, match=r"items.txt:2: NUL byte: this looks like a binary file"):
        data.read_lines(write(tmp_path, b"anna\n\x00\x01\x02"))


def test_undecodable_file(tmp_path):
    with pytest.raises(DataError, match=r"items.txt:3: not valid UTF-8 \(byte 0xff\)"):
        data.read_lines(write(tmp_path, b"anna\nbob\nca\xffrl\n"))


def test_boundary_character_inside_a_line(tmp_path):
    with pytest.raises(DataError, match=r"items.txt:2: 'j.r.' contains '.', the boundary token"):
        data.read_lines(write(tmp_path, b"anna\nj.r.\n"))


def test_lines_are_stripped_and_blank_lines_skipped(tmp_path):
    assert data.read_lines(write(tmp_path, b"  anna \n\n\r\nbob\r\n")) == ["anna", "bob"]


# Downloads: checked against the registry's SHA-256, never half-written.


@pytest.fixture
def fake_download(monkeypatch):
    def install(payload=None, error=None):
        def urlopen(url, timeout):
            if error:
                raise error
            return io.BytesIO(payload)

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)

    return install


def fake_info(payload: bytes) -> data.DatasetInfo:
    return data.DatasetInfo("tiny.txt", "https://example.invalid/tiny.txt", hashlib.sha256(payload).hexdigest(), "lines")


def test_download_checks_sha256_and_saves(tmp_path, fake_download, monkeypatch):
    payload = b"anna\nbob\n"
    monkeypatch.setitem(data.DATASETS, "tiny", fake_info(payload))
    fake_download(payload)
    path, kind = data.resolve("tiny", data_dir=tmp_path)
    assert path == tmp_path / "tiny.txt" and path.read_bytes() == payload and kind == "lines"


def test_download_with_wrong_sha256_saves_nothing(tmp_path, fake_download, monkeypatch):
    monkeypatch.setitem(data.DATASETS, "tiny", fake_info(b"something else"))
    fake_download(b"anna\n")
    with pytest.raises(DataError, match="does not match the expected"):
        data.resolve("tiny", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_offline_download_says_where_to_put_the_file(tmp_path, fake_download, monkeypatch):
    monkeypatch.setitem(data.DATASETS, "tiny", fake_info(b"anna\n"))
    fake_download(error=urllib.error.URLError("no network"))
    with pytest.raises(DataError, match=r"could not download https://example.invalid/tiny.txt .*place the file at .*tiny.txt by hand"):
        data.resolve("tiny", data_dir=tmp_path)
