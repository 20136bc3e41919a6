import hashlib
import random

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
    source = data.LineSource(names, names_vocab)
    assert tuple(source.windows(split, block_size)[0].shape[0] for split in ("train", "val", "test")) == sizes
    assert tuple(source.n_targets(split) for split in ("train", "val", "test")) == sizes


@pytest.mark.parametrize("block_size", [1, 3, 8, 16])
def test_windows_match_the_lectures_character_loop(names, names_vocab, block_size):
    X, Y = data.LineSource(names, names_vocab).windows("val", block_size)
    X_ref, Y_ref = lecture_build_dataset(data.lecture_split(names)[1], names_vocab.stoi, block_size)
    assert torch.equal(X.long(), X_ref) and torch.equal(Y.long(), Y_ref)
    assert X.dtype == Y.dtype == torch.uint8  # compact; widened per batch


@pytest.mark.parametrize("R", [1, 8])
def test_sequence_batches_hold_exactly_the_windows(names, names_vocab, R):
    """Whole items, left-padded with R zeros, in batches of similar length:
    the same (window, target) pairs, each once."""
    source = data.LineSource(names[:200], names_vocab)
    batches = list(source.eval_batches("val", R, batch_tokens=64, max_tokens=10**9))
    assert len(batches) > 1 and max(b.idx.shape[1] for b in batches) == R + max(map(len, source.items("val")))
    for b in batches:  # rows of at most 64 positions, or one row; each as wide as its longest item needs
        assert b.idx.numel() <= 64 or len(b.idx) == 1
        assert int((b.targets != IGNORE_INDEX).sum(1).max()) == b.targets.shape[1]
    windows = torch.cat([b.idx.unfold(1, R, 1)[b.targets != IGNORE_INDEX] for b in batches])
    targets = torch.cat([b.targets[b.targets != IGNORE_INDEX] for b in batches])
    X, Y = source.windows("val", R)
    assert torch.equal(
        multiset(torch.cat([windows, targets[:, None]], 1)), multiset(torch.cat([X, Y[:, None]], 1).long())
    )
    valid = torch.cat([(b.targets != IGNORE_INDEX).sum(1) for b in batches])
    assert sorted(valid.tolist()) == sorted(len(w) + 1 for w in source.items("val"))


def multiset(rows: torch.Tensor) -> torch.Tensor:
    """The rows as a multiset: each distinct row, sorted, followed by how often it occurs."""
    distinct, counts = torch.unique(rows, dim=0, return_counts=True)
    return torch.cat([distinct, counts[:, None]], 1)


@pytest.mark.parametrize(
    "index_bits", [31, 56]
)  # 56: keys keep 8 bits of hash, so each lookup meets about 10 strangers
def test_item_set_holds_exactly_the_splits_items(names, names_vocab, monkeypatch, index_bits):
    monkeypatch.setattr(data.ItemSet, "INDEX_BITS", index_bits)
    source = data.LineSource(names[:3000], names_vocab)
    train, items = source.item_set("train"), source.items("train")
    assert len(train) == source.n_items("train") and items == data.lecture_split(names[:3000])[0]
    assert all(item in train for item in items)
    assert not any(item in train for item in set(source.items("val") + source.items("test")) - set(items))
    assert "zzzzqq" not in train and "" not in train and "an.na" not in train and "ë" not in train


def test_random_batches_in_both_layouts(names, names_vocab):
    source = data.LineSource(names, names_vocab)
    g = torch.Generator().manual_seed(0)
    windows = source.batch("train", 16, "windows", 8, g)
    assert windows.idx.shape == (16, 8) and windows.targets.shape == (16, 1) and windows.idx.dtype == torch.int64
    sequences = source.batch("train", 16, "sequences", 8, g)
    assert sequences.idx.shape == (16, 8 + 15) and sequences.targets.shape == (
        16,
        16,
    )  # fixed width: the longest name, 15


def test_stream_batches_and_bounded_evaluation():
    source = data.StreamSource(torch.arange(1000) % 200, Vocab([chr(65 + i) for i in range(200)]))
    train = source.ids["train"]
    assert len(train) == 900 and len(source.ids["val"]) == 100
    g = torch.Generator().manual_seed(0)
    b = source.batch("train", 16, "sequences", 8, g, seq_len=25)
    assert b.idx.shape == (16, 32) and b.targets.shape == (16, 25)
    assert torch.equal(b.targets, b.idx[:, 7:] + 1 - 200 * (b.idx[:, 7:] == 199))  # the next token of the text
    w = source.batch("train", 16, "windows", 8, g)
    assert w.idx.shape == (16, 8) and w.targets.shape == (16, 1)
    every = list(source.eval_batches("val", 8, batch_tokens=10**6, max_tokens=10**9))
    valid = torch.cat([bt.targets[bt.targets != IGNORE_INDEX] for bt in every])
    assert torch.equal(valid, source.ids["val"][8:].long())  # every target after the first R, once
    with pytest.raises(DataError, match="fewer than a window of 101"):
        source.batch("val", 1, "sequences", 8, g, seq_len=93)


def test_bounded_evaluation_spreads_over_the_split():
    ids = torch.randint(0, 5, (200_000,))
    source = data.StreamSource(ids, Vocab(list("abcde")))
    chunks = list(source.eval_batches("train", 8, batch_tokens=4096, max_tokens=10_000))
    n = sum(int((b.targets != IGNORE_INDEX).sum()) for b in chunks)
    assert 9_000 <= n <= 10_000


def test_bounded_evaluation_of_lines_spreads_over_the_split(names, names_vocab):
    source = data.LineSource(names, names_vocab)  # 25,626 training names, 182,625 targets
    batches = list(source.eval_batches("train", 8, batch_tokens=4096, max_tokens=20_000))
    assert 18_000 <= sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches) <= 22_000


def test_stream_ids_are_compact(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n" * 100)
    source = data.load_source(str(path), "stream")
    assert source.ids["train"].dtype == torch.uint8


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="."), min_size=1), min_size=1
    )
)
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


# Downloads are tested against a real local HTTP server in test_download.py.


def test_both_data_sets_ship_with_the_package_and_are_checked(tmp_path):
    for name in ("names", "tinyshakespeare"):
        path, _, sha256 = data.resolve(name)
        assert "makemore" in path.parts and hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    altered = tmp_path / "names.txt"
    altered.write_text("anna\nbob\n")
    with pytest.raises(DataError, match="SHA-256 does not match the registered .* the file was altered"):
        data.read_lines(altered, sha256=data.DATASETS["names"].sha256)


def test_an_empty_prompt_encodes_to_nothing():
    assert Vocab.for_stream("abc").encode("").shape == (0,)
