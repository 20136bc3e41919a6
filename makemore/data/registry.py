"""Registered data sets: two packaged with makemore, others downloaded into data/ with a checksum."""

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .text import DataError

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = Path.cwd() / "data"  # downloads land here (git-ignored in the repository)
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte before a download gives up (connecting, or between reads)


@dataclass(frozen=True)
class DatasetInfo:
    file: str
    url: str
    sha256: str
    kind: str  # "lines" (one item per line) or "stream" (one text)
    packaged: bool = False  # shipped inside makemore/data/


DATASETS = {
    "names": DatasetInfo(
        "names.txt",
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
        "lines",
        packaged=True,
    ),
    "tinyshakespeare": DatasetInfo(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "stream",
        packaged=True,
    ),
}
KINDS = ("auto", "lines", "stream")


def resolve(name_or_path: str, kind: str = "auto", data_dir: Path | None = None) -> tuple[Path, str, str | None]:
    """(path, kind, expected SHA-256 or None) for a registered data-set name, a URL or a path to a text file.

    A packaged data set is read from the package; another registered one, or a URL, from
    ``data_dir`` (default ./data), downloaded there first if missing. ``kind`` "auto" is the
    registry's kind, or "lines" for a path or a URL.
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    info = DATASETS.get(name_or_path)
    if info is None and re.match(r"https?://", name_or_path, re.IGNORECASE):
        info = url_info(name_or_path)
    if info is None:
        path = Path(name_or_path)
        if not path.is_file():
            raise DataError(f"{name_or_path}: no such file (and not a registered data set: {', '.join(DATASETS)})")
        return path, "lines" if kind == "auto" else kind, None
    path = PACKAGE_DIR / info.file if info.packaged else Path(data_dir or DATA_DIR) / info.file
    if not path.is_file():
        if info.packaged:
            raise DataError(f"{path}: the packaged data file is missing; reinstall makemore-wavenet")
        download(info, path)
    return path, info.kind if kind == "auto" else kind, info.sha256


def url_info(url: str) -> DatasetInfo:
    """A data set given by its URL, which must name its SHA-256 the way pip does: ``URL#sha256=<64 hex digits>``.

    Every download is checked: a URL serves whatever its server holds today, so without the
    checksum a changed, truncated or hijacked file would train a model silently. The file is kept
    in the data directory under a name that starts with its checksum, so two URLs never collide.
    """
    base, _, fragment = url.partition("#")
    found = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
    if not found:
        raise DataError(
            f"{url}: a URL must name its SHA-256, as in {base}#sha256=<64 hex digits> (`sha256sum FILE` prints it); "
            "an unchecked download could be anything"
        )
    sha256 = found.group(1).lower()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlsplit(base).path).name)[-64:] or "data.txt"
    return DatasetInfo(f"{sha256[:16]}-{name}", base, sha256, "lines")


def download(info: DatasetInfo, path: Path, chunk: int = 1 << 20) -> None:
    """Stream ``info.url`` into a temporary file beside ``path``, check its SHA-256, then rename it into place.

    The rename is atomic, so ``path`` is either absent or the whole checked file, never half of
    one, even if the download fails, is interrupted, or runs in two processes at once (torchrun's
    ranks on a fresh machine: the last rename wins, with the same bytes).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    except OSError as e:
        raise DataError(
            f"{path.parent}: cannot write the download there ({e.strerror or e}); run from a writable directory"
        ) from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(info.url, timeout=DOWNLOAD_TIMEOUT) as response:
                    expected = response.headers.get("Content-Length")
                    received = 0
                    while block := response.read(chunk):
                        digest.update(block)
                        out.write(block)
                        received += len(block)
                    # http.client ends a body cut short with an empty read, not an error (Python 3.11)
                    if expected is not None and expected.isdigit() and received != int(expected):
                        raise http.client.IncompleteRead(b"", int(expected) - received)
            # IncompleteRead and the other HTTPExceptions are no OSErrors; ValueError: a malformed URL
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise DataError(
                    f"could not download {info.url} ({_reason(e)}); "
                    f"try again, or place the file at {path} by hand (SHA-256 {info.sha256})"
                ) from None
            out.flush()
            os.fsync(out.fileno())  # the bytes are on disk before the name points at them
        if digest.hexdigest() != info.sha256:
            raise DataError(
                f"{info.url}: SHA-256 {digest.hexdigest()} does not match the expected {info.sha256}; nothing was saved"
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _reason(e: Exception) -> str:
    """One line on why a download failed."""
    if isinstance(e, http.client.IncompleteRead):
        return f"the connection closed with {e.expected} byte(s) still to come"
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, Exception) else e
    return " ".join(str(e).split()) or type(e).__name__
