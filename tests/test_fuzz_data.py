"""Fuzzed input for the data readers: any bytes either load as a whole-file reading says they should, or
fail with exactly one DataError whose message is one line; never another exception.

The oracle is the simplest reading of the contract, on the whole file at once: UTF-8, a UTF-8
byte-order mark dropped, CRLF and lone CR made LF; lines stripped, blank ones skipped. The readers
themselves decode in pieces, so each example also runs with pieces of a few bytes, which puts piece
boundaries inside characters, between CR and LF and inside long lines.
"""

import codecs
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from makemore import data
from makemore.data import IGNORE_INDEX, DataError, Vocab, text

# Derandomized: CI sees the same examples every run, so a red build is a bug, not bad luck.
fuzz = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
PIECES = st.sampled_from([8, 9, 13, 64, text.READ_CHUNK])  # bytes decoded at a time; 8 is the least that holds any BOM

# Characters that stress the contract: line ends, blanks, the boundary, NUL, a BOM inside the text,
# other Unicode line separators (ordinary characters here), 2-, 3- and 4-byte UTF-8.
TRICKY = "\n\r \t.\0\ufeff\x0b\x0c\x1c\x85\u2028é€😀ab"
texts = st.text(alphabet=st.sampled_from(TRICKY) | st.characters(blacklist_categories=("Cs",)), max_size=60)
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1"]
encoded = st.builds(lambda t, enc: t.encode(enc, errors="replace"), texts, st.sampled_from(ENCODINGS))
contents = st.one_of(st.binary(max_size=120), encoded)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def write(workdir, content: bytes, name="input.txt"):
    path = workdir / name
    path.write_bytes(content)
    return path


def whole_text(raw: bytes) -> str | None:
    """The oracle's text, or None where the contract says error (NUL, not UTF-8, a UTF-16/32 byte-order mark)."""
    if b"\0" in raw or raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None
    try:
        decoded = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded.replace("\r\n", "\n").replace("\r", "\n")


def whole_lines(raw: bytes) -> list[str] | None:
    decoded = whole_text(raw)
    if decoded is None:
        return None
    items = [line.strip() for line in decoded.split("\n") if line.strip()]
    return None if not items or any("." in item for item in items) else items


def outcome(call):
    """(result, None) or (None, the DataError); any other exception fails the test."""
    try:
        return call(), None
    except DataError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None, e


def all_items(source) -> list[str]:
    return sorted(item for split in source.splits for item in source.items(split))


@fuzz
@given(contents, PIECES)
def test_any_bytes_load_as_the_whole_file_reads_or_fail_in_one_line(workdir, raw, piece):
    path = write(workdir, raw)
    expected_text, expected_lines = whole_text(raw), whole_lines(raw)
    with mock.patch.object(text, "READ_CHUNK", piece):
        got_text, text_error = outcome(lambda: data.read_text(path))
        got_lines, lines_error = outcome(lambda: data.read_lines(path))
        stream, stream_error = outcome(lambda: data.load_source(str(path), "stream"))
        lines, lines_source_error = outcome(lambda: data.load_source(str(path), "lines"))
    if expected_text is None or not expected_text.strip():
        assert text_error and stream_error and lines_error and lines_source_error
    else:
        assert got_text == expected_text
        ids = torch.cat([stream.ids[split] for split in stream.splits])
        assert stream.vocab.decode(ids) == expected_text and stream.vocab.chars == sorted(set(expected_text))
    if expected_lines is None:
        assert lines_error and lines_source_error
        return
    assert got_lines == expected_lines
    if len(expected_lines) < 2:  # the 80% training split of one item is empty
        assert lines_source_error and "training split empty" in str(lines_source_error)
        return
    assert all_items(lines) == sorted(expected_lines)
    assert lines.vocab.chars == ["."] + sorted(set("".join(expected_lines)))
    assert not {"\r", "\n"} & set(lines.vocab.chars)


lines_of_text = st.lists(
    st.text(
        alphabet=st.sampled_from("ab é😀\t\x85")
        | st.characters(blacklist_characters="\r\n.\0", blacklist_categories=("Cs",)),
        max_size=12,
    ),
    min_size=1,
    max_size=30,
)


@fuzz
@given(lines_of_text, st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1), st.booleans(), st.booleans(), PIECES)
def test_line_ends_and_a_utf8_bom_change_nothing(workdir, lines, ends, bom, final_end, piece):
    """CRLF, lone CR and LF, mixed at random, with or without a UTF-8 BOM: the same items, the same tokens, as LF."""
    mixed = "".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    if not final_end:
        mixed = mixed[: -len(ends[(len(lines) - 1) % len(ends)])]
    plain = "\n".join(lines) + ("\n" if final_end else "")
    with mock.patch.object(text, "READ_CHUNK", piece):
        reference = outcome(lambda: data.read_lines(write(workdir, plain.encode(), "lf.txt")))
        other = outcome(
            lambda: data.read_lines(write(workdir, (codecs.BOM_UTF8 if bom else b"") + mixed.encode(), "mixed.txt"))
        )
        assert (reference[0], type(reference[1])) == (other[0], type(other[1]))
        if reference[0]:
            assert data.read_text(workdir / "lf.txt") == data.read_text(workdir / "mixed.txt")
        if reference[0] and len(reference[0]) >= 2:
            a, b = data.load_source(str(workdir / "lf.txt")), data.load_source(str(workdir / "mixed.txt"))
            assert torch.equal(a.ids, b.ids) and torch.equal(a.starts, b.starts) and a.vocab.chars == b.vocab.chars


@fuzz
@given(texts, st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"]))
def test_utf16_and_utf32_fail_in_one_line(workdir, content, encoding):
    path = write(workdir, content.encode(encoding))
    for call in (
        lambda: data.read_text(path),
        lambda: data.load_source(str(path), "lines"),
        lambda: data.load_source(str(path), "stream"),
    ):
        _, error = outcome(call)
        assert error is not None or content.encode(encoding) == content.encode("utf-8")  # empty text encodes to nothing
        if error and encoding in ("utf-16", "utf-32"):  # with a byte-order mark: named as such
            assert f"{encoding.upper()} byte-order mark" in str(error)


def test_a_utf8_bom_is_dropped_and_a_bom_inside_the_text_kept(workdir):
    path = write(workdir, codecs.BOM_UTF8 + "anna\r\nbob\ufeff\r\n".encode())
    assert data.read_lines(path) == ["anna", "bob\ufeff"]
    assert data.read_text(path) == "anna\nbob\ufeff\n"


@fuzz
@given(
    st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=8), min_size=1, max_size=20),
    st.text(alphabet="abcdefxyz\n. é", max_size=80),
    PIECES,
)
def test_characters_outside_a_trained_vocabulary(workdir, trained, content, piece):
    """Loading new data with a model's vocabulary: it loads and round-trips, or one error names the first bad line."""
    vocab = Vocab.for_lines(trained)
    path = write(workdir, content.encode())
    lines = content.split("\n")
    bad_line = next((i + 1 for i, line in enumerate(lines) if set(line.strip()) - set(vocab.chars)), None)
    with mock.patch.object(text, "READ_CHUNK", piece):
        stream, stream_error = outcome(lambda: data.load_source(str(path), "stream", vocab=vocab))
        source, lines_error = outcome(lambda: data.load_source(str(path), "lines", vocab=vocab))
    if not content.strip():
        assert "empty" in str(stream_error) and "empty" in str(lines_error)
        return
    with_ends = [line + "\n" for line in lines[:-1]] + lines[-1:]  # a LF outside the vocabulary is on the line it ends
    stream_bad = next((i + 1 for i, line in enumerate(with_ends) if set(line) - set(vocab.chars)), None)
    if stream_bad is None:
        assert stream.vocab.decode(torch.cat([stream.ids["train"], stream.ids["val"]])) == content
    else:
        assert f"input.txt:{stream_bad}: character " in str(stream_error)
    dotted = next((i + 1 for i, line in enumerate(lines) if "." in line), None)
    if bad_line is not None and (dotted is None or bad_line < dotted):  # on one line, the '.' is named first
        assert f"input.txt:{bad_line}: character " in str(lines_error) and "is not in the model's vocabulary" in str(
            lines_error
        )
    elif dotted is not None:
        assert f"input.txt:{dotted}: " in str(lines_error) and "contains '.'" in str(lines_error)
    elif lines_error is None:
        assert all_items(source) == sorted(line.strip() for line in lines if line.strip())


@pytest.mark.parametrize("kind", ["lines", "stream"])
def test_very_long_lines_load_and_evaluate_in_bounded_batches(workdir, kind):
    """A line of 400,000 characters among short ones: it loads, and evaluation batches stay near their token budget."""
    long = "ab" * 200_000
    path = write(workdir, f"anna\nbob\n{long}\ncarl\ndora\nemil\nfred\ngus\nhal\nivy\n".encode())
    source = data.load_source(str(path), kind)
    if kind == "lines":
        assert source.max_len == len(long) and sum(
            map(len, source.items("train") + source.items("val") + source.items("test"))
        ) > len(long)
    for split in source.splits:
        for batch in source.eval_batches(split, 8, batch_tokens=4096, max_tokens=10**9):
            assert batch.targets.numel() <= 4096 or len(batch.idx) == 1  # one row may be as long as its item
            assert (
                batch.targets.shape == (batch.idx.shape[0], batch.idx.shape[1] - 7)
                and (batch.targets != IGNORE_INDEX).any()
            )
    g = torch.Generator().manual_seed(0)
    assert source.batch("train", 4, "windows", 8, g).idx.shape == (4, 8)


def test_a_file_that_changes_between_the_two_readings(workdir):
    path = write(workdir, b"anna\nbob\ncarl\n")
    real = data.text.line_pieces
    reads = []

    def changing(p, vocab=None):  # the second reading finds another file
        reads.append(p)
        if len(reads) == 2:
            path.write_bytes(b"anna\nbobby\ncarl\n")
        return real(p, vocab)

    with (
        mock.patch.object(data.batches, "line_pieces", changing),
        pytest.raises(DataError, match="input.txt: the file changed while it was read"),
    ):
        data.load_source(str(path))
