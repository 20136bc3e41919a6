"""Registered data sets: two packaged with makemore, others downloaded into data/ with a checksum."""

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .text import DataError

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = Path.cwd() / "data"  # downloads land here (git-ignored in the repository)


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
    """(path, kind, expected SHA-256 or None) for a registered data-set name or a path to a text file.

    A packaged data set is read from the package; another registered one from ``data_dir`` (default
    ./data), downloaded there first if missing. ``kind`` "auto" is the registry's kind, or "lines"
    for a path.
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    info = DATASETS.get(name_or_path)
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


def download(info: DatasetInfo, path: Path, chunk: int = 1 << 20) -> None:
    """Stream ``info.url`` into a temporary file beside ``path``, check its SHA-256, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(info.url, timeout=60) as response:
                    while block := response.read(chunk):
                        digest.update(block)
                        out.write(block)
            except OSError as e:
                raise DataError(f"could not download {info.url} ({e}); place the file at {path} by hand (SHA-256 {info.sha256})") from None
        if digest.hexdigest() != info.sha256:
            raise DataError(f"{info.url}: SHA-256 {digest.hexdigest()} does not match the expected {info.sha256}; nothing was saved")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
